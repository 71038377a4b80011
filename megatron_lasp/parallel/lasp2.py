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

Packed documents: the factor ``lam^C`` of a slice holding a boundary is 0, so the prefix
combination stops at the nearest slice before this one that holds a boundary (whose ``S_loc`` is
the state since its last boundary); ``a`` and ``b`` are masked per row as in LASP-1, and each
rank zeroes its ``G`` when its slice starts with a boundary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import lightning_attn_bwd, lightning_attn_fwd
from megatron_lasp.parallel.comm import (
    GroupInfo,
    SliceDecays,
    SliceDocs,
    SliceFunction,
    SliceTransform,
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


class _Lasp2Function(SliceFunction):
    @staticmethod
    def forward(ctx, q, k, v, slopes, info: GroupInfo, backend, docs: Optional[SliceDocs] = None,
                triton_options=None):
        o, s_loc, saved = lightning_attn_fwd(q, k, v, slopes, None, True, backend,
                                             doc_ids=None if docs is None else docs.local,
                                             triton_options=triton_options)
        states = _all_gather_states(s_loc, info)
        transforms = _transforms(slopes, q.shape[1], docs, info)
        s_in = decayed_prefix(states, transforms, info.rank)
        if s_in is not None:
            add_state_term(o, q, s_in, transforms[info.rank].w_in)
        SliceFunction.keep(ctx, saved, (q, k, v, slopes, s_in), (info, docs))
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k, v, slopes, s_in), saved, (info, docs) = SliceFunction.restore(ctx)
        if s_in is not None:
            saved = with_entry_state(saved, s_in, slopes, docs)
        dq, dk, dv, g_loc = lightning_attn_bwd(q, k, v, slopes, do, saved=saved)
        transforms = _transforms(slopes, q.shape[1], docs, info)
        mine = transforms[info.rank]
        grads = _all_gather_states(mine.keep(g_loc), info)  # the kernel's dS_0 is for the slice's first document
        ds = decayed_suffix(grads, transforms, info.rank)
        if ds is not None:
            add_state_term(dk, v, ds.transpose(-1, -2), mine.w_out)
            add_state_term(dv, k, ds, mine.w_out)
        return _Lasp2Function.input_grads(dq, dk, dv)


def _transforms(slopes, C: int, docs: Optional[SliceDocs], info: GroupInfo) -> list:
    """Every slice's :class:`SliceTransform` in group order (fixed decay: computed locally; the
    token weights of this rank's only)."""
    dec = SliceDecays.of(slopes, C)
    return [SliceTransform.of(dec, docs, j, weights=j == info.rank) for j in range(info.size)]


def lasp2_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                    docs: Optional[SliceDocs] = None, triton_options=None) -> torch.Tensor:
    """LASP-2 over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`."""
    return _Lasp2Function.apply(q, k, v, slopes, group_info(group), backend, docs, triton_options)
