"""The training loop (``megatron_lasp.training``): every parallel layout gives the single-process losses.

Ranks are spawned with ``megatron_lasp.testing.spawn`` and call ``main(argv)``; several runs share
one spawn (the process groups are re-initialised between runs). Tiny model, fp32, mock data
unless the test is about real data.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from megatron_lasp.testing import spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# 3 iterations of global batch 4 over 64 tokens; a high LR so that the steps change the weights
# enough for a wrong gradient to show. Adam's first step is nearly scale-invariant, so a gradient
# off by a factor (missing reduction, wrong scaling) first shows in the loss of iteration 3.
BASE = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "1",
    "--log-interval", "2", "--eval-interval", "0", "--seed", "7", "--make-vocab-size-divisible-by", "64",
]
RTOL = 2e-5  # fp32; observed differences between layouts are ~1e-7 relative


def _run_configs(rank, world_size, configs):
    """Run ``main(BASE + extra)`` for each extra; return every run's per-iteration losses."""
    from megatron_lasp.training import main

    out = []
    for extra in configs:
        state = main(BASE + list(extra), destroy=False)
        out.append(list(state.losses))
    return out


def _assert_losses_equal(got, want, what):
    assert len(got) == len(want), (what, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isfinite(g), (what, i, got)
        assert abs(g - w) <= RTOL * abs(w), f"{what}: iteration {i + 1}: {g!r} != {w!r} (all: {got} vs {want})"


@pytest.fixture(scope="module")
def reference_losses():
    """Single-process losses (TP=SP=PP=DP=1), with and without gradient accumulation."""
    (runs,) = [spawn(_run_configs, 1, ([[], ["--micro-batch-size", "1"]],))[0]]
    plain, accumulated = runs
    return plain, accumulated


def test_single_process_accumulation_matches(reference_losses):
    plain, accumulated = reference_losses
    # 2 micro-batches of 2 and 4 micro-batches of 1 are the same global batch
    _assert_losses_equal(accumulated, plain, "mbs1 x 4 micro-batches")
    assert len(set(plain)) == len(plain), "the weights did not change between iterations"


def test_two_rank_layouts_match_single_process(reference_losses):
    plain, _ = reference_losses
    configs = {
        "sp2-lasp": ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp"],
        "sp2-lasp2": ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp2"],
        "sp2-ulysses": ["--context-parallel-size", "2", "--sequence-parallel-mode", "ulysses"],
        "sp2-allgather": ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "allgather"],
        "dp2-torch": ["--ddp-impl", "torch"],
        "dp2-fsdp": ["--ddp-impl", "fsdp"],
        "sp2-fsdp-accum": ["--sequence-parallel-size", "2", "--ddp-impl", "fsdp", "--micro-batch-size", "1"],
        "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    }
    results = spawn(_run_configs, 2, (list(configs.values()),), timeout=420)
    for rank_losses in results:  # every rank reports the same (broadcast) loss
        for name, losses in zip(configs, rank_losses):
            _assert_losses_equal(losses, plain, name)


def _save_initial(rank, world_size, ckpt):
    """One step at TP=SP=PP=1, saved: a common starting point for layouts whose init differs (PP)."""
    from megatron_lasp.training import main

    main(BASE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", ckpt], destroy=False)
    state = main(BASE + ["--load", ckpt, "--finetune"], destroy=False)
    return list(state.losses)


def test_pipeline_and_tp_sp_match_single_process(tmp_path):
    ckpt = str(tmp_path / "init")
    (want,) = spawn(_save_initial, 1, (ckpt,))
    finetune = ["--load", ckpt, "--finetune"]
    configs = {
        "pp2": finetune + ["--pipeline-model-parallel-size", "2"],
        "pp2-accum": finetune + ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"],
        "tp2-from-ckpt": finetune + ["--tensor-model-parallel-size", "2"],
    }
    for rank_losses in spawn(_run_configs, 2, (list(configs.values()),), timeout=420):
        for name, losses in zip(configs, rank_losses):
            _assert_losses_equal(losses, want, name)
    configs4 = {
        "tp2-sp2-lasp": finetune + ["--tensor-model-parallel-size", "2", "--sequence-parallel-size", "2",
                                    "--sequence-parallel"],
        "pp2-sp2-lasp2": finetune + ["--pipeline-model-parallel-size", "2", "--sequence-parallel-size", "2",
                                     "--sequence-parallel-mode", "lasp2"],
        "pp2-dp2-fsdp-accum": finetune + ["--pipeline-model-parallel-size", "2", "--ddp-impl", "fsdp",
                                          "--micro-batch-size", "1"],
    }
    for rank_losses in spawn(_run_configs, 4, (list(configs4.values()),), timeout=600):
        for name, losses in zip(configs4, rank_losses):
            _assert_losses_equal(losses, want, name)


# ----------------------------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def corpus_prefix(tmp_path_factory):
    from megatron_lasp.data import preprocess_bundled_corpus

    return preprocess_bundled_corpus(str(tmp_path_factory.mktemp("data") / "corpus"))


def _train_real(rank, world_size, argv):
    from megatron_lasp.training import main

    return list(main(argv, destroy=False).losses)


def test_bundled_data_blend_trains_with_lasp(corpus_prefix, tmp_path):
    argv = [
        "--model-preset", "tiny", "--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp",
        "--data-path", "0.3", corpus_prefix, "0.7", corpus_prefix, "--split", "98,2,0",
        "--data-cache-path", str(tmp_path / "cache"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(REPO, "examples/data/tokenizer"),
        "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "12",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "4", "--eval-interval", "6", "--eval-iters", "1",
    ]
    losses = spawn(_train_real, 2, (argv,), timeout=420)[0]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_torchrun_cli_smoke(corpus_prefix, tmp_path):
    """The documented CLI under torchrun: 2 ranks, LASP over SP=2, bundled data, a checkpoint."""
    save = tmp_path / "run"
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        os.path.join(REPO, "pretrain_linear_lm.py"),
        "--model-preset", "tiny", "--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp",
        "--data-path", corpus_prefix, "--split", "98,2,0", "--data-cache-path", str(tmp_path / "cache"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(REPO, "examples/data/tokenizer"),
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--save", str(save),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("iteration")]
    assert len(lines) == 3, proc.stdout[-3000:]
    assert "iteration        3/       3" in lines[-1] and "lm loss:" in lines[-1] and "MFU: n/a" in lines[-1]
    assert "validation loss at iteration 2" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    # the benchmarks read losses back from such logs (bench_loss_parity, bench_sp_loss_curves)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_loss_parity import from_logs

    (tmp_path / "run.log").write_text(proc.stderr + proc.stdout)
    run = from_logs([str(tmp_path / "run.log")], ["cli"])["cli"]
    assert run["steps"] == [1, 2, 3] and len(run["loss"]) == len(run["grad_norm"]) == 3, run


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# bad inputs: a one-line error and a non-zero exit


def _cli_error(args, tmp_path, world_env=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # a one-process group started by an earlier test in this process holds its MASTER_PORT
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([PYTHON, os.path.join(REPO, "pretrain_linear_lm.py")] + args, capture_output=True,
                          text=True, timeout=180, env=env, cwd=str(tmp_path))
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    return proc.returncode, errors, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--mock-data", "--data-path", "x"], "either --data-path or --mock-data"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size (3) must be divisible"),
        # a model-config error (it names config fields), printed with the flags
        (["--attention-norm-group-size", "3"], "--attention-norm-group-size (3) must be positive and divide"),
    ],
    ids=["data-and-mock", "batch-not-divisible", "config-error-names-flags"],
)
def test_cli_bad_inputs_exit_with_one_line(extra, needle, tmp_path):
    base = ["--model-preset", "tiny", "--seq-length", "64", "--train-iters", "2"]
    if "--data-path" not in extra:
        base.append("--mock-data")
    code, errors, tail = _cli_error(base + extra, tmp_path)
    assert code == 2, tail
    assert len(errors) == 1 and needle in errors[0], errors


@pytest.mark.parametrize(
    "argv, world, needle",
    [
        (["--seq-length", "64", "--train-iters", "2"], None, "no training data"),
        (["--data-path", "/nonexistent/corpus", "--tokenizer-type", "ByteLevelTokenizer", "--seq-length", "64",
          "--train-iters", "2"], None, "/nonexistent/corpus.bin not found"),
        (["--mock-data", "--seq-length", "64", "--train-iters", "2", "--tensor-model-parallel-size", "2"], 3,
         "world size 3 is not divisible"),
        (["--mock-data", "--seq-length", "66", "--train-iters", "2", "--sequence-parallel-size", "4"], 4,
         "--seq-length (66) must be divisible"),
        (["--mock-data", "--seq-length", "64", "--train-iters", "2", "--context-parallel-size", "2",
          "--sequence-parallel-mode", "ulysses", "--num-attention-heads", "3"], 2, "heads per tensor-parallel rank"),
        (["--mock-data", "--seq-length", "64", "--train-iters", "2", "--ddp-impl", "megatron"], None, "needs CUDA"),
        (["--mock-data", "--seq-length", "64", "--train-iters", "2", "--lr-warmup-iters", "2"], None,
         "--lr-warmup-iters (2) must be in"),
        (["--mock-data", "--seq-length", "64", "--train-iters", "2", "--tensorboard-dir", "tb"], None, "tensorboard"),
    ],
    ids=["no-data", "missing-files", "sizes-world", "seq-sp", "ulysses-heads", "megatron-ddp-cpu", "warmup",
         "tensorboard"],
)
def test_argument_validation_names_the_flag(argv, world, needle, capsys):
    from megatron_lasp.training.arguments import parse_args

    if "tensorboard" in needle:
        from megatron_lasp.training.logging_utils import tensorboard_available

        if tensorboard_available():
            pytest.skip("tensorboard is installed")
    with pytest.raises(SystemExit) as info:
        parse_args(["--model-preset", "tiny"] + argv, world_size=world)
    assert info.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], errors


def test_unknown_mode_is_rejected(capsys):
    from megatron_lasp.training.arguments import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--mock-data", "--seq-length", "64", "--train-iters", "2", "--sequence-parallel-mode", "ring"])
    assert info.value.code == 2
    assert "invalid choice: 'ring'" in capsys.readouterr().err


def test_help_documents_every_flag():
    from megatron_lasp.training.arguments import build_parser

    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    text = parser.format_help()
    for flag in ("--sequence-parallel-mode", "--sequence-parallel-size", "--ddp-impl", "--use-distributed-optimizer",
                 "--kernel-backend", "--model-preset", "--data-path", "--save", "--load", "--peak-flops"):
        assert flag in text


def test_data_path_blend_parsing():
    from megatron_lasp.training.arguments import ArgumentError, parse_data_path

    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ArgumentError):
        parse_data_path(["0.3", "a", "b"])


