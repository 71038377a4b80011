"""The state in and out under sequence parallelism: every mode against the one-process run.

``lightning_attn_sp(..., initial_state=h0, output_final_state=True)`` on W gloo ranks (W = 2 and
4), the same ``h0`` on every rank, must give the slice of ``chunk_lightning_attn(q, k, v, slopes,
h0, True, ...)`` on the whole sequence: the output, dq, dk, dv (dg with per-token gates) gathered,
d(h0), which is the whole gradient on the group's first rank and exactly zero on the others, and
the final state on every rank, its gradient handed to the ranks in unequal parts. Fixed decay (a
head without decay, so that ``h0`` reaches every rank; a head whose carry underflows) and
per-token gates, odd slice lengths, packed documents on and next to slice edges (``h0`` feeds
only each row's first document), fp64 with the torch backend; at W = 2 also fp32 with the triton
backend in Triton's interpreter (``h0`` alone) and the GPU test's own case
(``tests/test_gpu_multirank.py``) on the CPU. Also: bad ``initial_state`` inputs and ranks that
disagree on the state in or out raise a one-line ValueError.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import chunk_lightning_attn
from megatron_lasp.parallel import gather_sequence, lightning_attn_sp, split_sequence
from megatron_lasp.testing import attention_inputs, check_gates, check_slopes, edge_cu_seqlens, rel_err, spawn

MODES = ("lasp", "lasp2", "ulysses", "allgather")
# fp64 with per-token gates: 1e-10; the fixed decay forms its decay factors in fp32 even for
# fp64 inputs (about 1e-8 here), so 1e-7 (a wrong decay exponent or a missing h0 term is >1e-3)
TOL = {"fp64-gated": 1e-10, "fp64-fixed": 1e-7, "fp32": 1e-5}


def _documents(B, W, C, seed):
    """``edge_cu_seqlens`` (starts on and next to slice edges, length-1 documents) with the first
    document of row 0 crossing one slice edge (two at W > 2), so that ``h0`` reaches several
    ranks, and that of row 1 ending exactly on the first slice edge."""
    T = W * C
    first_end = C + 5 if W == 2 else 2 * C + 3
    cuts = {c for c in edge_cu_seqlens(B, W, C, seed).tolist() if not (0 < c < first_end or T < c < T + C)}
    cuts |= {first_end} | ({T + C} if B > 1 else set())
    return torch.tensor(sorted(cuts), dtype=torch.int64)


def _initial_state(seed, B, H, Dk, Dv):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)


def _transposed(x):
    """``x``'s values with the last two dimensions' strides swapped."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _run(inputs, fn, d_final=None):
    """``fn(*leaves)`` forward and backward (``inputs[-1]`` is dO; with ``d_final``, ``fn`` returns
    ``(o, final_state)`` and ``d_final`` is the final state's gradient): the output, every leaf's
    gradient and the final state (or None)."""
    leaves = [x.clone().requires_grad_(True) for x in inputs[:-1]]
    if d_final is None:
        o, final = fn(*leaves), None
        o.backward(inputs[-1])
    else:
        o, final = fn(*leaves)
        torch.autograd.backward([o, final], [inputs[-1], d_final])
    return [o.detach()] + [x.grad for x in leaves], final


