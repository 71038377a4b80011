"""LASP-1: the fp32 state is passed along the sequence-parallel group, one hop per rank.

Forward on rank r (README.md in this folder, "LASP-1"): post the receive of ``S_in`` from rank r-1, run the kernel on
the local slice with no initial state (intra term and local state ``S_loc``; this is the work the
receive overlaps), wait, send ``S_out = lam^C S_in + S_loc`` to rank r+1, and add
``diag(a) Q S_in`` to the output while the send is in flight.

Backward, the mirror: post the receive of ``dS`` (the gradient of ``S_out``) from rank r+1, run the
kernel backward with no final-state gradient, wait, send ``dS_in = lam^C dS + (diag(a) Q)^T dO``
to rank r-1, then add ``diag(b) V dS^T`` to dK and ``diag(b) K dS`` to dV. ``S_in`` is kept
from the forward (KV-state caching): it is folded into the kernel's cached segment states, so the
kernel's dQ already contains ``diag(a) dO S_in^T`` and nothing is communicated twice.

Packed documents: the kernel restarts the state at the slice's own boundaries, so ``S_loc`` is the
state since the slice's last boundary; ``S_in`` reaches only the tokens before the first boundary
(``a`` masked) and crosses the slice only if it has none (``lam^C`` -> 0); the backward mirrors it
(``b`` masked to the last document, ``dS_in`` kept only if the slice starts inside the document).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import LightningAttnSaved, lightning_attn_bwd, lightning_attn_fwd
from megatron_lasp.parallel.comm import (
    GroupInfo,
    SliceDecays,
    SliceDocs,
    add_state_term,
    group_info,
    state_dtype,
    with_entry_state,
)

__all__ = ["lasp_attention"]


def _post_recv(shape, dtype, device, src: Optional[int], group) -> tuple[Optional[torch.Tensor], Optional[dist.Work]]:
    if src is None:
        return None, None
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf, dist.irecv(buf, src=src, group=group)


def _post_send(x: torch.Tensor, dst: Optional[int], group) -> Optional[dist.Work]:
    # The caller waits after its remaining local work. On NCCL the wait only orders the current
    # stream after the send; the receiver posted its receive before its own kernel.
    return None if dst is None else dist.isend(x.contiguous(), dst=dst, group=group)


class _LaspFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, info: GroupInfo, backend, docs: Optional[SliceDocs] = None):
        B, C, H, Dk = q.shape
        Dv = v.shape[-1]
        sdt = state_dtype(q.dtype)
        s_in, recv = _post_recv((B, H, Dk, Dv), sdt, q.device, info.prev, info.group)
        o, s_loc, saved = lightning_attn_fwd(q, k, v, slopes, None, info.next is not None, backend,
                                             doc_ids=None if docs is None else docs.local)
        dec = SliceDecays.of(slopes, C)
        across, w_in = _factors(dec, docs, info.rank, H)
        if recv is not None:
            recv.wait()
        send = None
        if info.next is not None:
            # the next rank waits for this state: send it before the inter term
            s_out = s_loc if s_in is None else s_loc.add_(across.to(sdt) * s_in)
            send = _post_send(s_out, info.next, info.group)
        if s_in is not None:
            add_state_term(o, q, s_in, w_in)
        if send is not None:
            send.wait()
        ctx.save_for_backward(q, k, v, slopes, saved.states, s_in)
        ctx.meta = (info, saved.backend, saved.span, saved.config, docs)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, slopes, states, s_in = ctx.saved_tensors
        info, backend, span, config, docs = ctx.meta
        B, C, H, Dk = q.shape
        Dv = v.shape[-1]
        sdt = state_dtype(q.dtype)
        ds, recv = _post_recv((B, H, Dk, Dv), sdt, q.device, info.next, info.group)
        saved = LightningAttnSaved(backend, states, span, config, None if docs is None else docs.local)
        if s_in is not None:
            saved = with_entry_state(saved, s_in, slopes, docs)
        dq, dk, dv, ds_loc = lightning_attn_bwd(q, k, v, slopes, do, None, None, saved, backend)
        dec = SliceDecays.of(slopes, C)
        across, _ = _factors(dec, docs, info.rank, H)
        w_out = dec.b if docs is None else docs.w_out(dec, info.rank)
        if recv is not None:
            recv.wait()
        send = None
        if info.prev is not None:
            if docs is not None:  # the kernel's dS_0 is for the slice's first document
                ds_loc.mul_(docs.keep_in(info.rank).to(sdt).view(B, 1, 1, 1))
            ds_out = ds_loc if ds is None else ds_loc.add_(across.to(sdt) * ds)
            send = _post_send(ds_out, info.prev, info.group)
        if ds is not None:
            add_state_term(dk, v, ds.transpose(-1, -2), w_out)
            add_state_term(dv, k, ds, w_out)
        if send is not None:
            send.wait()
        return dq, dk, dv, None, None, None, None


def _factors(dec: SliceDecays, docs: Optional[SliceDocs], rank: int, H: int):
    """(the factor carrying a state across this slice ``[B|1, H, 1, 1]``, the weights ``a`` of ``S_in``)."""
    if docs is None:
        return dec.across.view(1, H, 1, 1), dec.a
    return docs.across(dec)[rank][:, :, None, None], docs.w_in(dec, rank)


def lasp_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                   docs: Optional[SliceDocs] = None) -> torch.Tensor:
    """LASP-1 over ``group`` (inputs already validated by :func:`megatron_lasp.parallel.lightning_attn_sp`).

    Args:
        q, k: ``[B, C, H, Dk]``; v: ``[B, C, H, Dv]``: this rank's slice of the sequence.
        slopes: ``[H]`` fp32.
        group: the sequence-parallel group.
        backend: kernel backend.
        docs: packed documents (:class:`megatron_lasp.parallel.comm.SliceDocs`), or None.

    Returns:
        ``o [B, C, H, Dv]``, this rank's slice of the output.
    """
    return _LaspFunction.apply(q, k, v, slopes, group_info(group), backend, docs)
