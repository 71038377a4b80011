"""Checkpoints (``megatron_lasp.checkpoint``): exact resume, layout, resharding, safety.

One 2-rank spawn runs the save/resume scenarios in sequence (the process groups are re-created
between runs); the parent checks files and loads the results on a single process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from megatron_lasp.testing import spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "4", "--lr", "3e-3", "--lr-warmup-iters", "1",
    "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--seed", "11",
    "--make-vocab-size-divisible-by", "64",
]


def _scenarios(rank, world_size, root):
    from megatron_lasp.training import main

    def run(*extra):
        return list(main(BASE + list(extra), destroy=False).losses)

    out = {}
    sp2 = ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp"]
    # saving at iteration 2 must not disturb the run (it is compared with a resumed one below)
    out["full"] = run(*sp2, "--save", f"{root}/full", "--save-interval", "2")
    out["part"] = run(*sp2, "--save", f"{root}/part", "--save-interval", "2", "--exit-interval", "2")
    if rank == 0:  # a crash in the middle of saving iteration 4 left a partial directory behind
        os.makedirs(f"{root}/part/iter_0000004.tmp")
        with open(f"{root}/part/iter_0000004.tmp/junk", "w") as f:
            f.write("partial")
    out["resumed"] = run(*sp2, "--load", f"{root}/part", "--save", f"{root}/part")
    # the SP=2 checkpoint of iteration 2, optimizer included, resumed at TP=2
    out["resumed_tp2"] = run("--tensor-model-parallel-size", "2", "--sequence-parallel", "--load", f"{root}/part",
                             "--ckpt-step", "2", "--save", f"{root}/tp2")
    fsdp = ["--ddp-impl", "fsdp"]
    out["fsdp_full"] = run(*fsdp, "--save", f"{root}/fsdp_full", "--save-interval", "2")
    run(*fsdp, "--save", f"{root}/fsdp", "--save-interval", "2", "--exit-interval", "2")
    out["fsdp_resumed"] = run(*fsdp, "--load", f"{root}/fsdp")
    return out


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    results = spawn(_scenarios, 2, (str(root),), timeout=600)
    assert results[0] == results[1], "ranks disagree on the losses"
    return root, results[0]


def test_resume_is_exact(scenarios):
    _, r = scenarios
    assert len(r["full"]) == 4 and all(math.isfinite(x) for x in r["full"])
    assert r["part"] == r["full"][:2]
    assert r["resumed"] == r["full"][2:], (r["resumed"], r["full"])
    assert r["fsdp_resumed"] == r["fsdp_full"][2:], (r["fsdp_resumed"], r["fsdp_full"])


def test_resume_with_other_layout_keeps_optimizer_state(scenarios):
    _, r = scenarios
    # TP=2 sums in another order than SP=2: equal up to fp32 rounding, not bitwise
    for got, want in zip(r["resumed_tp2"], r["full"][2:]):
        assert abs(got - want) <= 2e-5 * abs(want), (r["resumed_tp2"], r["full"])
    assert len(r["resumed_tp2"]) == 2


def test_checkpoint_layout_is_megatron_like(scenarios):
    root, _ = scenarios
    part = root / "part"
    assert (part / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    names = sorted(os.listdir(part))
    assert names == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"], names
    ckpt = part / "iter_0000004"
    assert (ckpt / "metadata.json").is_file() and (ckpt / "common.pt").is_file()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["num_layers"] == 2 and config["model"]["hidden_size"] == 64
    assert config["padded_vocab_size"] == 128 and config["parallel"]["context_parallel_size"] == 2
    args = json.loads((ckpt / "args.json").read_text())
    assert args["seq_length"] == 64 and args["sequence_parallel_mode"] == "lasp"


def _inference_weights(rank, world_size, dirs):
    import torch

    from megatron_lasp.checkpoint.io import load_model_for_inference

    out = []
    for d in dirs:
        model, config, saved = load_model_for_inference(d)
        tokens = torch.randint(0, 128, (2, 32))
        with torch.no_grad():
            loss = model(tokens, labels=tokens.roll(-1, 1))
        out.append(({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                    float(loss.mean()), config.num_layers, saved["parallel"]["tensor_model_parallel_size"]))
    return out


def test_load_model_for_inference_reshards(scenarios):
    """The SP=2 and the TP=2 run of the same training load at TP=1 to the same weights."""
    import torch

    root, _ = scenarios
    (results,) = spawn(_inference_weights, 1, ([str(root / "full"), str(root / "tp2")],))
    (w_sp, loss_sp, layers, tp_a), (w_tp, loss_tp, _, tp_b) = results
    assert (layers, tp_a, tp_b) == (2, 1, 2)
    assert math.isfinite(loss_sp) and math.isfinite(loss_tp)
    assert w_sp.keys() == w_tp.keys() and len(w_sp) > 5
    for key in w_sp:
        torch.testing.assert_close(w_tp[key], w_sp[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(w_sp["embedding.word_embeddings.weight"], torch.zeros_like(w_sp["embedding.word_embeddings.weight"]))


def test_architecture_mismatch_is_one_line(scenarios, tmp_path):
    root, _ = scenarios
    cmd = [sys.executable, os.path.join(REPO, "pretrain_linear_lm.py")] + BASE + [
        "--num-layers", "3", "--load", str(root / "full")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), cwd=str(tmp_path))
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2
    assert len(errors) == 1 and "num_layers=2" in errors[0] and "num_layers=3" in errors[0], errors


def _nan_run(rank, world_size, root):
    from megatron_lasp.training import TrainingError, main

    try:
        main(BASE + ["--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad", "0", "--save", root,
                     "--save-interval", "1"], destroy=False)
    except TrainingError as err:
        return str(err)
    return None


def test_non_finite_loss_stops_before_saving(tmp_path):
    root = tmp_path / "nan"
    (message,) = spawn(_nan_run, 1, (str(root),))
    assert message is not None and "iteration" in message and ("nan" in message or "inf" in message), message
    bad = int(message.split("iteration ")[1].split(":")[0])
    assert bad >= 2
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(bad - 1)
    assert not (root / f"iter_{bad:07d}").exists()


# ----------------------------------------------------------------------------------------------
# recompute settings say how to run, not what the model is


RECOMPUTE_OLD_CONFIG = {  # what config.json's "model" held of them before they were runtime fields
    "recompute_elementwise": True, "recompute_chunk_size": 0, "offload_layer_inputs": False,
    "fused_linear_cross_entropy": True, "cross_entropy_chunk_size": 0, "fusion": None,
}


def _recompute_runs(rank, world_size, root):
    from megatron_lasp.training import main

    short = BASE + ["--eval-interval", "0"]
    selective = ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "elementwise"]
    chunked = ["--recompute-granularity", "full", "--recompute-chunk-size", "16"]
    out = {"plain": list(main(short, destroy=False).losses)}
    sel = f"{root}/sel"
    out["selective"] = list(main(short + selective + ["--save", sel, "--save-interval", "2", "--exit-interval", "2"],
                                 destroy=False).losses)
    # iteration 2 as a checkpoint written before the fix holds it (recompute_elementwise without its granularity)
    path = os.path.join(sel, "iter_0000002", "config.json")
    with open(path) as f:
        config = json.load(f)
    assert "recompute_elementwise" not in config["model"] and "recompute_chunk_size" not in config["model"], config
    config["model"].update(RECOMPUTE_OLD_CONFIG)
    with open(path, "w") as f:
        json.dump(config, f)
    # resumed with another recompute: the same math, so the run goes on as without recompute
    out["chunked_resumed"] = list(main(short + chunked + ["--load", sel, "--save", sel], destroy=False).losses)
    return out


def _inference_and_export(rank, world_size, root):
    from megatron_lasp.hf.to_hf import convert_checkpoint_to_hf
    from megatron_lasp.checkpoint.io import load_model_for_inference

    out = {}
    for iteration in (2, 4):
        model, config, saved = load_model_for_inference(f"{root}/sel", iteration, device="cpu")
        out[iteration] = (config.recompute_granularity, config.recompute_elementwise, config.recompute_chunk_size,
                          sorted(saved["model"]))
        convert_checkpoint_to_hf(f"{root}/sel", f"{root}/hf{iteration}", iteration=iteration)
    return out


def test_recompute_settings_are_runtime_fields(tmp_path):
    """A checkpoint trained with selective elementwise or chunked recompute resumes with another
    recompute setting (the same losses), loads for inference and exports to HF; so does one whose
    config.json still records those settings."""
    (r,) = spawn(_recompute_runs, 1, (str(tmp_path),), timeout=300)
    assert len(r["plain"]) == 4 and all(math.isfinite(x) for x in r["plain"])
    for got, want in zip(r["selective"] + r["chunked_resumed"], r["plain"]):
        assert abs(got - want) <= 1e-5 * abs(want), (r, "recompute changed the losses")
    assert len(r["selective"]) == 2 and len(r["chunked_resumed"]) == 2
    config = json.loads((tmp_path / "sel" / "iter_0000004" / "config.json").read_text())
    assert not set(config["model"]) & set(RECOMPUTE_OLD_CONFIG), config["model"]
    (loaded,) = spawn(_inference_and_export, 1, (str(tmp_path),), init_process_group=False, timeout=300)
    for iteration in (2, 4):
        granularity, elementwise, chunk, fields = loaded[iteration]
        assert (granularity, elementwise, chunk) == (None, False, 0), loaded
        assert not set(fields) & set(RECOMPUTE_OLD_CONFIG), fields
        hf = json.loads((tmp_path / f"hf{iteration}" / "config.json").read_text())
        assert hf["num_hidden_layers"] == 2 and not set(hf["megatron_lasp"]["model"]) & set(RECOMPUTE_OLD_CONFIG)
        assert (tmp_path / f"hf{iteration}" / "model.safetensors").is_file()


def test_architecture_check_names_the_flag(tmp_path):
    """A changed field names its flag (arguments.flag_of_field); runtime fields, even recorded, are not compared."""
    from megatron_lasp.data.tokenizer import TokenizerSettings
    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.checkpoint.layout import CheckpointError
    from megatron_lasp.checkpoint.record import RunRecord, check_architecture, config_dict
    from megatron_lasp.training.checkpointing import FIELD_NAMES

    run = RunRecord(vocab_size_tokenizer=100, padded_vocab_size=128, seq_length=64,
                    tokenizer=TokenizerSettings("NullTokenizer", vocab_size=100))
    config = linear_lm_config("tiny", use_cpu_initialization=True)

    def check(**saved_fields):
        saved = config_dict(config, run)
        saved["padded_vocab_size"] = saved_fields.pop("padded_vocab_size", 128)
        saved["model"].update(saved_fields)
        (tmp_path / "iter_0000001").mkdir(exist_ok=True)
        (tmp_path / "iter_0000001" / "config.json").write_text(json.dumps(saved))
        try:
            check_architecture(str(tmp_path), run, config, FIELD_NAMES, 1)
        except CheckpointError as err:
            return str(err)
        return None

    assert check() is None
    assert check(**RECOMPUTE_OLD_CONFIG, recompute_granularity="selective", kernel_backend="triton",
                 hidden_dropout=0.1) is None
    assert check(linear_attention_gate="gla").endswith("change --linear-attention-gate to match")
    gated = config
    config = linear_lm_config("tiny", use_cpu_initialization=True, linear_attention_gate="mamba2")
    assert check() is None
    assert check(linear_attention_gate="none").endswith("change --linear-attention-gate to match")
    # a checkpoint from before the gate existed records no gate: its model had none
    (tmp_path / "iter_0000001" / "config.json").write_text(json.dumps(dict(
        json.loads((tmp_path / "iter_0000001" / "config.json").read_text()),
        model={k: v for k, v in config_dict(gated, run)["model"].items()
               if k not in ("linear_attention_gate", "gate_logit_normalizer")})))
    with pytest.raises(CheckpointError, match="checkpoint has linear_attention_gate=none but this run has "
                                              "linear_attention_gate=mamba2"):
        check_architecture(str(tmp_path), run, config, FIELD_NAMES, 1)
    config = gated
    assert check(num_layers=3).endswith("checkpoint has num_layers=3 but this run has num_layers=2; change --num-layers to match")
    assert check(kv_channels=8).endswith("change --kv-channels to match")
    assert check(output_gate=False).endswith("output_gate=True; change --no-output-gate to match")
    assert check(decay_type="alibi").endswith("change --decay-type to match")
    assert check(padded_vocab_size=256).endswith("change vocabulary size (tokenizer / --vocab-size / "
                                                 "--make-vocab-size-divisible-by) to match")
    assert check(add_bias_linear=True).endswith("change --add-bias-linear / --disable-bias-linear to match")
    assert check(layernorm_epsilon=1e-6).endswith("this run builds another model than the checkpoint's")
