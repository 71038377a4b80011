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

Initial state ``h0``: every rank has it (the same value), so it is the prefix's start
(``S_in = T_{r-1}(... T_0(h0) + S_loc_0 ...) + S_loc_{r-1}``) and its gradient the suffix carried
through slice 0 as well, formed on the first rank from the gathered ``G``: no extra traffic. The
final state, when asked for: the prefix of all ``W`` slices, formed on every rank; its gradient,
summed over the ranks (one all-reduce), starts every rank's suffix.

Per-token gates (``g``): the carry of each slice (``exp`` of its cumulative gate, per row and
head) travels in the same all-gather as its state; ``dg`` from the slice's total gradients and
``<dS, S_out>`` (``parallel/README.md``, "Per-token gates").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import lightning_attn_bwd, lightning_attn_fwd
from megatron_lasp.parallel.comm import GroupInfo, all_gather_flat, group_info
from megatron_lasp.parallel.slices import (
    SliceDecays,
    SliceDocs,
    SliceFunction,
    SliceTransform,
    add_state_term,
    decayed_prefix,
    decayed_suffix,
    leaving_state_grads,
    with_entry_state,
)

__all__ = ["lasp2_attention"]


def _all_gather_states(x: torch.Tensor, info: GroupInfo, extra: Optional[torch.Tensor] = None):
    """All ranks' ``[B, H, Dk, Dv]`` states in group order, with one all-gather; with ``extra``
    (a small tensor in the state's dtype, e.g. the slice's carry factors) also all ranks' ``extra``."""
    n = x.numel()
    flat = x.contiguous().view(-1) if extra is None else torch.cat([x.reshape(-1), extra.reshape(-1)])
    out = torch.empty(info.size * flat.numel(), dtype=x.dtype, device=x.device)
    all_gather_flat(out, flat, info.group)
    rows = out.view(info.size, flat.numel())
    states = list(rows[:, :n].reshape((info.size,) + tuple(x.shape)).unbind(0))
    if extra is None:
        return states
    return states, list(rows[:, n:].reshape((info.size,) + tuple(extra.shape)).unbind(0))


class _Lasp2Function(SliceFunction):
    @staticmethod
    def forward(ctx, q, k, v, slopes, g, h0, want_final: bool, info: GroupInfo, backend,
                docs: Optional[SliceDocs] = None, triton_options=None):
        o, s_loc, saved = lightning_attn_fwd(q, k, v, slopes, None, True, backend, g=g,
                                             doc_ids=None if docs is None else docs.local,
                                             triton_options=triton_options)
        transforms, mine = _transforms(slopes, g, q.shape[1], docs, info)
        if g is None:
            states = _all_gather_states(s_loc, info)
        else:  # the other slices' carries travel with their states
            states, across = _all_gather_states(s_loc, info, mine.across.to(s_loc.dtype))
            transforms = [SliceTransform(None, None, a) for a in across]
        s_in = decayed_prefix(states, transforms, info.rank, initial=h0)
        if s_in is not None:
            add_state_term(o, q, s_in, mine.w_in)
        s_out = None
        if g is not None and (info.next is not None or want_final):  # dg needs the state leaving the slice
            s_out = s_loc if s_in is None else mine(s_in).add_(s_loc)
        # the final state: every rank has every slice's state, so every rank forms it
        final = decayed_prefix(states, transforms, info.size, initial=h0) if want_final else None
        across = None if g is None else torch.stack([t.across for t in transforms])
        SliceFunction.keep(ctx, saved, (q, k, v, slopes, g, s_in, s_out, across), (info, docs))
        ctx.want_final = want_final
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        (q, k, v, slopes, g, s_in, s_out, across), saved, (info, docs) = SliceFunction.restore(ctx)
        transforms, mine = _transforms(slopes, g, q.shape[1], docs, info)
        if across is not None:
            transforms = [SliceTransform(None, None, a) for a in across.unbind(0)]
        if s_in is not None:
            saved = with_entry_state(saved, s_in, slopes, docs, SliceDecays.for_slice(slopes, g, q.shape[1]))
        dq, dk, dv, g_loc, *dg_own = lightning_attn_bwd(q, k, v, slopes, do, saved=saved)
        grads = _all_gather_states(mine.keep(g_loc), info)  # the kernel's dS_0 is for the slice's first document
        d_final = SliceFunction.final_grad(ctx, d_final, info)
        ds = decayed_suffix(grads, transforms, info.rank, final=d_final)
        want_g = g is not None and ctx.needs_input_grad[4]
        dg = leaving_state_grads(k, v, dk, dv, ds, mine.w_out, s_out, g if want_g else None,
                                 dg_own[0] if want_g else None, docs)
        dh0 = None
        if SliceFunction.needs_initial_grad(ctx) and info.rank == 0:  # the gradient entering slice 0
            dh0 = decayed_suffix(grads, transforms, -1, final=d_final)
        return _Lasp2Function.input_grads(dq, dk, dv, dg, SliceFunction.initial_grad(ctx, info.rank, dh0, g_loc))


def _transforms(slopes, g, C: int, docs: Optional[SliceDocs], info: GroupInfo):
    """``(every slice's SliceTransform in group order, this slice's)``. A fixed decay gives every
    slice's carry locally (the token weights of this rank's only); per-token gates only this
    slice's (the others' come with their states)."""
    dec = SliceDecays.for_slice(slopes, g, C)
    mine = SliceTransform.of(dec, docs, info.rank)
    if g is not None:
        return None, mine
    return [mine if j == info.rank else SliceTransform.of(dec, docs, j, weights=False) for j in range(info.size)], mine


def lasp2_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                    docs: Optional[SliceDocs] = None, triton_options=None, *, g=None,
                    initial_state=None, output_final_state: bool = False):
    """LASP-2 over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`."""
    o, final = _Lasp2Function.apply(q, k, v, slopes, g, initial_state, output_final_state, group_info(group), backend,
                                    docs, triton_options)
    return (o, final) if output_final_state else o
