"""Softmax attention for the hybrid models: the library kernels and both sequence-parallel modes.

The kernels (``ops/softmax_attn``) against the explicit fp64 reference that runs one document at a
time, with the queries as the last positions of the keys; ``softmax_attn_sp`` on 2 and 4 gloo
ranks (all-gather, Ulysses, the balanced all-gather) against the one-device run of the whole
sequence: output, dq, dk, dv (fp64, relative error < 1e-10), unpacked and packed (documents spanning ranks, starts on and next to slice edges, several
in one slice), odd slice lengths, grouped-query attention, B = 1 and 2.
"""

import random

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.ops.softmax_attn import naive_softmax_attn, softmax_attn
from megatron_lasp.parallel import gather_sequence, split_sequence
from megatron_lasp.parallel.softmax import SOFTMAX_SP_MODES, causal_pairs_per_rank, softmax_attn_sp
from megatron_lasp.testing import spawn

TOL = 1e-10


def _rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _inputs(seed, B, T, Hq, Hkv, D, Dv):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, T, Hq, Dv, generator=g, dtype=torch.float64)
    return q, k, v, do


def _reference(q, k, v, do, cu, scale=None):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = naive_softmax_attn(*leaves, cu_seqlens=cu, scale=scale)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def _doc_ids(cu, B, T):
    if cu is None:
        return None
    from megatron_lasp.ops.lightning_attn import doc_ids_from_cu_seqlens

    return doc_ids_from_cu_seqlens(cu, B, T, torch.device("cpu"))


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_kernel_bottom_right_against_reference(kernel, packed, heads):
    """The last Tq queries against all Tk keys equal the reference's last Tq rows, with gradients."""
    B, T, Tq, (Hq, Hkv) = 2, 23, 9, heads
    q, k, v, do = _inputs(1, B, T, Hq, Hkv, 8, 5)
    cu = torch.tensor([0, 4, 14, 15, 23, 30, 46]) if packed else None
    full = _reference(q, k, v, do * (torch.arange(T) >= T - Tq).double()[None, :, None, None], cu, scale=0.3)
    docs = _doc_ids(cu, B, T)
    leaves = [q[:, T - Tq:].clone(), k.clone(), v.clone()]
    for x in leaves:
        x.requires_grad_(True)
    o = softmax_attn(*leaves, q_docs=None if docs is None else docs[:, T - Tq:], k_docs=docs, scale=0.3,
                     kernel=kernel)
    o.backward(do[:, T - Tq:])
    assert _rel(o, full[0][:, T - Tq:]) < TOL
    assert _rel(leaves[0].grad, full[1][:, T - Tq:]) < TOL
    assert _rel(leaves[1].grad, full[2]) < TOL and _rel(leaves[2].grad, full[3]) < TOL


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_flex_kernel_forward_on_cpu(packed):
    """flex_attention's block mask gives the same output (torch has no CPU backward for it)."""
    B, T, Tq = 2, 20, 7
    q, k, v, _ = _inputs(2, B, T, 4, 2, 8, 8)
    cu = torch.tensor([0, 3, 15, 16, 27, 40]) if packed else None
    ref = naive_softmax_attn(q, k, v, cu_seqlens=cu)[:, T - Tq:]
    docs = _doc_ids(cu, B, T)
    o = softmax_attn(q[:, T - Tq:], k, v, q_docs=None if docs is None else docs[:, T - Tq:], k_docs=docs,
                     kernel="flex")
    assert _rel(o, ref) < TOL
    with pytest.raises(ValueError, match="no backward on the CPU"):
        softmax_attn(q.requires_grad_(True), k, v, kernel="flex")


