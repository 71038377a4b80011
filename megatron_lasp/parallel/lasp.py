"""LASP-1: the fp32 state is passed along the sequence-parallel group, one hop per rank.

Forward on rank r (``parallel/README.md``, "LASP-1"), the schedule that keeps the hops off the
compute's critical path:

1. post the receive of ``S_in`` from rank r-1;
2. the state-only pass of the kernel on the local slice (segment states and their scan, a small
   part of the kernel's work) gives ``S_loc``;
3. wait for ``S_in`` and send ``S_out = lam^C S_in + S_loc`` to rank r+1 at once;
4. the output pass (intra term from the cached states) while the state travels;
5. add ``diag(a) Q S_in``.

On CUDA, steps 3 (wait, combine, send) run on a side stream, so the output pass of step 4 does
not wait for ``S_in`` either: the chain of W-1 hops overlaps every rank's output pass, and the
last rank ends after about ``max(kernel, state pass + hops)`` instead of ``kernel + hops``. On the
CPU (gloo) the steps run in this order on the host; results are bitwise those of the one-pass
schedule. On a gloo group with CUDA tensors (ranks sharing a GPU) each hop goes through pinned
host memory (``comm.send_state`` / ``comm.recv_state``): same results, no overlap to speak of.

Backward, the mirror: post the receive of ``dS`` (the gradient of ``S_out``) from rank r+1, the
state-gradient pass gives the local part of ``dS_in``; wait, send ``dS_in = lam^C dS +
(diag(a) Q)^T dO`` to rank r-1 at once (side stream on CUDA); then dQ, dK, dV of the slice, and
``diag(b) V dS^T`` added to dK and ``diag(b) K dS`` to dV. ``S_in`` is kept from the forward
(KV-state caching): it is folded into the kernel's cached segment states, so the kernel's dQ
already contains ``diag(a) dO S_in^T`` and nothing is communicated twice.

Packed documents: the kernel restarts the state at the slice's own boundaries, so ``S_loc`` is the
state since the slice's last boundary; ``S_in`` reaches only the tokens before the first boundary
(``a`` masked) and crosses the slice only if it has none (``lam^C`` -> 0); the backward mirrors it
(``b`` masked to the last document, ``dS_in`` kept only if the slice starts inside the document).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import LightningAttnSaved, lightning_attn_bwd_phases, lightning_attn_fwd_phases
from megatron_lasp.parallel.comm import (
    GroupInfo,
    SliceDecays,
    SliceDocs,
    add_state_term,
    group_info,
    recv_state,
    send_state,
    state_dtype,
    with_entry_state,
)

__all__ = ["lasp_attention"]

_SIDE_STREAMS: dict = {}


def _post_recv(shape, dtype, device, src: Optional[int], group) -> tuple[Optional[torch.Tensor], Optional[dist.Work]]:
    if src is None:
        return None, None
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf, recv_state(buf, src, group)


def _post_send(x: torch.Tensor, dst: Optional[int], group) -> Optional[dist.Work]:
    # The caller waits after its remaining local work. On NCCL the wait only orders the current
    # stream after the send; the receiver posted its receive before its own kernel.
    # (A gloo group stages a CUDA state through host memory: then the send itself waits here.)
    return None if dst is None else send_state(x, dst, group)


def _side_stream(device: torch.device):
    """The stream that waits for, combines and sends the state on CUDA; None on the CPU."""
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


@contextlib.contextmanager
def _on_side(side, *tensors):
    """Run the block on ``side`` after the work queued so far on the current stream (no-op on CPU)."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream())
    for t in tensors:
        if t is not None:
            t.record_stream(side)
    with torch.cuda.stream(side):
        yield


def _join_side(side) -> None:
    """The current stream waits for the side stream's work (the received state) before using it."""
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)


def _pass_on(state_local, carried, recv, across, keep, dst, group, side):
    """Wait for ``carried`` (if any), send ``keep * state_local + across * carried`` to ``dst``."""
    send = None
    with _on_side(side, state_local, carried, across, keep):
        if recv is not None:
            recv.wait()
        if dst is not None:
            out = state_local
            if keep is not None:
                out = out.mul_(keep)
            if carried is not None:
                out = out.add_(across * carried)
            send = _post_send(out, dst, group)
    return send


