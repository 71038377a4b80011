"""LASP-2: one all-gather of the local states per pass instead of a chain of hops.

Forward (``parallel/README.md``, LASP-2): the kernel on the local slice with no initial state gives the output's
intra part and ``S_loc``; one all-gather of ``S_loc`` over the group; rank r forms
``S_in = sum_{j<r} lam^(C (r-1-j)) S_loc_j`` locally and adds ``diag(a) Q S_in`` to the output.

Backward: the kernel backward with no final-state gradient gives dQ, dK, dV of the slice (dQ
including ``S_in``, which is folded into the cached states) and ``G = (diag(a) Q)^T dO``; one
all-gather of ``G``; rank r forms the gradient of the state leaving it,
``dS = sum_{j>r} lam^(C (j-r-1)) G_j``, and adds ``diag(b) V dS^T`` to dK and ``diag(b) K dS`` to dV.

The gathers wait for the fused kernel, which yields the local state together with the output; the
collective is a single one per pass, of ``(W - 1)`` states received per rank.
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
    decayed_prefix,
    decayed_suffix,
    group_info,
    with_entry_state,
)

__all__ = ["lasp2_attention"]


def _all_gather_states(x: torch.Tensor, info: GroupInfo) -> list[torch.Tensor]:
    """All ranks' ``[B, H, Dk, Dv]`` states in group order, with one all-gather."""
    out = torch.empty(info.size * x.numel(), dtype=x.dtype, device=x.device)
    all_gather_flat(out, x.contiguous().view(-1), info.group)
    return list(out.view((info.size,) + tuple(x.shape)).unbind(0))


class _Lasp2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, info: GroupInfo, backend):
        C = q.shape[1]
        o, s_loc, saved = lightning_attn_fwd(q, k, v, slopes, None, True, backend)
        states = _all_gather_states(s_loc, info)
        dec = SliceDecays.of(slopes, C)
        s_in = decayed_prefix(states, dec.across.to(s_loc.dtype), info.rank)
        if s_in is not None:
            add_state_term(o, q, s_in, dec.a)
        ctx.save_for_backward(q, k, v, slopes, saved.states, s_in)
        ctx.meta = (info, saved.backend, saved.span, saved.config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, slopes, states, s_in = ctx.saved_tensors
        info, backend, span, config = ctx.meta
        C = q.shape[1]
        saved = LightningAttnSaved(backend, states, span, config)
        if s_in is not None:
            saved = with_entry_state(saved, s_in, slopes)
        dq, dk, dv, g_loc = lightning_attn_bwd(q, k, v, slopes, do, None, None, saved, backend)
        grads = _all_gather_states(g_loc, info)
        dec = SliceDecays.of(slopes, C)
        ds = decayed_suffix(grads, dec.across.to(g_loc.dtype), info.rank)
        if ds is not None:
            add_state_term(dk, v, ds.transpose(-1, -2), dec.b)
            add_state_term(dv, k, ds, dec.b)
        return dq, dk, dv, None, None, None


def lasp2_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None) -> torch.Tensor:
    """LASP-2 over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`."""
    return _Lasp2Function.apply(q, k, v, slopes, group_info(group), backend)
