"""The gated linear-attention layer (``linear_attention_gate`` mamba2 / gla) in the model.

- the gate's math and its published init (``models/gate.py``);
- a gate fixed at ``g = -slope`` per head gives the fixed-decay model bit for bit (the wiring);
- sharded runs (TP with and without TP sequence parallelism, the sequence-parallel modes) and the
  recompute options equal the single-process run, loss and every gradient (gate included);
- the flags, the config rules, the presets and the FLOP count.
"""

from __future__ import annotations

import math
import traceback
from typing import Dict

import pytest
import torch

from megatron_lasp.testing import spawn

VOCAB, BATCH, SEQ, SEED = 128, 2, 32, 4321
TOL = 2e-5  # relative error of fp32 round-off; a wrong gate, shard or state hop is >> 1e-3
GATES = ("mamba2", "gla")


def _config(gate: str, **overrides):
    from megatron_lasp.models import linear_lm_config

    return linear_lm_config("tiny", linear_attention_gate=gate, use_cpu_initialization=True, **overrides)


def _batch():
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


# ---------------------------------------------------------------------------------------------
# single rank (megatron-core's parallel state at size 1)


def _single(rank, world_size):
    import torch.nn.functional as F

    from megatron_lasp.models import build_linear_lm, layer_slopes
    from megatron_lasp.models.gate import MAMBA2_A_RANGE, MAMBA2_DT_FLOOR, MAMBA2_DT_RANGE, mamba2_gate_init
    from megatron_lasp.parallel import initialize_parallel
    from megatron_lasp.training.logging_utils import flops_per_token
    from model_utils import rel_err

    torch.set_num_threads(1)
    initialize_parallel(1, 1, 1, seed=SEED)
    out: Dict = {}
    try:
        # published init: A ~ U(1, 16), softplus(dt_bias) ~ logU(1e-3, 1e-1) floored at 1e-4
        a_log, dt_bias = mamba2_gate_init(4096)
        a, dt = a_log.double().exp(), F.softplus(dt_bias.double())
        out["a_range"] = (a.min().item(), a.max().item(), a.mean().item())
        out["dt_range"] = (dt.min().item(), dt.max().item(), dt.log().mean().item())
        out["dt_floor_ok"] = bool((dt >= MAMBA2_DT_FLOOR * (1 - 1e-6)).all())
        out["expected"] = dict(a=MAMBA2_A_RANGE, dt=MAMBA2_DT_RANGE)

        ids, labels = _batch()
        for gate in GATES:
            torch.manual_seed(SEED)
            model = build_linear_lm(_config(gate), VOCAB)
            attn = model.decoder.layers[0].self_attention
            x = torch.randn(SEQ, BATCH, 64)
            g = attn.gate(x)
            raw = x @ attn.gate.linear.weight.t()
            if gate == "mamba2":
                want = -attn.gate.A_log.exp() * F.softplus(raw + attn.gate.dt_bias)
            else:
                want = F.logsigmoid(raw + attn.gate.linear.bias) / 16.0
                out["gla_bias_zero"] = bool((attn.gate.linear.bias == 0).all())
            out[f"{gate}_gate_err"] = rel_err(g, want)
            out[f"{gate}_gate_shape"] = tuple(g.shape)
            out[f"{gate}_gate_nonpositive"] = bool((g <= 0).all())
            # gradients reach every gate parameter
            model(ids, labels=labels).float().mean().backward()
            out[f"{gate}_gate_grads"] = {n: p.grad.norm().item() for n, p in model.named_parameters() if ".gate." in n}
            out[f"{gate}_flops"] = flops_per_token(model.config, VOCAB)

        # a Mamba2 gate pinned to g = -slope (W_dt = 0, softplus(dt_bias) = 1, A = slope) is the
        # fixed-decay model: same logits and same gradients of the shared weights, bit for bit
        torch.manual_seed(SEED)
        fixed = build_linear_lm(_config("none"), VOCAB)
        torch.manual_seed(SEED)
        gated = build_linear_lm(_config("mamba2"), VOCAB)
        missing, unexpected = gated.load_state_dict(fixed.state_dict(), strict=False)
        out["pinned_missing"] = sorted(missing)
        out["pinned_unexpected"] = sorted(unexpected)
        one = math.log(math.expm1(1.0))  # softplus^-1(1)
        with torch.no_grad():
            for i, layer in enumerate(gated.decoder.layers):
                gate = layer.self_attention.gate
                gate.linear.weight.zero_()
                gate.dt_bias.fill_(one)
                gate.A_log.copy_(layer_slopes(gated.config, i + 1).log())
        lf = fixed(ids, labels=labels).float()
        lg = gated(ids, labels=labels).float()
        out["pinned_loss_err"] = rel_err(lg, lf)
        lf.mean().backward()
        lg.mean().backward()
        grads_f = dict(fixed.named_parameters())
        out["pinned_grad_err"] = max(rel_err(p.grad, grads_f[n].grad) for n, p in gated.named_parameters()
                                     if n in grads_f)
        out["flops_none"] = flops_per_token(fixed.config, VOCAB)
    except Exception:
        out["error"] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def single():
    out = spawn(_single, 1)[0]
    assert "error" not in out, out["error"]
    return out


