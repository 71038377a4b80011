"""Gated DeltaNet layers (``--linear-attention-type gated_delta_net``, ``models/delta_net.py``).

- the layer against a plain PyTorch reference written here from the math (projection, causal
  convolution token by token, L2 norms, the delta rule token by token, norm x gate, projection),
  fp64: output and every parameter gradient, with GVA, packed documents and several kernel sizes;
  packed documents equal running each document on its own;
- sharded runs equal the single-process run, loss and every gradient: TP 2 (with and without TP
  sequence parallelism), the recompute options, and the sequence-parallel modes at SP 2 and 4 with
  packed documents crossing ranks (the convolution's halo, ``parallel/halo.py``); the checkpoint
  entries carry the TP sharding;
- the flags and config rules, the presets, the FLOP count against torch's FLOP counter;
- ``pretrain_linear_lm``'s loop trains the layer (loss falls) and resumes from a checkpoint bitwise.
"""

from __future__ import annotations

import math
import traceback
from typing import Dict

import pytest
import torch

from megatron_lasp.testing import spawn

VOCAB, BATCH, SEQ, SEED = 128, 2, 32, 4321
TOL = 2e-5  # relative error of fp32 round-off; a wrong shard, halo or state hop is >> 1e-3
GDN = dict(linear_attention_type="gated_delta_net")
# GVA (two value heads per key head), Dk != Dv: a mix-up of the parts or the heads shows
SHAPED = dict(GDN, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=16)


def _config(**overrides):
    from megatron_lasp.models import linear_lm_config

    fields = dict(SHAPED, use_cpu_initialization=True)
    fields.update(overrides)
    return linear_lm_config("tiny", **fields)


def _batch():
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _packed(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)


# documents over the BATCH x SEQ tokens: starts on and next to every rank boundary of SP 2 and 4
# (slices of 16 and 8 tokens), a length-1 document, and one that runs over two boundaries
DOC_STARTS = torch.tensor([0, 5, 8, 9, 16, 17, 18, 32, 40, 47, 48, 49, 64], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# the plain PyTorch reference


def reference_layer(attn, x: torch.Tensor, cu=None) -> torch.Tensor:
    """Gated DeltaNet from the module's (TP = 1) parameters, token by token: ``x [s, b, h]`` -> ``[s, b, h]``."""
    import torch.nn.functional as F

    c = attn.config
    Hk, Hv = c.linear_num_key_heads, c.linear_num_value_heads
    Dk, Dv, K = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim
    r = Hv // Hk
    s, b, _ = x.shape
    # the documents of each token: without cu_seqlens one per row
    doc = torch.zeros(s, b, dtype=torch.long)
    if cu is not None:
        flat = torch.arange(b * s).view(b, s).t()
        doc = torch.searchsorted(cu.long(), flat, right=True)
    doc = doc + 1000 * torch.arange(b).view(1, b)  # rows never share a document

    parts = (x @ attn.in_proj.weight.t()).view(s, b, Hk, -1)
    q, k, v, z, bb, a = parts.split([Dk, Dk, r * Dv, r * Dv, r, r], dim=-1)
    conv_in = torch.cat([q, k, v], dim=-1).reshape(s, b, -1)  # channels per key head: q, k, v
    w = attn.conv1d.weight[:, 0]  # [C, K], tap K - 1 on the current token
    conv = torch.zeros_like(conv_in)
    for t in range(s):
        for lag in range(K):
            if t - lag >= 0:
                same = (doc[t - lag] == doc[t]).to(x.dtype).view(b, 1)
                conv[t] = conv[t] + same * w[:, K - 1 - lag] * conv_in[t - lag]
    conv = F.silu(conv).view(s, b, Hk, -1)
    q, k, v = conv.split([Dk, Dk, r * Dv], dim=-1)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)  # value head j reads key head j // r
    v, z = v.reshape(s, b, Hv, Dv), z.reshape(s, b, Hv, Dv)
    beta = torch.sigmoid(bb.reshape(s, b, Hv))
    g = -torch.exp(attn.A_log) * F.softplus(a.reshape(s, b, Hv) + attn.dt_bias)
    outs = []
    S = x.new_zeros(b, Hv, Dk, Dv)
    for t in range(s):
        if t > 0:
            S = S * (doc[t] == doc[t - 1]).to(x.dtype).view(b, 1, 1, 1)
        kt, bt = k[t], beta[t].unsqueeze(-1)  # [b, Hv, Dk], [b, Hv, 1]
        S = torch.exp(g[t]).view(b, Hv, 1, 1) * (S - (bt * kt).unsqueeze(-1) * torch.einsum("bhk,bhkv->bhv", kt, S).unsqueeze(-2))
        S = S + (bt * kt).unsqueeze(-1) * v[t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[t] * Dk ** -0.5, S))
    o = torch.stack(outs)  # [s, b, Hv, Dv]
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + c.layernorm_epsilon) * attn.out_norm.weight * F.silu(z)
    return o.reshape(s, b, Hv * Dv) @ attn.out_proj.weight.t()


