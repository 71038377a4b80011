"""All-gather baseline (Megatron-SP style): every rank gathers K and V of the whole sequence.

Forward: one all-gather of the packed local K and V; rank r reduces the slices before its own to
the state of the prefix, ``S_in = sum_{j<r} lam^(C (r-1-j)) (diag(b) K_j)^T V_j``, and runs the
kernel on its slice from that initial state (exact: the prefix enters only through its state).
Backward: the kernel backward gives dQ, the local dK, dV and ``dS_in``; the prefix slices get
``dK_j = diag(b) V_j (lam^(C (r-1-j)) dS_in)^T`` and ``dV_j = diag(b) K_j (lam^(C (r-1-j)) dS_in)``,
and one reduce-scatter of the packed full-sequence dK, dV sums every rank's contributions into the
owner's slice. Traffic grows with the sequence length (the point of this baseline).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import LightningAttnSaved, lightning_attn_bwd, lightning_attn_fwd
from megatron_lasp.parallel.comm import (
    GroupInfo,
    SliceDecays,
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
    def forward(ctx, q, k, v, slopes, info: GroupInfo, backend):
        C, H = q.shape[1], q.shape[2]
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        kv = torch.empty(info.size * packed.numel(), dtype=packed.dtype, device=packed.device)
        all_gather_flat(kv, packed, info.group)
        kv = kv.view(info.size, packed.numel())
        dec = SliceDecays.of(slopes, C)
        s_in = None
        for j in range(info.rank):
            s_j = local_state(*_views(kv[j], k.shape, v.shape), dec.b)
            s_in = s_j if s_in is None else s_in.mul_(dec.across.view(1, H, 1, 1).to(s_j.dtype)).add_(s_j)
        o, _, saved = lightning_attn_fwd(q, k, v, slopes, s_in, False, backend)
        ctx.save_for_backward(q, k, v, slopes, saved.states, kv)
        ctx.meta = (info, saved.backend, saved.span, saved.config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, slopes, states, kv = ctx.saved_tensors
        info, backend, span, config = ctx.meta
        C, H = q.shape[1], q.shape[2]
        saved = LightningAttnSaved(backend, states, span, config)
        dq, dk, dv, ds_in = lightning_attn_bwd(q, k, v, slopes, do, None, None, saved, backend)
        grads = torch.zeros_like(kv)
        grads[info.rank] = torch.cat([dk.reshape(-1), dv.reshape(-1)])
        dec = SliceDecays.of(slopes, C)
        g = ds_in
        for j in range(info.rank - 1, -1, -1):
            k_j, v_j = _views(kv[j], k.shape, v.shape)
            dk_j, dv_j = _views(grads[j], k.shape, v.shape)
            add_state_term(dk_j, v_j, g.transpose(-1, -2), dec.b)
            add_state_term(dv_j, k_j, g, dec.b)
            if j > 0:
                g = g * dec.across.view(1, H, 1, 1).to(g.dtype)
        mine = torch.empty_like(kv[0])
        reduce_scatter_flat(mine, grads.view(-1), info.group)
        dk, dv = _views(mine, k.shape, v.shape)
        return dq, dk, dv, None, None, None


def allgather_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None) -> torch.Tensor:
    """All-gather baseline over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`."""
    return _AllGatherFunction.apply(q, k, v, slopes, group_info(group), backend)