def test_mamba2_init_follows_the_published_recipe(single):
    (a_lo, a_hi), (dt_lo, dt_hi) = single["expected"]["a"], single["expected"]["dt"]
    amin, amax, amean = single["a_range"]
    assert a_lo <= amin < a_lo + 0.1 and a_hi - 0.1 < amax <= a_hi, single["a_range"]
    assert abs(amean - (a_lo + a_hi) / 2) < 0.5, "A is uniform in [1, 16]"
    dmin, dmax, dlogmean = single["dt_range"]
    assert dt_lo * 0.999 <= dmin < dt_lo * 1.1 and dt_hi * 0.9 < dmax <= dt_hi * 1.001, single["dt_range"]
    # log-uniform: the mean of log dt is the midpoint of the log range
    assert abs(dlogmean - (math.log(dt_lo) + math.log(dt_hi)) / 2) < 0.1
    assert single["dt_floor_ok"]


@pytest.mark.parametrize("gate", GATES)
def test_gate_math_and_gradients(single, gate):
    assert single[f"{gate}_gate_err"] < 1e-6
    assert single[f"{gate}_gate_shape"] == (SEQ, BATCH, 4)
    assert single[f"{gate}_gate_nonpositive"]
    grads = single[f"{gate}_gate_grads"]
    names = {n.rsplit(".", 1)[-1] for n in grads}
    assert names == ({"A_log", "dt_bias", "weight"} if gate == "mamba2" else {"weight", "bias"}), grads
    assert all(v > 0 and math.isfinite(v) for v in grads.values()), grads
    if gate == "gla":
        assert single["gla_bias_zero"]


def test_pinned_gate_is_the_fixed_decay_model(single):
    assert single["pinned_unexpected"] == []
    assert all(".gate." in n for n in single["pinned_missing"]) and len(single["pinned_missing"]) == 6
    assert single["pinned_loss_err"] < 1e-6, single["pinned_loss_err"]
    assert single["pinned_grad_err"] < 1e-5, single["pinned_grad_err"]


def test_flops_count_the_gate_projection(single):
    # tiny: 2 layers, hidden 64, 4 heads; the projection h x H, 6 FLOPs per weight and token
    for gate in GATES:
        assert single[f"{gate}_flops"] - single["flops_none"] == 6 * 2 * 64 * 4


# ---------------------------------------------------------------------------------------------
# sharded runs against the single-process run