def test_auto_kernel_choice(monkeypatch):
    """``kernel="auto"`` runs what the GPU measurements picked (README.md, "Which kernel"): SDPA
    without documents (varlen for GQA with fewer queries than keys); flash-attention's varlen kernel
    with them where it can run (fp16 / bf16 and a torch that has it), flex_attention otherwise; on
    the CPU the masked SDPA path."""
    from megatron_lasp.ops.softmax_attn import auto_kernel, kernels

    for device in ("cuda", "cpu"):
        for dtype in (torch.bfloat16, torch.float32):
            assert auto_kernel(device, dtype, False) == "sdpa"
    assert auto_kernel("cpu", torch.bfloat16, True) == "math"
    monkeypatch.setattr(kernels, "_has_varlen", lambda: True)
    assert auto_kernel("cuda", torch.bfloat16, True) == "varlen"
    assert auto_kernel("cuda", torch.float16, True) == "varlen"
    assert auto_kernel("cuda", torch.float32, True) == "flex"
    # GQA with fewer queries than keys, no documents: varlen (SDPA's lower-right causal path repeats
    # the key/value heads)
    assert auto_kernel("cuda", torch.bfloat16, False, grouped_lower_right=True) == "varlen"
    assert auto_kernel("cuda", torch.float32, False, grouped_lower_right=True) == "sdpa"
    assert auto_kernel("cpu", torch.bfloat16, False, grouped_lower_right=True) == "sdpa"
    monkeypatch.setattr(kernels, "_has_varlen", lambda: False)
    assert auto_kernel("cuda", torch.bfloat16, True) == "flex"
    assert auto_kernel("cuda", torch.bfloat16, False, grouped_lower_right=True) == "sdpa"
    # --deterministic-mode keeps the same kernels: each takes its deterministic path there (GPU test)
    monkeypatch.setattr(kernels, "_has_varlen", lambda: True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert auto_kernel("cuda", torch.bfloat16, True) == "varlen"
    assert auto_kernel("cuda", torch.bfloat16, False) == "sdpa"


def test_kernel_rejects_bad_inputs():
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        softmax_attn(q, torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))
    with pytest.raises(ValueError, match="must be >= Tq"):
        softmax_attn(q, torch.zeros(1, 3, 3, 8), torch.zeros(1, 3, 3, 8))
    with pytest.raises(ValueError, match="unknown kernel"):
        softmax_attn(q, q, q, kernel="fast")


