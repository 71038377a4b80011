"""Packed documents under sequence parallelism: every mode against running each document alone.

One sequence (B = 1 or 2 rows) with global ``cu_seqlens`` is sharded over the group; the gathered
output and dq, dk, dv of ``lightning_attn_sp(..., cu_seqlens=...)`` (fp32) must equal the fp64
reference that runs every document separately (relative error < 1e-5). The boundary sets cover
documents spanning 3+ ranks, several documents in one slice, boundaries exactly on a slice edge
(and one token either side), documents of length 1 and random boundaries.
"""

import random

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import TritonOptions, naive_recurrent_lightning_attn
from megatron_lasp.parallel import gather_sequence, lightning_attn_sp, split_sequence
from megatron_lasp.testing import attention_inputs, check_slopes, rel_err, spawn

MODES = ("lasp", "lasp2", "ulysses", "allgather")
TOL = 1e-5
POISON = TritonOptions(poison_outputs=True)  # NaN-filled triton kernel buffers (ignored by torch)


def _slopes(H):
    # head 0 without decay: a state that leaks across a boundary cannot hide behind underflow;
    # the last head's lam^C underflows to 0 in fp32
    return check_slopes(H, zero_head=True, strong_head=True)


_rel = rel_err


def _boundary_sets(W, C, B, rng):
    """Named cu_seqlens over the B * W * C tokens."""
    T = W * C
    sets = {
        "slice-edges": [W_ * C for W_ in range(1, W)],
        "edges-pm1": sorted({x for j in range(1, W) for x in (j * C - 1, j * C + 1)}),
        "len1-docs": [C - 1, C, 2 * C - 1] if W > 2 else [C - 1, C, C + 1],
        "several-per-slice": [3, 7, C + 2, C + 5, T - 4],
        "span-all-ranks": [C // 2, T - C // 2] if W > 2 else [C // 2],
    }
    for i in range(2):
        n = rng.randint(1, 3 * W)
        sets[f"random{i}"] = sorted(set(rng.randrange(1, B * T) for _ in range(n)))
    out = {}
    for name, cuts in sets.items():
        if B > 1 and not name.startswith("random"):
            cuts = cuts + [T] + [T + c for c in cuts]  # the same cuts in the second row
        cuts = sorted(set(c for c in cuts if 0 < c < B * T))
        out[name] = torch.tensor([0] + cuts + [B * T], dtype=torch.int64)
    return out


def _per_document_reference(q, k, v, do, slopes, cu):
    B, T = q.shape[:2]
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    flat = [x.reshape(B * T, *x.shape[2:]) for x in leaves]
    starts = sorted(set(cu.tolist()) | {b * T for b in range(B)})
    outs = []
    for s, e in zip(starts[:-1], starts[1:]):
        o, _ = naive_recurrent_lightning_attn(*(x[s:e][None] for x in flat), slopes.double())
        outs.append(o[0])
    o = torch.cat(outs).view(B, T, *v.shape[2:])
    o.backward(do)
    return o.detach(), [x.grad for x in leaves]


def _compare(seed, B, C, world, mode, cu, group, backend="torch", H=4, Dk=16, Dv=8):
    T = C * world
    q, k, v, do = attention_inputs(seed, B, T, H, Dk, Dv)
    slopes = _slopes(H)
    o_ref, grads_ref = _per_document_reference(q, k, v, do, slopes, cu)
    local = [split_sequence(x.float(), group).requires_grad_(True) for x in (q, k, v)]
    o = lightning_attn_sp(*local, slopes, group, mode=mode, backend=backend, cu_seqlens=cu, triton_options=POISON)
    o.backward(split_sequence(do.float(), group))
    got = [gather_sequence(o.detach(), group)] + [gather_sequence(x.grad, group) for x in local]
    return {name: _rel(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, [o_ref] + grads_ref)}


def _check(rank, world_size, seed, with_triton):
    torch.set_num_threads(1)
    rng = random.Random(seed)
    group = dist.group.WORLD
    results = {}
    i = 0
    for B, C in ((1, 37), (2, 100)):
        for name, cu in _boundary_sets(world_size, C, B, rng).items():
            for mode in MODES:
                key = f"{mode}-B{B}-C{C}-sp{world_size}-{name}"
                results[key] = (_compare(seed + i, B, C, world_size, mode, cu, group), cu.tolist())
                i += 1
    if with_triton:
        C = 40  # several 16-token blocks and 32-token segments per rank
        cu = torch.tensor([0, 5, 32, 40, 41, 79, 80], dtype=torch.int64)
        for mode in MODES:
            results[f"{mode}-triton-sp{world_size}"] = (
                _compare(seed + i, 1, C, world_size, mode, cu, group, "triton", Dk=16, Dv=16), cu.tolist())
            i += 1
    # a bad cu_seqlens: every rank raises the same one-line error, none hangs
    x = torch.zeros(1, 8, 4, 8)
    try:
        lightning_attn_sp(x, x, x, _slopes(4), group, cu_seqlens=torch.tensor([0, 3, 8]))
        bad = "no error"
    except ValueError as e:
        bad = str(e)
    return results, bad


def _assert(results, what):
    bad = {k: v for k, v in results.items() if not all(e < TOL for e in v[0].values())}
    assert not bad, f"{what}: relative errors >= {TOL}: {bad}"


@pytest.mark.parametrize("world", [2, 4])
def test_packed_documents_every_mode(world):
    seed = random.randrange(1 << 30)
    out = spawn(_check, world, args=(seed, world == 2), env={"TRITON_INTERPRET": "1"}, timeout=600)
    for rank, (results, bad) in enumerate(out):
        _assert(results, f"{world} ranks, rank {rank}, seed {seed}")
        assert len(results) == 2 * 7 * len(MODES) + (len(MODES) if world == 2 else 0)
        assert f"end at the number of tokens {8 * world}" in bad, bad


def test_packed_single_rank_group_none():
    """``group=None`` (and size 1) runs the plain kernel with the same cu_seqlens."""
    cu = torch.tensor([0, 3, 4, 30, 45])
    errs = _compare(5, 1, 45, 1, "lasp", cu, None)
    assert all(e < TOL for e in errs.values()), errs