class _LaspFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, info: GroupInfo, backend, docs: Optional[SliceDocs] = None,
                triton_options=None):
        B, C, H, Dk = q.shape
        Dv = v.shape[-1]
        sdt = state_dtype(q.dtype)
        s_in, recv = _post_recv((B, H, Dk, Dv), sdt, q.device, info.prev, info.group)
        # 1. the state-only pass: S_loc before any output is computed
        s_loc, finish = lightning_attn_fwd_phases(q, k, v, slopes, backend,
                                                  doc_ids=None if docs is None else docs.local,
                                                  triton_options=triton_options)
        dec = SliceDecays.of(slopes, C)
        across, w_in = _factors(dec, docs, info.rank, H)
        # 2. wait for S_in, send S_out on at once (side stream on CUDA)
        side = _side_stream(q.device)
        send = _pass_on(s_loc, s_in, recv, across.to(sdt), None, info.next, info.group, side)
        # 3. the output pass while the state travels
        o, saved = finish()
        _join_side(side)
        if s_in is not None:
            add_state_term(o, q, s_in, w_in)
        if send is not None:
            send.wait()
        saved.save_to(ctx, q, k, v, slopes, s_in)
        ctx.meta = (info, docs)
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k, v, slopes, s_in), saved = LightningAttnSaved.restore_from(ctx)
        info, docs = ctx.meta
        B, C, H, Dk = q.shape
        Dv = v.shape[-1]
        sdt = state_dtype(q.dtype)
        ds, recv = _post_recv((B, H, Dk, Dv), sdt, q.device, info.next, info.group)
        if s_in is not None:
            saved = with_entry_state(saved, s_in, slopes, docs)
        # 1. the state-gradient pass: the local part of dS_in first
        ds_loc, finish = lightning_attn_bwd_phases(q, k, v, slopes, do, saved=saved)
        dec = SliceDecays.of(slopes, C)
        across, _ = _factors(dec, docs, info.rank, H)
        w_out = dec.b if docs is None else docs.w_out(dec, info.rank)
        # the kernel's dS_0 is for the slice's first document
        keep = None if docs is None else docs.keep_in(info.rank).to(sdt).view(B, 1, 1, 1)
        # 2. wait for dS, send dS_in on at once (side stream on CUDA)
        side = _side_stream(q.device)
        send = _pass_on(ds_loc, ds, recv, across.to(sdt), keep, info.prev, info.group, side)
        # 3. the slice's gradients while the state gradient travels
        dq, dk, dv = finish()
        _join_side(side)
        if ds is not None:
            add_state_term(dk, v, ds.transpose(-1, -2), w_out)
            add_state_term(dv, k, ds, w_out)
        if send is not None:
            send.wait()
        return dq, dk, dv, None, None, None, None, None


def _factors(dec: SliceDecays, docs: Optional[SliceDocs], rank: int, H: int):
    """(the factor carrying a state across this slice ``[B|1, H, 1, 1]``, the weights ``a`` of ``S_in``)."""
    if docs is None:
        return dec.across.view(1, H, 1, 1), dec.a
    return docs.across(dec)[rank][:, :, None, None], docs.w_in(dec, rank)


def lasp_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                   docs: Optional[SliceDocs] = None, triton_options=None) -> torch.Tensor:
    """LASP-1 over ``group`` (inputs already validated by :func:`megatron_lasp.parallel.lightning_attn_sp`).

    Args:
        q, k: ``[B, C, H, Dk]``; v: ``[B, C, H, Dv]``: this rank's slice of the sequence.
        slopes: ``[H]`` fp32.
        group: the sequence-parallel group.
        backend: kernel backend.
        docs: packed documents (:class:`megatron_lasp.parallel.comm.SliceDocs`), or None.
        triton_options: the triton backend's :class:`megatron_lasp.ops.lightning_attn.TritonOptions`,
            or None.

    Returns:
        ``o [B, C, H, Dv]``, this rank's slice of the output.
    """
    return _LaspFunction.apply(q, k, v, slopes, group_info(group), backend, docs, triton_options)