LAYER_CASES = {  # id -> config overrides, packed documents
    "H4-D16-k4": (dict(GDN), False),
    "gva-Hk2-Hv4-Dk12-Dv16-k4-docs": (dict(SHAPED), True),
    "gva-k2-docs": (dict(SHAPED, linear_conv_kernel_dim=2), True),
    "k1": (dict(GDN, linear_conv_kernel_dim=1), False),
}


def _layer_against_reference(rank, world_size, cases):
    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel
    from model_utils import rel_err

    torch.set_num_threads(1)
    initialize_parallel(1, 1, 1, seed=SEED)
    out: Dict = {}
    for name, (fields, docs) in cases.items():
        try:
            torch.manual_seed(SEED)
            config = linear_lm_config("tiny", use_cpu_initialization=True, params_dtype=torch.float64, **fields)
            attn = build_linear_lm(config, VOCAB).decoder.layers[0].self_attention
            gen = torch.Generator().manual_seed(SEED)
            with torch.no_grad():  # a non-trivial norm weight and decays that matter over 32 tokens
                attn.out_norm.weight.add_(0.3 * torch.randn(attn.out_norm.weight.shape, generator=gen, dtype=torch.float64))
            x = torch.randn(SEQ, BATCH, 64, generator=gen, dtype=torch.float64)
            dy = torch.randn(SEQ, BATCH, 64, generator=gen, dtype=torch.float64)
            cu = DOC_STARTS if docs else None
            kwargs = {} if cu is None else {"packed_seq_params": _packed(cu)}
            errs = {}
            params = dict(attn.named_parameters())
            xs = x.clone().requires_grad_(True)
            y, bias = attn(xs, **kwargs)
            torch.autograd.backward(y, dy)
            got = {n: p.grad.clone() for n, p in params.items()}
            got["x"] = xs.grad.clone()
            for p in params.values():
                p.grad = None
            xr = x.clone().requires_grad_(True)
            want = reference_layer(attn, xr, cu)
            torch.autograd.backward(want, dy)
            errs["out"] = rel_err(y, want)
            for n, p in params.items():
                errs[n] = rel_err(got[n], p.grad)
            errs["x"] = rel_err(got["x"], xr.grad)
            for p in params.values():
                p.grad = None
            res = {"errs": errs, "bias": bias is None, "names": sorted(params)}
            if cu is not None:
                # packed documents = each document run on its own (a row of one document)
                starts = cu.tolist()
                flat = x.transpose(0, 1).reshape(BATCH * SEQ, 64)
                dflat = dy.transpose(0, 1).reshape(BATCH * SEQ, 64)
                pieces, grads = [], {n: torch.zeros_like(p) for n, p in params.items()}
                for lo, hi in zip(starts[:-1], starts[1:]):
                    yd, _ = attn(flat[lo:hi].unsqueeze(1))
                    torch.autograd.backward(yd, dflat[lo:hi].unsqueeze(1))
                    pieces.append(yd[:, 0].detach())
                    for n, p in params.items():
                        grads[n] += p.grad
                        p.grad = None
                separate = torch.cat(pieces).view(BATCH, SEQ, 64).transpose(0, 1)
                res["separate_out"] = rel_err(y, separate)
                res["separate_grads"] = max(rel_err(got[n], grads[n]) for n in params)
            out[name] = res
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def layer_results():
    return spawn(_layer_against_reference, 1, args=(LAYER_CASES,), timeout=400)[0]


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_equals_the_token_by_token_reference(layer_results, case):
    r = layer_results[case]
    assert "error" not in r, r["error"]
    assert r["bias"]
    assert r["names"] == ["A_log", "conv1d.weight", "dt_bias", "in_proj.weight", "out_norm.weight", "out_proj.weight"]
    for name, err in r["errs"].items():
        assert err < 1e-10, (name, r["errs"])
    if LAYER_CASES[case][1]:
        assert r["separate_out"] < 1e-10 and r["separate_grads"] < 1e-10, r


