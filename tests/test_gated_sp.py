"""Per-token gates under sequence parallelism: every mode against the one-process run.

``lightning_attn_sp(..., slopes=None, g=...)`` on W gloo ranks (W = 2 and 4) must give the slice
of the one-process result on the whole sequence, for the output and the gradients of q, k, v and
g: odd slice lengths (not a multiple of the torch kernel's block), a head without decay (a state
that leaks across a document boundary cannot hide behind underflow), a head of strong decay, and
packed documents on and next to slice edges, over every rank, of length 1. And the accuracy of
the lasp / lasp2 slice dg with bf16 inputs (one process).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import chunk_lightning_attn
from megatron_lasp.parallel import gather_sequence, lightning_attn_sp, split_sequence
from megatron_lasp.testing import attention_inputs, check_gates, edge_cu_seqlens, rel_err, spawn

MODES = ("lasp", "lasp2", "ulysses", "allgather")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ("o", "dq", "dk", "dv", "dg")


def _run(q, k, v, g, do, fn):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    o = fn(*leaves)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def _compare(seed, B, C, H, Dk, Dv, mode, group, cu, dtype, backend="torch"):
    world = dist.get_world_size(group)
    q, k, v, do = attention_inputs(seed, B, C * world, H, Dk, Dv)
    g = check_gates(seed + 1, B, C * world, H)
    ref = _run(q, k, v, g, do, lambda a, b, c, d: chunk_lightning_attn(a, b, c, None, g=d, backend="torch",
                                                                        cu_seqlens=cu)[0])
    local = [split_sequence(x.to(dtype), group) for x in (q, k, v, g, do)]
    got = _run(*local[:4], local[4], lambda a, b, c, d: lightning_attn_sp(a, b, c, None, group, mode, backend,
                                                                         g=d, cu_seqlens=cu))
    got = [gather_sequence(x, group) for x in got]
    return {name: rel_err(a, b) for name, a, b in zip(NAMES, got, ref)}


def _check(rank, world_size, seed):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    results = {}
    for i, (B, C) in enumerate(((2, 37), (1, 70))):
        for packed in (False, True):
            cu = edge_cu_seqlens(B, world_size, C, seed=seed + C) if packed else None
            for mode in MODES:
                key = f"{mode}-B{B}-C{C}-sp{world_size}-fp64{'-packed' if packed else ''}"
                errs = _compare(seed + 10 * i, B, C, 4, 16, 8, mode, group, cu, torch.float64)
                results[key] = (errs, TOL[torch.float64])
    for mode in MODES:  # fp32 activations, fp32 states
        cu = edge_cu_seqlens(1, world_size, 45, seed=seed)
        results[f"{mode}-fp32-packed"] = (_compare(seed + 99, 1, 45, 4, 16, 16, mode, group, cu, torch.float32),
                                          TOL[torch.float32])
    if world_size == 2:  # the triton backend in Triton's interpreter (40 tokens a rank: several blocks)
        cu = torch.tensor([0, 5, 32, 40, 41, 79, 80], dtype=torch.int64)
        for mode in MODES:
            results[f"{mode}-triton-fp32-packed"] = (
                _compare(seed + 7, 1, 40, 2, 16, 16, mode, group, cu, torch.float32, "triton"), TOL[torch.float32])
    # the fixed decay is the gate -slopes: the two paths agree
    q, k, v, _ = attention_inputs(seed + 5, 1, 33 * world_size, 4, 8, 8)
    slopes = torch.tensor([0.0, 0.1, 0.5, 3.0], dtype=torch.float64)
    local = [split_sequence(x, group) for x in (q, k, v)]
    o_fixed = lightning_attn_sp(*local, slopes, group, "lasp", "torch")
    o_gated = lightning_attn_sp(*local, None, group, "lasp", "torch", g=(-slopes).expand(1, 33, 4).contiguous())
    # (the fixed path forms its decay factors in fp32 even for fp64 inputs)
    results["fixed-equals-gated"] = ({"o": rel_err(o_gated, o_fixed)}, TOL[torch.float32])
    # negative control: a state carried across a slice without the slice's decay is caught (the
    # carry is used from 3 ranks on)
    control = None
    if world_size > 2:
        from megatron_lasp.parallel import slices

        real = slices.SliceTransform.__call__
        slices.SliceTransform.__call__ = lambda self, state: state.clone()
        try:
            control = max(_compare(seed, 1, 37, 4, 16, 8, "lasp", group, None, torch.float64).values())
        finally:
            slices.SliceTransform.__call__ = real
    # slopes and g together: the same one-line error on every rank
    try:
        lightning_attn_sp(*local, slopes, group, "lasp", "torch", g=torch.zeros(1, 33, 4, dtype=torch.float64))
        both = "no error"
    except ValueError as e:
        both = str(e)
    return results, both, control


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "sp4"])
def test_gated_modes_match_one_process(world):
    per_rank = spawn(_check, world_size=world, args=(1234 + world,), timeout=900, env={"TRITON_INTERPRET": "1"})
    for rank, (results, both, control) in enumerate(per_rank):
        bad = {case: errs for case, (errs, tol) in results.items() if not all(e < tol for e in errs.values())}
        assert not bad, f"rank {rank}: relative errors over the tolerance: {bad}"
        assert len(results) == 4 * 4 + 4 + 1 + (4 if world == 2 else 0)
        assert "not both" in both, both
        if world > 2:
            assert control > 1e-3, f"rank {rank}: an undecayed carry went unnoticed ({control})"


@pytest.mark.parametrize("packed", [False, True], ids=["nodocs", "docs"])
def test_slice_dg_from_own_is_accurate_in_bf16(packed):
    """The lasp / lasp2 slice recipe in one process, bf16 inputs (torch kernels): the op run from
    the entering state, its own segment-local dg, plus the leaving state's terms in fp32
    (``leaving_state_grads``; allgather forms the same terms on the later ranks), against the fp64
    token recurrence on the same bf16 values; the whole-slice sum from the bf16-rounded totals
    (``gate.gate_grad``) is far less accurate."""
    from megatron_lasp.ops.lightning_attn import (
        gate_grad,
        lightning_attn_bwd_phases,
        lightning_attn_fwd_phases,
        naive_recurrent_lightning_attn,
    )
    from megatron_lasp.parallel.slices import (
        SliceDecays,
        SliceDocs,
        SliceTransform,
        leaving_state_grads,
        with_entry_state,
    )

    B, C, H, D = 1, 200, 2, 16
    q, k, v, do = (x.bfloat16() for x in attention_inputs(7, B, C, H, D, D))
    g = check_gates(8, B, C, H).float()
    gen = torch.Generator().manual_seed(9)
    s_in, ds_out = (torch.randn(B, H, D, D, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 70, 71, 150, C]) if packed else None
    docs = None if cu is None else SliceDocs.of(cu, B, C, 0, 1, q.device)
    leaves = [x.double().requires_grad_() for x in (q, k, v, g, s_in)]
    o, s = naive_recurrent_lightning_attn(*leaves[:3], None, leaves[4], True, cu_seqlens=cu, g=leaves[3])
    (o * do.double()).sum().add((s * ds_out.double()).sum()).backward()
    ref = leaves[3].grad

    s_loc, finish = lightning_attn_fwd_phases(q, k, v, None, "torch", g=g, doc_ids=None if docs is None else docs.local)
    _, saved = finish()
    dec = SliceDecays.for_slice(None, g, C)
    tr = SliceTransform.of(dec, docs, 0)
    saved = with_entry_state(saved, s_in, None, docs, dec)
    dq, dk, dv, dg_own = lightning_attn_bwd_phases(q, k, v, None, do, saved=saved)[1]()
    s_out = tr(s_in) + s_loc
    dg = leaving_state_grads(k, v, dk, dv, ds_out, tr.w_out, s_out, g, dg_own, docs)
    old = gate_grad(q, dq, k, dk, None if docs is None else docs.local, s_out, ds_out)
    new_err, old_err = rel_err(dg, ref), rel_err(old, ref)
    assert new_err < 1e-5 and old_err > 10 * new_err, (new_err, old_err)
