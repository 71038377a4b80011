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

Per-token gates (``g``): the gates are all-gathered too (the earlier slices' ``b`` and carries);
``dg`` of a slice is the kernel's own (from ``S_in``; segment-local sums) plus the terms of the state
gradient ``dS_out`` it gets from the ranks after it: ``<dS_out, S_out>`` and, per token, what
``dS_out`` adds to ``-k . dk`` (fp32), which those ranks form and sum into its owner with one
reduce-scatter of ``W x B x (H + C x H)`` numbers.

Initial state ``h0``: the prefix starts from it (the first rank gives it to the kernel); its
gradient is each rank's ``dS_in`` carried back through slice 0, summed into the first rank in the
same reduce-scatter (``W x B x H x Dk x Dv`` numbers more). The final state, when asked for: the
last rank's kernel gives it (one all-reduce to every rank); its gradient, summed over the ranks,
is that kernel's final-state gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import lightning_attn_bwd, lightning_attn_fwd
from megatron_lasp.parallel.comm import (
    GroupInfo,
    all_gather_flat,
    from_last_rank,
    group_info,
    reduce_scatter_flat,
    state_dtype,
)
from megatron_lasp.parallel.slices import (
    SliceDecays,
    SliceDocs,
    SliceFunction,
    SliceTransform,
    add_state_term,
    local_state,
    slice_gate_grad_from_own,
    state_grad_dots,
)

__all__ = ["allgather_attention"]


def _views(row: torch.Tensor, shape_k, shape_v):
    """Split one packed row into K ``[B, C, H, Dk]`` and V ``[B, C, H, Dv]`` views."""
    nk = shape_k.numel()
    return row[:nk].view(shape_k), row[nk:].view(shape_v)


class _AllGatherFunction(SliceFunction):
    @staticmethod
    def forward(ctx, q, k, v, slopes, g, h0, want_final: bool, info: GroupInfo, backend,
                docs: Optional[SliceDocs] = None, triton_options=None):
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        kv = torch.empty(info.size * packed.numel(), dtype=packed.dtype, device=packed.device)
        all_gather_flat(kv, packed, info.group)
        kv = kv.view(info.size, packed.numel())
        gates = None
        if g is not None:  # every slice's gates, for the carries and weights of the slices before this one
            gates = torch.empty(info.size * g.numel(), dtype=g.dtype, device=g.device)
            all_gather_flat(gates, g.contiguous().view(-1), info.group)
            gates = gates.view((info.size,) + tuple(g.shape))
        transforms = _transforms(slopes, gates, q.shape[1], docs, info)
        s_in, prefix = h0, []  # the first slice starts from h0 (the group's initial state)
        for j in range(info.rank):
            s_j = local_state(*_views(kv[j], k.shape, v.shape), transforms[j].w_out)
            s_in = s_j if s_in is None else transforms[j](s_in).add_(s_j)
            prefix.append(s_in)
        # per-token gates: dg of slice j needs the state leaving it (its gradient is formed here)
        prefix = torch.stack(prefix) if g is not None and prefix else None
        if s_in is not None and info.rank > 0:  # the kernel's initial state feeds the slice's first document
            s_in = transforms[info.rank].keep(s_in)
        last = info.rank == info.size - 1
        o, s_last, saved = lightning_attn_fwd(q, k, v, slopes, s_in, want_final and last, backend, g=g,
                                              doc_ids=None if docs is None else docs.local,
                                              triton_options=triton_options)
        final = None
        if want_final:  # the last slice's final state, on every rank
            final = from_last_rank(s_last, torch.empty(q.shape[0], q.shape[2], q.shape[3], v.shape[3],
                                                        dtype=state_dtype(q.dtype), device=q.device), info)
        SliceFunction.keep(ctx, saved, (q, k, v, slopes, g, kv, gates, prefix), (info, docs))
        ctx.want_final = want_final
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        (q, k, v, slopes, g, kv, gates, prefix), saved, (info, docs) = SliceFunction.restore(ctx)
        d_final = SliceFunction.final_grad(ctx, d_final, info)
        last = info.rank == info.size - 1
        grads_local = lightning_attn_bwd(q, k, v, slopes, do, saved=saved, d_final_state=d_final if last else None)
        dq, dk, dv, ds_in = grads_local[:4]
        dg_own = grads_local[4] if g is not None else None  # from S_in and (last rank) d_final
        transforms = _transforms(slopes, gates, q.shape[1], docs, info)
        if info.rank > 0:
            ds_in = transforms[info.rank].keep(ds_in)
        grads = torch.zeros_like(kv)
        grads[info.rank] = torch.cat([dk.reshape(-1), dv.reshape(-1)])
        # this rank's shares of what the other slices' owners need, summed there by one
        # reduce-scatter: per-token gates, <dS_out_j, S_out_j> of every slice j (``finals``) and the
        # terms its dk gains from here in dg's sum (``dots``, fp32, see slices.state_grad_dots); an
        # initial state wanting a gradient, its gradient from this rank's tokens (to slice 0's owner)
        need_dh0 = SliceFunction.needs_initial_grad(ctx)
        BH, n_state = ds_in.shape[0] * ds_in.shape[1], ds_in.numel()
        BCH = g.numel() if g is not None else 0
        width = (BH + BCH if g is not None else 0) + (n_state if need_dh0 else 0)
        shares = None if width == 0 else ds_in.new_zeros(info.size, width)
        finals = None if g is None else shares[:, :BH].view((info.size,) + tuple(ds_in.shape[:2]))
        dots = None if g is None else shares[:, BH:BH + BCH].view((info.size,) + tuple(g.shape))
        grad_j = ds_in  # the gradient of the state leaving slice j (from this rank's tokens)
        for j in range(info.rank - 1, -1, -1):
            k_j, v_j = _views(kv[j], k.shape, v.shape)
            dk_j, dv_j = _views(grads[j], k.shape, v.shape)
            add_state_term(dk_j, v_j, grad_j.transpose(-1, -2), transforms[j].w_out)
            add_state_term(dv_j, k_j, grad_j, transforms[j].w_out)
            if finals is not None:
                finals[j] = (grad_j * prefix[j].to(grad_j.dtype)).sum((-1, -2))
                dots[j] = state_grad_dots(k_j, v_j, grad_j, transforms[j].w_out)
            if j > 0 or need_dh0:
                grad_j = transforms[j].transpose(grad_j)
        if need_dh0:  # grad_j: now the gradient of the state entering slice 0
            shares[0, width - n_state:] = grad_j.reshape(-1)
        mine = torch.empty_like(kv[0])
        reduce_scatter_flat(mine, grads.view(-1), info.group)
        dk, dv = _views(mine, k.shape, v.shape)
        summed = None
        if shares is not None:
            summed = torch.empty_like(shares[0])
            reduce_scatter_flat(summed, shares.view(-1), info.group)
        dg = None
        if g is not None:
            # the last rank's kernel saw the final state's gradient itself: nothing comes to it
            extra = (None, None) if last else (summed[BH:BH + BCH].view(g.shape), summed[:BH].view(ds_in.shape[:2]))
            dg = slice_gate_grad_from_own(g, dg_own, docs, *extra)
        dh0 = None if not need_dh0 else summed[width - n_state:].view(ds_in.shape)
        return _AllGatherFunction.input_grads(dq, dk, dv, dg, SliceFunction.initial_grad(ctx, info.rank, dh0, ds_in))


def _transforms(slopes, gates, C: int, docs: Optional[SliceDocs], info: GroupInfo) -> list:
    """The :class:`SliceTransform` of this slice and the slices before it (their token weights
    ``w_out`` used); ``gates``: every slice's gates ``[W, B, C, H]`` (per-token gates) or None."""
    if gates is None:
        dec = SliceDecays.of(slopes, C)
        return [SliceTransform.of(dec, docs, j) for j in range(info.rank + 1)]
    return [SliceTransform.of(SliceDecays.from_gates(gates[j]), docs, j) for j in range(info.rank + 1)]


def allgather_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                        docs: Optional[SliceDocs] = None, triton_options=None, *, g=None,
                        initial_state=None, output_final_state: bool = False):
    """All-gather baseline over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`."""
    o, final = _AllGatherFunction.apply(q, k, v, slopes, g, initial_state, output_final_state, group_info(group),
                                        backend, docs, triton_options)
    return (o, final) if output_final_state else o