# ---------------------------------------------------------------------------------------------
# sharded runs against the single-process run

LAYOUTS = [  # (id, tp, sp, mode, tp sequence parallel, extra config)
    ("tp2", 2, 1, "lasp", False, {}),
    ("tp2-tpsp", 2, 1, "lasp", True, {}),
    ("tp2-tpsp-recompute-selective", 2, 1, "lasp", True, dict(recompute_granularity="selective")),
    ("tp1-recompute-full", 1, 1, "lasp", False,
     dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    ("tp1-recompute-elementwise", 1, 1, "lasp", False,
     dict(recompute_granularity="selective", recompute_elementwise=True)),
]
SP_MODES = ("lasp", "lasp2", "ulysses", "allgather")
SP2_LAYOUTS = [(f"sp2-{m}", 1, 2, m, False, {}) for m in SP_MODES] + [
    ("sp2-lasp-recompute-selective", 1, 2, "lasp", False, dict(recompute_granularity="selective"))]
SP4_LAYOUTS = [(f"sp4-{m}", 1, 4, m, False, {}) for m in SP_MODES] + [
    ("tp2-sp2-lasp-tpsp", 2, 2, "lasp", True, {})]


def _sharded(rank, world_size, layouts, docs, base=None):
    from model_utils import sharded_against_one_rank

    ids, labels = _batch()
    kwargs = {"packed_seq_params": _packed(DOC_STARTS)} if docs else {}
    base = base or {}
    return sharded_against_one_rank(world_size, layouts, lambda **f: _config(**base, **f), VOCAB, SEED, ids, labels,
                                    "decoder.layers.1.self_attention.", **kwargs)


def _check_sharded(per_rank, layouts, meta=True):
    for results in per_rank:
        for layout in layouts:
            r = results[layout[0]]
            assert "error" not in r, (layout[0], r["error"])
            assert r["init_err"] == 0.0, (layout[0], "a TP shard is not a slice of the TP=1 init")
            assert r["loss_err"] < TOL and r["grad_err"] < TOL, (layout[0], r)
            if not meta:
                continue
            # the layer's checkpoint entries: layers stacked, heads (key-head groups) sharded over TP
            tp, rank = layout[1], r["tp_rank"]
            group, conv = 2 * 12 + 2 * 2 * 16 + 2 * 2, 2 * 12 + 2 * 16  # in_proj rows, conv channels per key head
            want = {"A_log": ((2, 4), (1, rank * 4 // tp)), "dt_bias": ((2, 4), (1, rank * 4 // tp)),
                    "in_proj.weight": ((2, 2 * group, 64), (1, rank * 2 * group // tp, 0)),
                    "conv1d.weight": ((2, 2 * conv, 1, 4), (1, rank * 2 * conv // tp, 0, 0)),
                    "out_norm.weight": ((2, 16), (1, 0)),
                    "out_proj.weight": ((2, 64, 64), (1, 0, rank * 64 // tp))}
            assert r["meta"] == want, (layout[0], r["meta"])


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_tp_and_recompute_equal_single_process(docs):
    _check_sharded(spawn(_sharded, 2, args=(LAYOUTS, docs), timeout=600), LAYOUTS)


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_sp2_modes_equal_single_process(docs):
    _check_sharded(spawn(_sharded, 2, args=(SP2_LAYOUTS, docs), timeout=600), SP2_LAYOUTS)


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_sp4_modes_equal_single_process(docs):
    _check_sharded(spawn(_sharded, 4, args=(SP4_LAYOUTS, docs), timeout=900), SP4_LAYOUTS)


HYBRID_LAYOUTS = [("sp2-lasp-allgather", 1, 2, "lasp", False, {}),
                  ("sp2-lasp2-ulysses", 1, 2, "lasp2", False, dict(softmax_sequence_parallel_mode="ulysses")),
                  ("tp2-tpsp", 2, 1, "lasp", True, {})]


def test_hybrid_with_gated_delta_net_layers_equals_single_process():
    """``L*``: a Gated DeltaNet layer and a softmax layer (GQA), packed documents crossing ranks."""
    base = dict(hybrid_layer_pattern="L*", num_query_groups=2)
    _check_sharded(spawn(_sharded, 2, args=(HYBRID_LAYOUTS, True, base), timeout=600), HYBRID_LAYOUTS, meta=False)


# ---------------------------------------------------------------------------------------------
# the halo on its own


def _halo(rank, world_size):
    from megatron_lasp.parallel import initialize_parallel
    from megatron_lasp.parallel.halo import conv_halo

    groups = initialize_parallel(1, world_size, 1, seed=SEED)
    full = torch.arange(2 * 12 * 3, dtype=torch.float64).view(12, 2, 3)  # [s, b, C], whole sequence
    x = full[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    # documents start at tokens 0, 6 (row 0) and 0, 3, 7 (row 1): the position of each slice's
    # first token (4 and 8) in its document
    first = torch.tensor({0: [0, 0], 1: [4, 1], 2: [2, 1]}[rank])
    halo = conv_halo(x, 3, groups.cp, first)
    (halo * torch.arange(1, 4, dtype=torch.float64).view(3, 1, 1)).sum().backward()
    return halo.detach(), x.grad


def test_halo_exchange_masks_documents_and_sends_gradients_back():
    (halo0, grad0), (halo1, grad1), (halo2, grad2) = spawn(_halo, 3)
    full = torch.arange(2 * 12 * 3, dtype=torch.float64).view(12, 2, 3)
    zero = torch.zeros(1, 3, dtype=torch.float64)

    def weights(*w):  # the gradient a halo weighted 1, 2, 3 sends back, per channel
        return torch.tensor(w, dtype=torch.float64).view(3, 1).expand(3, 3)

    assert (halo0 == 0).all()
    # rank 1 (tokens 4-7): row 0's document began at 0, the whole halo (tokens 1-3) counts; row
    # 1's began at 3, only token 3 does
    assert torch.equal(halo1[:, 0], full[1:4, 0])
    assert torch.equal(halo1[:, 1], torch.cat([zero, zero, full[3:4, 1]]))
    # rank 2 (tokens 8-11): documents began at 6 and 7
    assert torch.equal(halo2[:, 0], torch.cat([zero, full[6:8, 0]]))
    assert torch.equal(halo2[:, 1], torch.cat([zero, zero, full[7:8, 1]]))
    # gradients go back to the last three tokens of the rank before, masked the same way
    assert torch.equal(grad0[1:, 0], weights(1, 2, 3)) and torch.equal(grad0[1:, 1], weights(0, 0, 3))
    assert torch.equal(grad1[1:, 0], weights(0, 2, 3)) and torch.equal(grad1[1:, 1], weights(0, 0, 3))
    assert (grad0[0] == 0).all() and (grad1[0] == 0).all() and (grad2 == 0).all()


# ---------------------------------------------------------------------------------------------
# config rules, flags, presets, FLOPs


def test_config_rules_and_presets():
    from megatron_lasp.models import PRESETS, linear_lm_config

    tiny = linear_lm_config("tiny")
    assert tiny.linear_attention_type == "lightning" and tiny.linear_num_key_heads is None
    gdn = linear_lm_config("tiny", **GDN)
    assert (gdn.linear_conv_kernel_dim, gdn.linear_key_head_dim, gdn.linear_value_head_dim,
            gdn.linear_num_key_heads, gdn.linear_num_value_heads) == (4, 16, 16, 4, 4)
    base = PRESETS["tnl-1b"].fields
    assert {k: v for k, v in PRESETS["gdn-1b"].fields.items() if k != "linear_attention_type"} == base
    hybrid = linear_lm_config("gdn-1b-hybrid-1to3")
    assert hybrid.delta_net and hybrid.hybrid_layer_pattern == "LLL*" * 4 and hybrid.num_query_groups == 4
    refusals = [
        (dict(linear_attention_type="mamba"), "linear_attention_type must be one of lightning, gated_delta_net"),
        (dict(linear_key_head_dim=8), "linear_key_head_dim is read by linear_attention_type gated_delta_net only"),
        (dict(GDN, linear_attention_gate="gla"), "linear_attention_gate is read by linear_attention_type lightning"),
        (dict(GDN, decay_type="alibi"), "decay_type is read by linear_attention_type lightning"),
        (dict(GDN, linear_num_value_heads=6), r"linear_num_value_heads \(6\) must be a multiple"),
        (dict(GDN, linear_num_key_heads=2, tensor_model_parallel_size=4),
         r"linear_num_key_heads \(2\) must be divisible by tensor_model_parallel_size \(4\)"),
        (dict(GDN, linear_num_key_heads=1, linear_num_value_heads=2, context_parallel_size=4,
              sequence_parallel_mode="ulysses"), "ulysses needs the Gated DeltaNet value heads"),
        (dict(GDN, linear_conv_kernel_dim=0), "linear_conv_kernel_dim must be a positive integer"),
    ]
    for fields, message in refusals:
        with pytest.raises(ValueError, match=message):
            linear_lm_config("tiny", **fields)


def test_flags():
    from megatron_lasp.training.arguments import ArgumentError, flag_of_field, parse_config
    from megatron_lasp.training.startup import model_config_from_run

    base = ["--model-preset", "tiny", "--seq-length", "32", "--train-iters", "1", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--mock-data"]
    run = parse_config(base + ["--linear-attention-type", "gated_delta_net", "--linear-num-key-heads", "2",
                               "--linear-num-value-heads", "4", "--linear-key-head-dim", "8",
                               "--linear-value-head-dim", "24", "--linear-conv-kernel-dim", "3"])
    config = model_config_from_run(run)
    assert (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
            config.linear_value_head_dim, config.linear_conv_kernel_dim) == (2, 4, 8, 24, 3)
    assert model_config_from_run(parse_config(base + ["--model-preset", "gdn-1b", "--num-layers", "1"])).delta_net

    def refused(extra, world_size=None):
        with pytest.raises(ArgumentError) as info:
            model_config_from_run(parse_config(base + extra, world_size=world_size))
        assert "\n" not in str(info.value)
        return str(info.value)

    gdn = ["--linear-attention-type", "gated_delta_net"]
    assert refused(["--linear-value-head-dim", "8"]).startswith(
        "--linear-value-head-dim is read by --linear-attention-type gated_delta_net only")
    for flag in (["--linear-attention-gate", "mamba2"], ["--decay-type", "alibi"], ["--decay-layer-eps", "0.1"],
                 ["--qk-feature-map", "identity"], ["--no-output-gate"], ["--attention-norm-group-size", "2"]):
        assert refused(gdn + flag).startswith(f"{flag[0]} is read by --linear-attention-type lightning only"), flag
    assert "--linear-num-key-heads must be positive" in refused(gdn + ["--linear-num-key-heads", "0"])
    assert "--linear-conv-kernel-dim must be positive" in refused(gdn + ["--linear-conv-kernel-dim", "-1"])
    assert refused(gdn + ["--linear-num-value-heads", "6"]).startswith(
        "--linear-num-value-heads (6) must be a multiple of --linear-num-key-heads (4)")
    assert refused(["--model-preset", "tnl-1b-gla", "--linear-attention-type", "gated_delta_net"]).startswith(
        "--linear-attention-gate is read by --linear-attention-type lightning only")
    assert "ulysses needs the Gated DeltaNet value heads per tensor-parallel rank (2)" in refused(
        gdn + ["--linear-num-key-heads", "1", "--linear-num-value-heads", "2", "--sequence-parallel-size", "4",
               "--sequence-parallel-mode", "ulysses"], world_size=4)
    assert refused(gdn + ["--linear-num-key-heads", "2", "--tensor-model-parallel-size", "4"], world_size=4) == (
        "--linear-num-key-heads (2) must be divisible by --tensor-model-parallel-size (4)")
    assert flag_of_field("linear_attention_type") == "--linear-attention-type"
    assert flag_of_field("linear_num_value_heads") == "--linear-num-value-heads"


def _measured_flops(rank, world_size):
    """FLOPs per token of a tiny Gated DeltaNet model's training step, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.ops.delta_rule import CHUNK_SIZE
    from megatron_lasp.parallel import initialize_parallel
    from megatron_lasp.training.logging_utils import _delta_net_flops, flops_per_token

    initialize_parallel(1, 1, 1, seed=0)
    ids, labels = torch.randint(0, VOCAB, (2, 128)), torch.randint(0, VOCAB, (2, 128))
    config = _config(kernel_backend="torch")
    torch.manual_seed(0)
    model = build_linear_lm(config, VOCAB)
    with FlopCounterMode(display=False) as fwd:
        loss = model(ids, labels=labels)
    with FlopCounterMode(display=False) as bwd:
        loss.sum().backward()
    f, b = fwd.get_flop_counts()["Global"], bwd.get_flop_counts()["Global"]
    mm, bmm = torch.ops.aten.mm, torch.ops.aten.bmm
    proj, core = _delta_net_flops(config, CHUNK_SIZE)
    return dict(formula=flops_per_token(config, VOCAB, chunk_size=CHUNK_SIZE), proj=proj, core=core,
                weights_fwd=f[mm] / ids.numel(), weights_bwd=b[mm] / ids.numel(), rule_fwd=f[bmm] / ids.numel(),
                others=sorted(str(op) for op in f if op not in (mm, bmm)), C=CHUNK_SIZE)


def test_flops_formula_matches_counted_flops():
    m = spawn(_measured_flops, 1)[0]
    L, h, f, V = 2, 64, 96, VOCAB
    Hk, Hv, Dk, Dv, K, C = 2, 4, 12, 16, 4, m["C"]
    assert m["proj"] == 2 * (h * (2 * Hk * Dk + 2 * Hv * Dv + 2 * Hv) + Hv * Dv * h)
    # the 2-d matmuls are the projections (ours, the MLP's, the output layer's): 6 per weight
    assert m["weights_fwd"] == L * (m["proj"] + 2 * 3 * h * f) + 2 * h * V
    assert m["weights_bwd"] == 2 * m["weights_fwd"] and m["others"] == [], m
    # the torch backend's batched matmuls are the formula's delta rule but for the triangular
    # system, which it solves (not counted) instead of multiplying by the inverse; the convolution
    # is elementwise work here
    conv = 2 * K * (2 * Hk * Dk + Hv * Dv)
    assert m["rule_fwd"] == L * (m["core"] - conv - Hv * 2 * C * (Dk + Dv)), m
    assert m["formula"] == 3 * (m["weights_fwd"] - 2 * h * V + L * m["core"]) + 6 * h * V


# ---------------------------------------------------------------------------------------------
# training through the loop: loss falls, checkpoints resume bitwise, the layer is the recorded architecture

GDN_FLAGS = ["--linear-attention-type", "gated_delta_net", "--linear-num-key-heads", "2",
             "--linear-num-value-heads", "4"]
TRAIN = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-2", "--lr-warmup-iters", "1",
    "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "0", "--seed", "7",
    "--make-vocab-size-divisible-by", "64", "--vocab-size", "16",
]


def _train(rank, world_size, configs):
    """``main(TRAIN + extra)`` per extra: the per-iteration losses, or the startup error's text."""
    from model_utils import train_losses

    return train_losses(rank, world_size, TRAIN, configs)


def test_training_falls_and_resumes_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    runs = {
        "plain": GDN_FLAGS,
        "save-4": GDN_FLAGS + ["--save", ckpt, "--save-interval", "4", "--exit-interval", "4"],
        "resume": GDN_FLAGS + ["--load", ckpt],
        "lightning": ["--load", ckpt],
        "docs-full-recompute": GDN_FLAGS + ["--reset-attention-mask", "--recompute-granularity", "full"],
    }
    (single,) = spawn(_train, 1, (list(runs.values()),), timeout=600)
    got = dict(zip(runs, single))
    want = got["plain"]
    assert len(want) == 6 and all(math.isfinite(x) for x in want), want
    assert want[-1] < want[0] - 0.3, want
    assert got["save-4"] == want[:4], (got["save-4"], want)
    assert got["resume"] == want[4:], (got["resume"], want)
    refused = got["lightning"]  # the layer kind is part of the recorded architecture
    assert isinstance(refused, str) and "linear_attention_type=gated_delta_net" in refused, refused
    assert "--linear-attention-type" in refused, refused
    assert all(math.isfinite(x) for x in got["docs-full-recompute"]), got
    layouts = {
        "sp2-lasp": GDN_FLAGS + ["--sequence-parallel-size", "2"],
        # the vocabulary padded to 64 rows at TP 2 too
        "tp2-sp": GDN_FLAGS + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--make-vocab-size-divisible-by", "32"],
        "resume-tp2": GDN_FLAGS + ["--load", ckpt, "--tensor-model-parallel-size", "2", "--no-load-rng",
                                   "--make-vocab-size-divisible-by", "32"],
    }
    for rank_runs in spawn(_train, 2, (list(layouts.values()),), timeout=600):
        for name, losses in zip(layouts, rank_runs):
            ref = want[4:] if name.startswith("resume") else want
            assert isinstance(losses, list) and len(losses) == len(ref), (name, losses)
            for g, w in zip(losses, ref):
                assert abs(g - w) <= 2e-5 * abs(w), (name, losses, ref)


# ---------------------------------------------------------------------------------------------
# GPU (the lead's machine): a TNL-1B-width Gated DeltaNet model trains in bf16 on the default path


def _train_gpu(rank, world_size):
    from megatron_lasp.training import main

    base = ["--model-preset", "gdn-1b", "--num-layers", "2", "--mock-data", "--seq-length", "8192",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "8", "--seed", "7", "--lr", "3e-4",
            "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0", "--bf16", "--ddp-impl",
            "megatron", "--use-distributed-optimizer"]
    plain = main(base, destroy=False)
    torch_op = main(base + ["--train-iters", "3", "--kernel-backend", "torch"], destroy=False)
    full = main(base + ["--train-iters", "3", "--recompute-granularity", "full"], destroy=False)
    return {"loss": plain.losses, "grad_norm": plain.grad_norms, "torch_op": torch_op.losses, "full": full.losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gdn_1b_width_trains_in_bf16():
    """The default GPU path (the delta rule on fla's kernels where fla imports, megatron-core DDP +
    distributed optimizer, bf16): finite, falling loss; the chunked PyTorch op and full recompute
    give the first loss to bf16 accuracy."""
    record = spawn(_train_gpu, 1, timeout=900, init_process_group=False)[0]
    losses = record["loss"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses + record["grad_norm"]), record
    assert losses[-1] < losses[0] - 0.5, record
    for other in ("torch_op", "full"):
        assert abs(record[other][0] - losses[0]) <= 5e-3 * abs(losses[0]), record


def _train_sp_gpu(rank, world_size, extra):
    from megatron_lasp.training import main

    base = ["--model-preset", "tiny", "--linear-attention-type", "gated_delta_net", "--mock-data", "--seq-length",
            "2048", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "2", "--seed", "7",
            "--log-interval", "1", "--eval-interval", "0", "--ddp-impl", "torch", "--distributed-backend", "gloo",
            "--reset-attention-mask"]
    return main(base + list(extra), destroy=False).losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sp2_on_one_gpu_equals_one_rank():
    """Two ranks sharing a GPU over gloo (the halo and the delta state staged through host memory),
    fp32, packed documents: the one-rank losses in every mode."""
    (want,) = spawn(_train_sp_gpu, 1, ([],), timeout=600, init_process_group=False)
    for mode in SP_MODES:
        got = spawn(_train_sp_gpu, 2, (["--sequence-parallel-size", "2", "--sequence-parallel-mode", mode],),
                    timeout=600, init_process_group=False)[0]
        assert all(abs(g - w) <= 1e-4 * abs(w) for g, w in zip(got, want)), (mode, got, want)