def _compare(seed, B, C, H, Dk, Dv, mode, group, cu, dtype, gated, backend="torch", final=False):
    """One case: ``{name: relative error}`` of the gathered output and gradients (d(h0): the first
    rank's; with ``final``, the final state on this rank too, its gradient split over the ranks in
    unequal parts), and the largest d(h0) entry on the other ranks (must be 0)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, do = attention_inputs(seed, B, C * world, H, Dk, Dv)
    h0 = _initial_state(seed + 1, B, H, Dk, Dv)
    d_final = _initial_state(seed + 3, B, H, Dk, Dv) if final else None
    kw = dict(cu_seqlens=cu)
    if gated:
        slopes, g = None, check_gates(seed + 2, B, C * world, H)
        full, names = (q, k, v, g, h0, do), ("o", "dq", "dk", "dv", "dg", "dh0")

        def ref_fn(a, b, c, d, s):
            return _pick(chunk_lightning_attn(a, b, c, None, s, final, g=d, backend="torch", **kw))

        def sp_fn(a, b, c, d, s):
            return lightning_attn_sp(a, b, c, None, group, mode, backend, g=d, initial_state=s,
                                     output_final_state=final, **kw)
    else:
        slopes = check_slopes(H, zero_head=True, strong_head=True)
        full, names = (q, k, v, h0, do), ("o", "dq", "dk", "dv", "dh0")

        def ref_fn(a, b, c, s):
            return _pick(chunk_lightning_attn(a, b, c, slopes.double(), s, final, backend="torch", **kw))

        def sp_fn(a, b, c, s):
            return lightning_attn_sp(a, b, c, slopes, group, mode, backend, initial_state=s,
                                     output_final_state=final, **kw)

    def _pick(out):
        return out if final else out[0]

    ref, ref_final = _run(full, ref_fn, d_final)
    # h0 and the final state's gradient with transposed strides (what a user's view may have)
    local = [_transposed(x.to(dtype)) if x is h0 else split_sequence(x.to(dtype), group) for x in full]
    share = None if d_final is None else _transposed(d_final.to(dtype) * (2 * (rank + 1) / (world * (world + 1))))
    got, got_final = _run(local, sp_fn, share)
    dh0 = got[-1]
    assert dh0.dtype == dtype and dh0.shape == h0.shape
    got = [gather_sequence(x, group) for x in got[:-1]]
    errs = {name: rel_err(a, b) for name, a, b in zip(names, got, ref)}
    if final:
        errs["final"] = rel_err(got_final, ref_final)
    others = 0.0
    if rank == 0:
        errs["dh0"] = rel_err(dh0, ref[-1])
    else:
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
    B, C, H, Dk, Dv = 2, 37, 4, 16, 8
    for packed in (False, True):
        cu = _documents(B, world_size, C, seed=seed + C) if packed else None
        for gated in (False, True):
            for i, mode in enumerate(MODES):
                key = f"{mode}-B{B}-C{C}-sp{world_size}-{'gated' if gated else 'fixed'}{'-packed' if packed else ''}"
                errs, other = _compare(seed + i, B, C, H, Dk, Dv, mode, group, cu, torch.float64, gated, final=True)
                results[key] = (errs, TOL["fp64-gated" if gated else "fp64-fixed"])
                others.append(other)
    gpu_path = {}
    if world_size == 2:
        # the GPU test's case (tests/test_gpu_multirank.py) on the CPU, torch kernels, a small shape
        from test_gpu_multirank import _run_case

        cu = torch.tensor([0, 30, 31, 48], dtype=torch.int64)  # the first document crosses the edge
        for i, mode in enumerate(MODES):
            gpu_path[f"{mode}-fp32-cpu-packed"] = _run_case(seed + i, (1, 24, 4, 8), mode, torch.float32, group, cu)
            gpu_path[f"{mode}-fp32-cpu-gated-packed"] = _run_case(seed + i, (1, 24, 4, 8), mode, torch.float32, group,
                                                                  cu, gated=True)
        # the triton backend in Triton's interpreter (40 tokens a rank: several blocks)
        cu = torch.tensor([0, 45, 46, 79, 80], dtype=torch.int64)  # the first document crosses the edge
        for gated in (False, True):
            for mode in MODES:
                errs, other = _compare(seed + 7, 1, 40, 2, 16, 16, mode, group, cu, torch.float32, gated, "triton")
                results[f"{mode}-triton-fp32-packed-{'gated' if gated else 'fixed'}"] = (errs, TOL["fp32"])
                others.append(other)
    # the inputs make h0 matter: the output without it is far from the output with it
    q, k, v, _ = attention_inputs(seed, 1, 8 * world_size, H, Dk, Dv)
    local = [split_sequence(x, group) for x in (q, k, v)]
    slopes = check_slopes(H, zero_head=True)
    h0 = _initial_state(seed, 1, H, Dk, Dv)
    sensitivity = rel_err(lightning_attn_sp(*local, slopes, group, "lasp", "torch"),
                          lightning_attn_sp(*local, slopes, group, "lasp", "torch", initial_state=h0))
    # bad input: one line that says what to change, on every rank
    errors = {
        "shape": _error(lambda: lightning_attn_sp(*local, slopes, group, "lasp", "torch", initial_state=h0[:, :2])),
        "dtype": _error(lambda: lightning_attn_sp(*local, slopes, group, "lasp", "torch",
                                                  initial_state=h0.long())),
        "device": _error(lambda: lightning_attn_sp(*local, slopes, group, "lasp", "torch",
                                                   initial_state=h0.to("meta"))),
        # only the first rank passes it: the ranks disagree (caught by the validation's all-gather)
        "disagree": _error(lambda: lightning_attn_sp(*local, slopes, group, "lasp2", "torch",
                                                     initial_state=h0 if rank == 0 else None)),
        "grad-disagree": _error(lambda: lightning_attn_sp(*local, slopes, group, "allgather", "torch",
                                                          initial_state=h0.clone().requires_grad_(rank == 0))),
        "final-disagree": _error(lambda: lightning_attn_sp(*local, slopes, group, "lasp", "torch",
                                                           output_final_state=rank == 0)),
    }
    return results, max(others), sensitivity, errors, gpu_path


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "sp4"])
def test_initial_state_modes_match_one_process(world):
    per_rank = spawn(_check, world_size=world, args=(4321 + world,), timeout=900, env={"TRITON_INTERPRET": "1"})
    for rank, (results, others, sensitivity, errors, gpu_path) in enumerate(per_rank):
        bad = {case: errs for case, (errs, tol) in results.items() if not all(e < tol for e in errs.values())}
        assert not bad, f"rank {rank}: relative errors over the tolerance: {bad}"
        assert len(results) == 2 * 2 * 4 + (8 if world == 2 else 0)
        if rank == 0:
            assert all("dh0" in errs for errs, _ in results.values())
        assert sum("final" in errs for errs, _ in results.values()) == 16
        assert others == 0.0, f"rank {rank}: d(initial state) must be zero off the first rank, got {others}"
        assert sensitivity > 1e-2, f"the initial state hardly changes the output ({sensitivity}): a weak check"
        for what, msg in errors.items():
            assert "\n" not in msg and "initial_state" in msg, f"rank {rank}, {what}: {msg}"
        assert "output_final_state=0" in errors["final-disagree"], errors
        assert "[B, H, Dk, Dv]" in errors["shape"] and "float" in errors["dtype"], errors
        assert "one device" in errors["device"], errors
        if world == 2:
            from test_gpu_multirank import _check_cases

            assert len(gpu_path) == 8 and all("dh0" in r["sp"] for r in gpu_path.values())
            assert sum("dg" in r["sp"] for r in gpu_path.values()) == 4
            bad = _check_cases(gpu_path)
            assert not bad, f"rank {rank}: the GPU test's cases fail on the CPU: {bad}"