def _measured_flops(rank, world_size):
    """FLOPs per token of a tiny model's training step, counted by torch on the ops it runs; and the
    backward's extra FLOPs under full and selective (``core_attn``) recompute."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel
    from megatron_lasp.training.logging_utils import flops_per_token, recompute_flops_per_token

    initialize_parallel(1, 1, 1, seed=0)
    ids, labels = torch.randint(0, 128, (2, 128)), torch.randint(0, 128, (2, 128))
    tokens = ids.numel()

    def counted(**recompute):
        config = linear_lm_config("tiny", use_cpu_initialization=True, kernel_backend="torch", **recompute)
        torch.manual_seed(0)
        model = build_linear_lm(config, 128)
        with FlopCounterMode(display=False) as fwd:
            loss = model(ids, labels=labels)
        with FlopCounterMode(display=False) as bwd:
            loss.sum().backward()
        return config, fwd.get_flop_counts()["Global"], bwd.get_flop_counts()["Global"]

    config, fwd_counts, bwd_counts = counted()
    mm, bmm = torch.ops.aten.mm, torch.ops.aten.bmm
    out = dict(
        formula=flops_per_token(config, 128),
        weights_fwd=fwd_counts[mm] / tokens,  # the linear layers (2-d matmuls)
        weights_bwd=bwd_counts[mm] / tokens,
        attention_fwd=fwd_counts[bmm] / tokens,  # the chunked attention (batched matmuls)
        none_extra=recompute_flops_per_token(config),
    )
    plain_bwd = sum(bwd_counts.values())
    for name, recompute in (("full", dict(recompute_granularity="full", recompute_method="uniform",
                                          recompute_num_layers=1)),
                            ("core_attn", dict(recompute_granularity="selective", recompute_modules=["core_attn"]))):
        config, _, bwd_counts = counted(**recompute)
        out[f"{name}_counted_extra"] = (sum(bwd_counts.values()) - plain_bwd) / tokens
        out[f"{name}_extra"] = recompute_flops_per_token(config)
    return out


def test_flops_formula_matches_counted_flops():
    """The MFU formula against torch's FLOP counter: weights 6 per parameter (backward = twice the
    forward, as counted), attention counted as 3 x its forward (the formula's convention); and the
    work a recompute adds (for the HFU) against what the backward counts more under it."""
    m = spawn(_measured_flops, 1)[0]
    assert m["weights_fwd"] > 0 and m["attention_fwd"] > 0
    assert m["weights_bwd"] == 2 * m["weights_fwd"]
    assert m["formula"] == m["weights_fwd"] + m["weights_bwd"] + 3 * m["attention_fwd"]
    assert m["none_extra"] == 0
    # full recompute reruns each layer's forward (all but the output layer's matmul); selective
    # core_attn the attention only
    assert m["full_counted_extra"] > m["core_attn_counted_extra"] > 0, m
    assert m["full_extra"] == m["full_counted_extra"], m
    assert m["core_attn_extra"] == m["core_attn_counted_extra"], m


def _pipeline_staged(rank, world_size):
    """PP = 2 with megatron-core's own point-to-point, then through its ``use_ring_exchange_p2p``
    hook with every exchange staged through host memory (what gloo + CUDA takes, forced here)."""
    import torch.distributed as dist

    from megatron_lasp.parallel import comm, state

    extra = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--train-iters", "3"]
    plain = _run_configs(rank, world_size, [extra])[0]
    calls = []

    def traced(**kwargs):
        calls.append(sorted(k for k, v in kwargs.items() if v is not None))
        return comm.ring_exchange(**kwargs)

    comm.staged_p2p = lambda x, group: True
    state.pipeline_p2p_staged = lambda groups: groups.pp.size() > 1
    dist.ring_exchange = traced
    staged = _run_configs(rank, world_size, [extra])[0]
    return plain, staged, len(calls)


def test_pipeline_exchange_staged_through_host_memory():
    for rank, (plain, staged, calls) in enumerate(spawn(_pipeline_staged, 2, (), timeout=420)):
        _assert_losses_equal(staged, plain, f"rank {rank}: PP=2 staged")
        assert calls > 0, "megatron-core did not call ring_exchange"
