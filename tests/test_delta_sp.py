"""The gated delta rule under sequence parallelism: every mode against the one-process run.

``gated_delta_rule_sp`` on W gloo ranks (W = 2 and 4) must give the slice of the token-by-token
reference (``naive_recurrent_gated_delta_rule``) on the whole sequence: the output and the
gradients of q, k, v, g and beta gathered, d(initial state) (whole on the group's first rank,
none or zero on the others), the final state on every rank, its gradient handed to the ranks in
unequal parts. With and without the state in and out, with and without packed documents on and
next to slice edges, fp64 (and one fp32 case), the torch backend of the op. Also the one-line
errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.parallel import gather_sequence, gated_delta_rule_sp, split_sequence
from megatron_lasp.testing import attention_inputs, check_gates, edge_cu_seqlens, rel_err, spawn

MODES = ("lasp", "lasp2", "ulysses", "allgather")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _inputs(seed, B, T, H, Dk, Dv):
    """fp64 ``(q, k, v, g, beta, do)``: unit-norm keys, beta in (0, 1), the gates of the lightning
    checks (a head without decay, so that a state reaches far; one whose decay underflows)."""
    q, k, v, do = attention_inputs(seed, B, T, H, Dk, Dv)
    k = torch.nn.functional.normalize(k, dim=-1)
    gen = torch.Generator().manual_seed(seed + 11)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    return q, k, v, check_gates(seed + 2, B, T, H), beta, do


def _state(seed, B, H, Dk, Dv):
    return torch.randn(B, H, Dk, Dv, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(tensors, do, fn, d_final):
    """``fn(*leaves)`` forward and backward: the output, every leaf's gradient, the final state."""
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    out = fn(*leaves)
    if d_final is None:
        o, final = out, None
        o.backward(do)
    else:
        o, final = out
        torch.autograd.backward([o, final], [do, d_final])
    return [o.detach()] + [x.grad for x in leaves], final


def _compare(seed, B, C, H, Dk, Dv, mode, group, cu, dtype, with_state):
    from megatron_lasp.ops.delta_rule import naive_recurrent_gated_delta_rule

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, g, beta, do = _inputs(seed, B, C * world, H, Dk, Dv)
    full = [q, k, v, g, beta]
    names = ["o", "dq", "dk", "dv", "dg", "dbeta"]
    d_final = None
    if with_state:
        full.append(_state(seed + 1, B, H, Dk, Dv))
        names.append("dh0")
        d_final = _state(seed + 3, B, H, Dk, Dv)

    def ref_fn(q, k, v, g, beta, h0=None):
        o, final = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=with_state,
                                                    cu_seqlens=cu)
        return (o, final) if with_state else o

    def sp_fn(q, k, v, g, beta, h0=None):
        return gated_delta_rule_sp(q, k, v, g, beta, group, mode, "torch", initial_state=h0,
                                   output_final_state=with_state, cu_seqlens=cu)

    ref, ref_final = _run(full, do, ref_fn, d_final)
    local = [split_sequence(x.to(dtype), group) for x in full[:5]] + [x.to(dtype) for x in full[5:]]
    share = None if d_final is None else d_final.to(dtype) * (2 * (rank + 1) / (world * (world + 1)))
    got, got_final = _run(local, split_sequence(do.to(dtype), group), sp_fn, share)
    errs = {name: rel_err(gather_sequence(a, group), b) for name, a, b in zip(names[:6], got[:6], ref[:6])}
    others = 0.0
    if with_state:
        errs["final"] = rel_err(got_final, ref_final)
        dh0 = got[6]
        if rank == 0:
            errs["dh0"] = rel_err(dh0, ref[6])
        elif dh0 is not None:
            others = dh0.abs().max().item()
    return errs, others


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _check(rank, world_size, seed):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    results, others = {}, []
    B, C, H, Dk, Dv = 2, 37, 4, 8, 6
    for packed in (False, True):
        cu = edge_cu_seqlens(B, world_size, C, seed + C) if packed else None
        for i, mode in enumerate(MODES):
            for with_state in (True, False):
                key = f"{mode}-B{B}-C{C}-sp{world_size}{'-packed' if packed else ''}{'-state' if with_state else ''}"
                errs, other = _compare(seed + i, B, C, H, Dk, Dv, mode, group, cu, torch.float64, with_state)
                results[key] = (errs, TOL[torch.float64])
                others.append(other)
    for mode in MODES:
        errs, other = _compare(seed + 9, 1, 20, 4, 8, 8, mode, group, None, torch.float32, True)
        results[f"{mode}-fp32-state"] = (errs, TOL[torch.float32])
        others.append(other)
    # the inputs make the state in matter: the output without it is far from the output with it
    q, k, v, g, beta, _ = _inputs(seed, 1, 8 * world_size, H, Dk, Dv)
    local = [split_sequence(x, group) for x in (q, k, v, g, beta)]
    h0 = _state(seed, 1, H, Dk, Dv)
    sensitivity = rel_err(gated_delta_rule_sp(*local, group, "lasp", "torch"),
                          gated_delta_rule_sp(*local, group, "lasp", "torch", initial_state=h0))
    errors = {
        "mode": _error(lambda: gated_delta_rule_sp(*local, group, "ring", "torch")),
        "g-shape": _error(lambda: gated_delta_rule_sp(*local[:3], local[3][..., :2], local[4], group, "lasp")),
        "ulysses-heads": _error(lambda: gated_delta_rule_sp(*(x[:, :, :3] for x in local), group, "ulysses")),
        "disagree": _error(lambda: gated_delta_rule_sp(*local, group, "lasp2", "torch",
                                                       initial_state=h0 if rank == 0 else None)),
    }
    return results, max(others), sensitivity, errors


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "sp4"])
def test_delta_rule_modes_match_one_process(world):
    per_rank = spawn(_check, world_size=world, args=(8765 + world,), timeout=900)
    for rank, (results, others, sensitivity, errors) in enumerate(per_rank):
        bad = {case: errs for case, (errs, tol) in results.items() if not all(e < tol for e in errs.values())}
        assert not bad, f"rank {rank}: relative errors over the tolerance: {bad}"
        assert len(results) == 4 * 2 * 2 + 4
        if rank == 0:
            assert all("dh0" in errs for case, (errs, _) in results.items() if "state" in case)
        assert others == 0.0, f"rank {rank}: d(initial state) must be zero off the first rank, got {others}"
        assert sensitivity > 1e-2, f"the initial state hardly changes the output ({sensitivity}): a weak check"
        for what, msg in errors.items():
            assert msg != "no error" and "\n" not in msg, f"rank {rank}, {what}: {msg}"
        assert "lasp2" in errors["mode"] and "divisible" in errors["ulysses-heads"], errors
        assert "initial_state" in errors["disagree"], errors