LAYOUTS = [  # (id, tp, sp, mode, tp sequence parallel, extra config)
    ("tp2", 2, 1, "lasp", False, {}),
    ("tp2-tpsp", 2, 1, "lasp", True, {}),
    ("tp2-tpsp-recompute-selective", 2, 1, "lasp", True, dict(recompute_granularity="selective")),
    ("tp1-recompute-full", 1, 1, "lasp", False,
     dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    ("tp1-recompute-chunked", 1, 1, "lasp", False, dict(recompute_chunk_size=8)),
    ("tp1-recompute-elementwise", 1, 1, "lasp", False,
     dict(recompute_granularity="selective", recompute_elementwise=True)),
    # the gates under sequence parallelism: every mode, and the chunked recompute under lasp
    ("sp2-lasp", 1, 2, "lasp", False, {}),
    ("sp2-lasp2", 1, 2, "lasp2", False, {}),
    ("sp2-ulysses", 1, 2, "ulysses", False, {}),
    ("sp2-allgather", 1, 2, "allgather", False, {}),
    ("sp2-lasp-recompute-chunked", 1, 2, "lasp", False, dict(recompute_chunk_size=8)),
]


def _sharded(rank, world_size, gate, layouts):
    from model_utils import sharded_against_one_rank

    ids, labels = _batch()
    return sharded_against_one_rank(world_size, layouts, lambda **f: _config(gate, **f), VOCAB, SEED, ids, labels,
                                    "decoder.layers.1.self_attention.gate.")


@pytest.fixture(scope="module", params=GATES)
def sharded(request):
    per_rank = spawn(_sharded, 2, args=(request.param, LAYOUTS), timeout=600)
    return request.param, per_rank


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l[0])
def test_sharded_gated_equals_single_process(sharded, layout):
    gate, per_rank = sharded
    for results in per_rank:
        r = results[layout[0]]
        assert "error" not in r, r["error"]
        assert r["init_err"] == 0.0, "a TP shard of the gate is not a slice of the TP=1 init"
        assert r["loss_err"] < TOL, r
        assert r["grad_err"] < TOL, r
        assert sum(".gate." in n for n in r["grad_errs"]) == (6 if gate == "mamba2" else 4)
        # the gate's checkpoint entries: layers stacked, heads sharded over TP
        tp, rank = layout[1], r["tp_rank"]
        for name, (shape, offset) in r["meta"].items():
            if name in ("A_log", "dt_bias", "linear.bias"):
                assert shape == (2, 4) and offset == (1, rank * 4 // tp), (name, shape, offset)
            else:
                assert shape == (2, 4, 64) and offset == (1, rank * 4 // tp, 0), (name, shape, offset)


def _gpu_path_in_interpreter(rank, world_size):
    """The GPU path (fused elementwise kernels, Triton gated attention) in Triton's CPU interpreter
    against the plain PyTorch path: loss and every gradient (fp32)."""
    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.parallel import initialize_parallel
    from model_utils import rel_err

    initialize_parallel(1, 1, 1, seed=SEED)
    ids, labels = _batch()
    runs = {}
    for name, extra in (("plain", dict(fusion=False, kernel_backend="torch")),
                        ("gpu-path", dict(fusion=True, kernel_backend="triton", recompute_granularity="selective",
                                          recompute_elementwise=True))):
        torch.manual_seed(SEED)
        model = build_linear_lm(_config("mamba2", **extra), VOCAB)
        loss = model(ids[:1], labels=labels[:1]).float().mean()
        loss.backward()
        runs[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (l0, g0), (l1, g1) = runs["plain"], runs["gpu-path"]
    return rel_err(l1, l0), max(rel_err(g1[n], g0[n]) for n in g0)


def test_gated_gpu_path_in_the_triton_interpreter():
    loss_err, grad_err = spawn(_gpu_path_in_interpreter, 1, env={"TRITON_INTERPRET": "1"}, timeout=400)[0]
    assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)


# ---------------------------------------------------------------------------------------------
# config rules and flags


def test_config_rules_and_presets():
    from megatron_lasp.models import PRESETS, linear_lm_config

    assert linear_lm_config("tiny").linear_attention_gate == "none" and not linear_lm_config("tiny").gated
    assert linear_lm_config("tnl-1b-mamba2").linear_attention_gate == "mamba2"
    assert linear_lm_config("tnl-1b-gla").linear_attention_gate == "gla"
    base = PRESETS["tnl-1b"].fields
    for name in ("tnl-1b-mamba2", "tnl-1b-gla"):
        assert {k: v for k, v in PRESETS[name].fields.items() if k != "linear_attention_gate"} == base
    with pytest.raises(ValueError, match="linear_attention_gate must be one of none, mamba2, gla"):
        linear_lm_config("tiny", linear_attention_gate="retnet")
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        linear_lm_config("tiny", linear_attention_gate="gla", gate_logit_normalizer=0.0)


def test_flags():
    from megatron_lasp.training.arguments import ArgumentError, flag_of_field, parse_config

    base = ["--model-preset", "tiny", "--seq-length", "32", "--train-iters", "1", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--mock-data"]
    run = parse_config(base + ["--linear-attention-gate", "gla", "--gate-logit-normalizer", "8"])
    assert run.model.overrides()["linear_attention_gate"] == "gla"
    assert run.model.overrides()["gate_logit_normalizer"] == 8.0
    assert parse_config(base + ["--model-preset", "tnl-1b-gla", "--gate-logit-normalizer", "8"])
    with pytest.raises(ArgumentError, match="drop --decay-type"):
        parse_config(base + ["--linear-attention-gate", "mamba2", "--decay-type", "alibi"])
    with pytest.raises(ArgumentError, match="--gate-logit-normalizer is read by --linear-attention-gate gla"):
        parse_config(base + ["--linear-attention-gate", "mamba2", "--gate-logit-normalizer", "8"])
    with pytest.raises(ArgumentError, match="--gate-logit-normalizer"):
        parse_config(base + ["--linear-attention-gate", "gla", "--gate-logit-normalizer", "-1"])
    assert flag_of_field("linear_attention_gate") == "--linear-attention-gate"


# ---------------------------------------------------------------------------------------------
# training through the loop: layouts, checkpoints (the gate is part of the recorded architecture)

TRAIN = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "1",
    "--log-interval", "2", "--eval-interval", "0", "--seed", "7", "--make-vocab-size-divisible-by", "64",
]


def _train(rank, world_size, configs):
    """``main(TRAIN + extra)`` per extra: the per-iteration losses, or the startup error's text."""
    from model_utils import train_losses

    return train_losses(rank, world_size, TRAIN, configs)


def test_gated_training_layouts_and_checkpoints(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    gate = ["--linear-attention-gate", "mamba2"]
    (single,) = spawn(_train, 1, ([gate + ["--save", ckpt, "--save-interval", "3"],
                                   gate + ["--load", ckpt, "--finetune", "--train-iters", "2"],
                                   ["--linear-attention-gate", "gla", "--load", ckpt],
                                   ["--load", ckpt]],), timeout=300)
    want, resumed, other_gate, no_gate = single
    assert all(math.isfinite(x) for x in want) and len(set(want)) == 3, want
    assert all(math.isfinite(x) for x in resumed), resumed
    for refused in (other_gate, no_gate):
        assert isinstance(refused, str) and "linear_attention_gate=mamba2" in refused, refused
        assert "--linear-attention-gate" in refused, refused
    configs = {
        "dp2-torch": gate + ["--ddp-impl", "torch"],
        "dp2-fsdp": gate + ["--ddp-impl", "fsdp"],
        "tp2-sp": gate + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "sp2-lasp": gate + ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp"],
        "sp2-lasp2": gate + ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp2"],
        "sp2-lasp-chunked": gate + ["--sequence-parallel-size", "2", "--recompute-granularity", "full",
                                    "--recompute-chunk-size", "16"],
    }
    for rank_losses in spawn(_train, 2, (list(configs.values()),), timeout=600):
        for name, losses in zip(configs, rank_losses):
            assert len(losses) == len(want), (name, losses)
            for g, w in zip(losses, want):
                assert abs(g - w) <= 2e-5 * abs(w), (name, losses, want)


# ---------------------------------------------------------------------------------------------
# GPU (the lead's machine): a TNL-1B-width gated model trains in bf16 on the default path


def _train_gpu(rank, world_size, gate):
    from megatron_lasp.training import main

    base = ["--model-preset", "tnl-1b", "--num-layers", "2", "--linear-attention-gate", gate, "--mock-data",
            "--seq-length", "8192", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "8",
            "--seed", "7", "--lr", "3e-4", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0",
            "--bf16", "--ddp-impl", "megatron", "--use-distributed-optimizer"]
    plain = main(base, destroy=False)
    recompute = ["--train-iters", "3", "--recompute-granularity", "full"]
    full = main(base + recompute, destroy=False)
    chunked = main(base + recompute + ["--recompute-chunk-size", "3000"], destroy=False)
    return {"loss": plain.losses, "grad_norm": plain.grad_norms, "full": full.losses, "chunked": chunked.losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gate", GATES)
def test_gated_tnl1b_width_trains_in_bf16(gate):
    """Triton gated kernels, fused elementwise kernels, megatron-core DDP + distributed optimizer:
    finite, falling loss; the chunked recompute (the state carried chunk to chunk with the gate)
    gives the full recompute's first loss to bf16 accuracy."""
    record = spawn(_train_gpu, 1, (gate,), timeout=900, init_process_group=False)[0]
    losses = record["loss"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses + record["grad_norm"]), record
    assert losses[-1] < losses[0] - 0.5, record
    assert abs(record["chunked"][0] - record["full"][0]) <= 5e-3 * abs(record["full"][0]), record
    assert all(abs(c - f) <= 5e-2 * abs(f) for c, f in zip(record["chunked"], record["full"])), record
