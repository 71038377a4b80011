"""All-gather baseline (Megatron-SP style): every rank gathers K and V of the whole sequence.

Forward: one all-gather of the packed local K and V; rank r reduces the slices before its own to
the state of the prefix, ``S_in = sum_{j<r} lam^(C (r-1-j)) (diag(b) K_j)^T V_j``, and runs the
kernel on its slice from that initial state (exact: the prefix enters only through its state).
Backward: the kernel backward gives dQ, the local dK, dV and ``dS_in``; the prefix slices get
``dK_j = diag(b) V_j (lam^(C (r-1-j)) dS_in)^T`` and ``dV_j = diag(b) K_j (lam^(C (r-1-j)) dS_in)``,
and one reduce-scatter of the packed full-sequence dK, dV sums every rank's contributions into the
owner's slice. Traffic grows with the sequence length (the point of this baseline).

Packed documents: every rank knows the document ids of the whole sequence (from the global
``cu_seqlens``), so the prefix slices' states use ``b`` masked to their last document and the
factor of a slice holding a boundary is 0; ``S_in`` enters the kernel only if this slice starts
inside the document it belongs to.
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
    all_gather_flat,
    group_info,
    local_state,
    reduce_scatter_flat,
)

__all__ = ["allgather_attention"]


def _views(row: torch.Tensor, shape_k, shape_v):
    """Split one packed row into K ``[B, C, H, Dk]`` and V ``[B, C, H, Dv]`` views."""
    nk = shape_k.numel()
    return row[:nk].view(shape_k), row[nk:].view(shape_v)


class _AllGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, info: GroupInfo, backend, docs: Optional[SliceDocs] = None,
                triton_options=None):
        B, C, H = q.shape[:3]
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        kv = torch.empty(info.size * packed.numel(), dtype=packed.dtype, device=packed.device)
        all_gather_flat(kv, packed, info.group)
        kv = kv.view(info.size, packed.numel())
        dec = SliceDecays.of(slopes, C)
        s_in = None
        for j in range(info.rank):
            s_j = local_state(*_views(kv[j], k.shape, v.shape), _w_out(dec, docs, j))
            s_in = s_j if s_in is None else s_in.mul_(_across(dec, docs, j, H).to(s_j.dtype)).add_(s_j)
        if s_in is not None and docs is not None:
            s_in.mul_(_keep_in(docs, info.rank, B).to(s_in.dtype))
        o, _, saved = lightning_attn_fwd(q, k, v, slopes, s_in, False, backend,
                                         doc_ids=None if docs is None else docs.local,
                                         triton_options=triton_options)
        saved.save_to(ctx, q, k, v, slopes, kv)
        ctx.meta = (info, docs)
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k, v, slopes, kv), saved = LightningAttnSaved.restore_from(ctx)
        info, docs = ctx.meta
        B, C, H = q.shape[:3]
        dq, dk, dv, ds_in = lightning_attn_bwd(q, k, v, slopes, do, saved=saved)
        if docs is not None and info.rank > 0:
            ds_in.mul_(_keep_in(docs, info.rank, B).to(ds_in.dtype))
        grads = torch.zeros_like(kv)
        grads[info.rank] = torch.cat([dk.reshape(-1), dv.reshape(-1)])
        dec = SliceDecays.of(slopes, C)
        g = ds_in
        for j in range(info.rank - 1, -1, -1):
            k_j, v_j = _views(kv[j], k.shape, v.shape)
            dk_j, dv_j = _views(grads[j], k.shape, v.shape)
            w_j = _w_out(dec, docs, j)
            add_state_term(dk_j, v_j, g.transpose(-1, -2), w_j)
            add_state_term(dv_j, k_j, g, w_j)
            if j > 0:
                g = g * _across(dec, docs, j, H).to(g.dtype)
        mine = torch.empty_like(kv[0])
        reduce_scatter_flat(mine, grads.view(-1), info.group)
        dk, dv = _views(mine, k.shape, v.shape)
        return dq, dk, dv, None, None, None, None, None


def _w_out(dec: SliceDecays, docs: Optional[SliceDocs], j: int) -> torch.Tensor:
    return dec.b if docs is None else docs.w_out(dec, j)


def _across(dec: SliceDecays, docs: Optional[SliceDocs], j: int, H: int) -> torch.Tensor:
    if docs is None:
        return dec.across.view(1, H, 1, 1)
    return docs.across(dec)[j][:, :, None, None]


def _keep_in(docs: SliceDocs, rank: int, B: int) -> torch.Tensor:
    return docs.keep_in(rank).view(B, 1, 1, 1)


def allgather_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                        docs: Optional[SliceDocs] = None, triton_options=None) -> torch.Tensor:
    """All-gather baseline over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`."""
    return _AllGatherFunction.apply(q, k, v, slopes, group_info(group), backend, docs, triton_options)