def _boundaries(W, C, B, rng):
    T = W * C
    sets = {
        "none": None,
        "slice-edges": [j * C for j in range(1, W)],
        "edges-pm1": sorted({x for j in range(1, W) for x in (j * C - 1, j * C + 1)}),
        "several-per-slice": [1, 3, C + 2, C + 4, T - 2],
        "span-ranks": [C // 2, T - C // 2],
        "random": sorted(rng.randrange(1, B * T) for _ in range(rng.randint(1, 2 * W))),
    }
    out = {}
    for name, cuts in sets.items():
        if cuts is None:
            out[name] = None
            continue
        if B > 1 and name != "random":
            cuts = cuts + [T + c for c in cuts]
        cuts = sorted(set(c for c in cuts if 0 < c < B * T))
        out[name] = torch.tensor([0] + cuts + [B * T], dtype=torch.int64)
    return out


def _sp_check(rank, world, seed):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    rng = random.Random(seed)
    errors = {}
    heads = (2 * world, world)  # GQA; both divide the group for ulysses
    for B, C in ((1, 7), (2, 5)):
        for name, cu in _boundaries(world, C, B, rng).items():
            q, k, v, do = _inputs(seed + len(errors), B, world * C, *heads, 6, 4)
            ref = _reference(q, k, v, do, cu)
            for mode in SOFTMAX_SP_MODES:
                local = [split_sequence(x, group).requires_grad_(True) for x in (q, k, v)]
                o = softmax_attn_sp(*local, group, mode, cu_seqlens=cu)
                o.backward(split_sequence(do, group))
                got = [gather_sequence(o.detach(), group)] + [gather_sequence(x.grad, group) for x in local]
                errors[f"{mode}-B{B}-C{C}-sp{world}-{name}"] = [_rel(a, b) for a, b in zip(got, ref)]
    # ulysses refuses heads that do not divide; every rank raises the same one-line error
    x = torch.zeros(1, 4, world + 1, 8)
    try:
        softmax_attn_sp(x, x, x, group, "ulysses")
        refusal = "no error"
    except ValueError as e:
        refusal = str(e)
    return errors, refusal


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_one_device(world):
    seed = random.randrange(1 << 20)
    out = spawn(_sp_check, world, args=(seed,), timeout=300)
    for rank, (errors, refusal) in enumerate(out):
        assert len(errors) == 2 * 6 * len(SOFTMAX_SP_MODES)
        bad = {k: e for k, e in errors.items() if not all(x < TOL for x in e)}
        assert not bad, f"rank {rank}, seed {seed}: relative errors (o, dq, dk, dv) >= {TOL}: {bad}"
        assert "divisible by the sequence-parallel size" in refusal, refusal


def test_single_rank_runs_the_kernel():
    q, k, v, do = _inputs(3, 1, 11, 4, 2, 8, 8)
    cu = torch.tensor([0, 5, 11])
    got = softmax_attn_sp(q, k, v, None, cu_seqlens=cu)
    assert _rel(got, naive_softmax_attn(q, k, v, cu_seqlens=cu)) < TOL
    with pytest.raises(ValueError, match="unknown mode"):
        softmax_attn_sp(q, k, v, None, "ring")


def test_causal_pairs_per_rank():
    """Contiguous slices: rank r reads C^2 (r + 1/2) + C/2 pairs; ulysses splits them evenly."""
    N, W = 64, 4
    C = N // W
    pairs = causal_pairs_per_rank(N, W)
    assert pairs == [C * C * r + C * (C + 1) // 2 for r in range(W)]
    assert sum(pairs) == N * (N + 1) // 2
    assert causal_pairs_per_rank(N, W, "ulysses") == [sum(pairs) // W] * W
    # the balanced all-gather: the same total, every rank within one query's keys of the mean
    balanced = causal_pairs_per_rank(N, W, "allgather-balanced")
    assert sum(balanced) == sum(pairs) and max(balanced) - min(balanced) <= N, balanced
    # documents of one slice each: every rank does the same work
    cu = torch.arange(0, N + 1, C)
    assert len(set(causal_pairs_per_rank(N, W, cu_seqlens=cu))) == 1
    # the counts equal the attention mask's true entries, row by row
    cu = torch.tensor([0, 5, 30, 31, 64, 100, 128])
    docs = _doc_ids(cu, 2, N)
    mask = (torch.arange(N)[None, :] <= torch.arange(N)[:, None]) & (docs[:, :, None] == docs[:, None, :])
    expect = [int(mask[:, r * C:(r + 1) * C].sum()) for r in range(W)]
    assert causal_pairs_per_rank(N, W, cu_seqlens=cu, batch=2) == expect


def test_varlen_without_documents_needs_no_host_sync(monkeypatch):
    """Without documents the varlen call's offsets come from the shapes (no host synchronisation, so
    a CUDA graph can hold it) and equal those of one document a row; with documents they follow the
    segments (the varlen kernel itself is stood in for: it runs on CUDA only)."""
    from torch.nn.attention import varlen

    from megatron_lasp.ops.softmax_attn import kernels

    calls = []

    def record(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, cu_q.dtype, cu_k.dtype))
        return torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(varlen, "varlen_attn", record)
    B, Tq, Tk, H, D = 3, 4, 10, 2, 8
    q = torch.randn(B, Tq, H, D, dtype=torch.bfloat16)
    k = torch.randn(B, Tk, H, D, dtype=torch.bfloat16)
    one_doc = torch.zeros(B, Tk, dtype=torch.int32)
    sync = []
    monkeypatch.setattr(kernels, "_segments", lambda docs, real=kernels._segments: sync.append(1) or real(docs))
    kernels._varlen(q, k, k, None, None, None, 1)
    assert not sync  # the segments (and their host reads) were not computed
    kernels._varlen(q, k, k, None, one_doc, None, 1)
    assert sync and calls[0] == calls[1]
    assert calls[0][:4] == ([0, 4, 8, 12], [0, 10, 20, 30], Tq, Tk) and calls[0][4] == torch.int32
    docs = one_doc.clone()
    docs[1, 7:] = 1  # the second row holds two documents; its last 3 queries are in the second
    kernels._varlen(q, k, k, None, docs, None, 1)
    assert calls[2][:4] == ([0, 4, 5, 8, 12], [0, 10, 17, 20, 30], 4, 10)
