"""``lightning_attn_sp``: lightning attention over a sequence split across a process group.

One entry point for the four sequence-parallel modes (one module each, same interface
``<mode>_attention(q, k, v, slopes, group, backend, docs, triton_options, *, g=None, initial_state=None,
output_final_state=False) -> o`` (``(o, final_state)`` with ``output_final_state``); a fixed decay
per head (``slopes``) or per-token gates (``g``, ``slopes=None``), the state entering the whole
sequence (``initial_state``, zero by default) and the one leaving it):

- ``lasp`` (:mod:`.lasp`): LASP-1, the state passed rank to rank, communication overlapped with
  the intra-slice work;
- ``lasp2`` (:mod:`.lasp2`): one all-gather of the local states per pass;
- ``ulysses`` (:mod:`.ulysses`): all-to-all to head shards and back;
- ``allgather`` (:mod:`.allgather`): all-gather of K and V, reduce-scatter of their gradients.

All four give the single-process result on the whole sequence (up to round-off), with or
without packed documents (``cu_seqlens`` with global offsets; README.md in this folder).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import TritonOptions, chunk_lightning_attn
from megatron_lasp.ops.lightning_attn.utils import check_inputs, resolve_backend
from megatron_lasp.parallel.allgather import allgather_attention
from megatron_lasp.ops.lightning_attn.documents import check_cu_seqlens
from megatron_lasp.ops.lightning_attn.gate import check_gate
from megatron_lasp.parallel.comm import gather_rows, state_dtype
from megatron_lasp.parallel.slices import SliceDocs
from megatron_lasp.parallel.lasp import lasp_attention
from megatron_lasp.parallel.lasp2 import lasp2_attention
from megatron_lasp.parallel.ulysses import ulysses_attention

__all__ = ["lightning_attn_sp", "SP_MODES", "SEQUENCE_PARALLEL_MODES", "VALIDATE_ENV"]

SP_MODES: Dict[str, Callable[..., torch.Tensor]] = {
    "lasp": lasp_attention,
    "lasp2": lasp2_attention,
    "ulysses": ulysses_attention,
    "allgather": allgather_attention,
}
"""The dispatch table of the sequence-parallel modes (the one list of them)."""
SEQUENCE_PARALLEL_MODES = tuple(SP_MODES)

VALIDATE_ENV = "MEGATRON_LASP_SP_VALIDATE"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SIGNATURE = ("B", "T_local", "H", "Dk", "Dv", "dtype", "mode", "gated", "initial_state", "output_final_state",
              "n_cu_seqlens", "cu_seqlens_hash")
_INITIAL = ("none", "given", "given, requires grad")


def _validate_default() -> bool:
    return os.environ.get(VALIDATE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _cu_fingerprint(cu_seqlens: Optional[torch.Tensor]) -> list:
    """(length, a position-weighted checksum) of the offsets; (-1, 0) without documents."""
    if cu_seqlens is None:
        return [-1, 0]
    cu = cu_seqlens.detach().cpu().long()
    weights = torch.arange(1, cu.numel() + 1, dtype=torch.int64)
    return [cu.numel(), int(((cu * weights) % 1000003).sum())]


def _initial_code(initial_state: Optional[torch.Tensor]) -> int:
    """0: no initial state, 1: one, 2: one that requires grad (its gradient's collectives must run
    on every rank or on none)."""
    if initial_state is None:
        return 0
    return 2 if initial_state.requires_grad and torch.is_grad_enabled() else 1


def _check_across_group(q, v, mode: str, group: dist.ProcessGroup, cu_seqlens=None, gated: bool = False,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        where: str = "lightning_attn_sp") -> None:
    """One small all-gather: every rank must hold the same shapes, dtype, mode, decay kind, initial
    state (given or not, wanting a gradient or not), final-state flag and documents (``where``:
    the entry point's name for the message)."""
    B, T, H, Dk = q.shape
    dtype_code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    mine = [B, T, H, Dk, v.shape[-1], dtype_code, tuple(SP_MODES).index(mode), int(gated),
            _initial_code(initial_state), int(output_final_state)] + _cu_fingerprint(cu_seqlens)
    rows = gather_rows(mine, group, q.device)
    if any(row != rows[0] for row in rows):

        def describe(row):
            named = dict(zip(_SIGNATURE, row))
            named["dtype"] = str(_DTYPES[row[5]]) if 0 <= row[5] < len(_DTYPES) else "?"
            named["mode"] = tuple(SP_MODES)[row[6]]
            named["initial_state"] = _INITIAL[row[8]]
            return ", ".join(f"{k}={val}" for k, val in named.items())

        table = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
        raise ValueError(
            f"{where}: the ranks of the sequence-parallel group disagree on the inputs "
            f"(every rank must pass its equal-length slice [B, T/W, H, D] of one sequence, in one "
            f"dtype, with one mode, all with slopes or all with g, all with an initial_state (all requiring "
            f"its grad or none) or none, one output_final_state, and the same global cu_seqlens): {table}"
        )


def lightning_attn_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    mode: str = "lasp",
    backend: Optional[str] = None,
    *,
    g: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    validate: Optional[bool] = None,
    triton_options: Optional[TritonOptions] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Causal lightning attention of a sequence split contiguously over ``group``.

    Rank ``i`` of ``group`` holds tokens ``[i C, (i+1) C)`` (see :mod:`megatron_lasp.parallel.layout`).
    The result equals ``chunk_lightning_attn(q, k, v, slopes, initial_state, g=g, cu_seqlens=...)``
    on the whole sequence, sliced; gradients flow to q, k and v (and ``g``, ``initial_state``).

    Args:
        q, k: ``[B, C, H, Dk]``; v: ``[B, C, H, Dv]``: this rank's slice (fp32, fp16, bf16; fp64
            with the torch backend).
        slopes: ``[H]`` float, decay ``lam_h = exp(-slopes[h])``, the same on every rank; treated
            as a constant (must not require grad). None with ``g``.
        g: per-token gates instead of ``slopes``: this rank's slice ``[B, C, H]`` of the float
            log-decays ``g[b, t, h] <= 0`` (``S_t = exp(g_t) S_{t-1} + k_t^T v_t``; ``g = -slopes``
            is the fixed decay); the state crossing a slice boundary decays by the slice's own
            cumulative gate. Its gradient flows when it requires one.
        initial_state: ``[B, H, Dk, Dv]`` float (fp32; used in the state dtype, fp32 or fp64 for
            fp64 inputs), the state entering the first token of the whole sequence: the same
            tensor value on every rank (like ``slopes``; the values are not compared across the
            ranks), entering on the group's first rank only (with ``cu_seqlens``, only each
            row's first document). None: zero. Its gradient, when it requires one: the whole
            gradient on the group's first rank and zeros on the others, so that the sum over
            the group (what a gradient reduction over the sequence-parallel ranks does for a
            tensor replicated on them) is the one-device gradient.
        output_final_state: also return the state after the last token of the whole sequence
            (with ``cu_seqlens``, of each row's last document), the same on every rank (it can be
            the next call's ``initial_state``). The gradients that reach it on the ranks are
            summed (a rank that does not use it contributes zero), the mirror of
            ``initial_state``'s. Costs one collective of one state in each pass (an all-reduce;
            in the ulysses forward an all-gather of the heads' parts).
        group: the sequence-parallel group; None or a group of one rank runs the plain kernel.
        mode: "lasp", "lasp2", "ulysses" or "allgather".
        backend: kernel backend, "triton" or "torch" (default: triton on CUDA, torch otherwise).
        cu_seqlens: packed documents with **global** offsets: int32/int64 ``[N_docs + 1]``
            document starts in the ``B * T`` tokens of the whole sequence's rows laid end to end
            (``T = W C``; for ``B = 1`` flash-attention's convention), first 0, last ``B * T``, the
            same tensor on every rank (on the device or the CPU). The state restarts at every
            document start, across ranks too. None: one document per row.
        validate: check with one small all-gather that every rank passes the same shapes, dtype,
            mode, kind of decay, ``initial_state`` or none (and whether it requires grad),
            ``output_final_state`` and ``cu_seqlens`` (a mismatch would otherwise hang or give
            wrong results), and check the values of ``cu_seqlens``. Default: on, unless
            ``$MEGATRON_LASP_SP_VALIDATE=0`` (costs one tiny collective and a host sync per call).
        triton_options: launch overrides and buffer poisoning of the triton backend
            (:class:`megatron_lasp.ops.lightning_attn.TritonOptions`), or None.

    Returns:
        ``o [B, C, H, Dv]`` in q's dtype: this rank's slice of the output; with
        ``output_final_state``, ``(o, final_state)``, ``final_state [B, H, Dk, Dv]`` fp32 (fp64
        for fp64 inputs).

    Raises:
        ValueError: unknown mode or backend, bad shapes/dtypes/devices (of ``initial_state`` too),
            slopes that require grad, both or neither of slopes and g,
            ranks that disagree (when validating), heads not divisible by the group size (ulysses).
    """
    if mode not in SP_MODES:
        raise ValueError(f"lightning_attn_sp: unknown mode {mode!r}; mode must be one of {', '.join(SP_MODES)}")
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"lightning_attn_sp: q must be a tensor, got {type(q).__name__}")
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    check_gate(g, q, slopes)
    if slopes is not None and slopes.requires_grad:
        raise ValueError("lightning_attn_sp: slopes must not require grad (the decay is a fixed per-layer "
                         "constant here: register it as a buffer or pass slopes.detach())")
    if validate is None:
        validate = _validate_default()
    world = 1 if group is None else dist.get_world_size(group)
    B, C = q.shape[:2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * C * world, q.device, values=True if validate else None,
                         where="lightning_attn_sp")
    if world == 1:
        o, final = chunk_lightning_attn(q, k, v, slopes, initial_state, output_final_state, backend=backend, g=g,
                                        cu_seqlens=cu_seqlens, triton_options=triton_options)
        return (o, final) if output_final_state else o
    if validate:
        _check_across_group(q, v, mode, group, cu_seqlens, gated=g is not None, initial_state=initial_state,
                            output_final_state=output_final_state)
    docs = None
    if cu_seqlens is not None:
        docs = SliceDocs.of(cu_seqlens, B, C, dist.get_rank(group), world, q.device)
    if initial_state is not None:  # the modes take it in the state dtype; autograd casts its gradient back
        initial_state = initial_state.to(state_dtype(q.dtype))
    return SP_MODES[mode](q, k, v, slopes, group, backend, docs, triton_options, g=g, initial_state=initial_state,
                          output_final_state=output_final_state)
