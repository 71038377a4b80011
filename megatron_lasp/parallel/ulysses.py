"""Ulysses (DeepSpeed-Ulysses) baseline: all-to-all from sequence-sharded to head-sharded and back.

Forward: one all-to-all turns every rank's ``[B, C, H, D]`` slices of q, k, v into the whole
sequence for ``H / W`` heads (``[B, W C, H / W, D]``, rank r gets heads ``[r H/W, (r+1) H/W)``),
the kernel runs on the whole sequence, a second all-to-all returns the output to sequence shards.
Backward mirrors it: dO to head shards, the kernel backward, dQ, dK, dV back to sequence shards.
q, k and v (and dq, dk, dv) travel packed in one all-to-all. Packed documents: the kernel gets the
document ids of the whole sequence (every rank has them from the global ``cu_seqlens``). Per-token
gates: ``g [B, C, H]`` goes to head shards in an all-to-all of its own (its dtype kept), the
kernel's ``dg`` comes back the same way (the kernel runs the whole sequence: its ``dg`` is total).
Initial state ``[B, H, Dk, Dv]``: rank r gives the kernel its heads' part; the kernel's gradient of
it comes back to the first rank in one all-gather of the head parts. The final state: the kernels'
head parts, all-gathered; its gradient (summed over the ranks) goes back to them the same way.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import lightning_attn_bwd, lightning_attn_fwd
from megatron_lasp.parallel.comm import GroupInfo, all_gather_flat, group_info
from megatron_lasp.parallel.slices import SliceDocs, SliceFunction

__all__ = ["ulysses_attention"]


def _seq_to_heads(xs: Sequence[torch.Tensor], info: GroupInfo) -> List[torch.Tensor]:
    """``[B, C, H, D_i]`` slices -> ``[B, W C, H / W, D_i]`` head shards, one all-to-all for all ``xs``."""
    W = info.size
    B, C, H = xs[0].shape[:3]
    hl = H // W
    # send[j] = this rank's tokens for the heads of rank j
    send = torch.cat([x.reshape(B, C, W, hl, x.shape[-1]).permute(2, 0, 1, 3, 4).reshape(W, -1) for x in xs], dim=1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=info.group)
    # recv[j] = rank j's tokens (slice j) for this rank's heads
    out, col = [], 0
    for x in xs:
        n = B * C * hl * x.shape[-1]
        part = recv[:, col:col + n].reshape(W, B, C, hl, x.shape[-1])
        out.append(part.transpose(0, 1).reshape(B, W * C, hl, x.shape[-1]))
        col += n
    return out


def _heads_to_seq(xs: Sequence[torch.Tensor], info: GroupInfo) -> List[torch.Tensor]:
    """Inverse of :func:`_seq_to_heads`: ``[B, W C, H / W, D_i]`` -> ``[B, C, H, D_i]``."""
    W = info.size
    B, N, hl = xs[0].shape[:3]
    C = N // W
    # send[j] = slice j of the sequence for this rank's heads
    send = torch.cat([x.reshape(B, W, C, hl, x.shape[-1]).transpose(0, 1).reshape(W, -1) for x in xs], dim=1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=info.group)
    # recv[j] = this rank's slice for the heads of rank j
    out, col = [], 0
    for x in xs:
        n = B * C * hl * x.shape[-1]
        part = recv[:, col:col + n].reshape(W, B, C, hl, x.shape[-1])
        out.append(part.permute(1, 2, 0, 3, 4).reshape(B, C, W * hl, x.shape[-1]))
        col += n
    return out


def _gather_heads(x: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """``[B, H / W, Dk, Dv]`` head shards (rank r: heads ``[r H/W, (r+1) H/W)``) -> ``[B, H, Dk, Dv]``
    on every rank, with one all-gather."""
    out = torch.empty((info.size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    all_gather_flat(out.view(-1), x.contiguous().view(-1), info.group)
    return out.transpose(0, 1).reshape(x.shape[0], -1, *x.shape[2:])


class _UlyssesFunction(SliceFunction):
    @staticmethod
    def forward(ctx, q, k, v, slopes, g, h0, want_final: bool, info: GroupInfo, backend,
                docs: Optional[SliceDocs] = None, triton_options=None):
        hl = q.shape[2] // info.size
        heads = slice(info.rank * hl, (info.rank + 1) * hl)
        qh, kh, vh = _seq_to_heads((q, k, v), info)
        if g is None:
            gh, slopes_h = None, slopes[heads].contiguous()
        else:  # the gates in their own all-to-all (their dtype kept), as a tensor of width 1
            (gh,) = _seq_to_heads((g[..., None],), info)
            gh, slopes_h = gh[..., 0].contiguous(), None
        doc_ids = None if docs is None else docs.full
        h0h = None if h0 is None else h0[:, heads].contiguous()  # this rank's heads of the initial state
        oh, final_h, saved = lightning_attn_fwd(qh, kh, vh, slopes_h, h0h, want_final, backend, g=gh,
                                                doc_ids=doc_ids, triton_options=triton_options)
        (o,) = _heads_to_seq((oh,), info)
        final = _gather_heads(final_h, info) if want_final else None  # every rank's heads of it
        SliceFunction.keep(ctx, saved, (qh, kh, vh, slopes_h), (info, None if g is None else g.dtype))
        ctx.want_final = want_final
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        (qh, kh, vh, slopes_h), saved, (info, g_dtype) = SliceFunction.restore(ctx)
        (doh,) = _seq_to_heads((do.to(qh.dtype),), info)
        d_final = SliceFunction.final_grad(ctx, d_final, info)
        hl = qh.shape[2]
        d_final_h = None if d_final is None else d_final[:, info.rank * hl:(info.rank + 1) * hl].contiguous()
        grads = lightning_attn_bwd(qh, kh, vh, slopes_h, doh, saved=saved, d_final_state=d_final_h)
        dq, dk, dv = _heads_to_seq(grads[:3], info)
        dg = None
        if g_dtype is not None:
            (dg,) = _heads_to_seq((grads[4][..., None],), info)
            dg = dg[..., 0].to(g_dtype)
        dh0 = None
        if SliceFunction.needs_initial_grad(ctx):  # every rank's heads of it, in head order
            dh0 = _gather_heads(grads[3], info)
        return _UlyssesFunction.input_grads(dq, dk, dv, dg, SliceFunction.initial_grad(ctx, info.rank, dh0, dh0))


def ulysses_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                      docs: Optional[SliceDocs] = None, triton_options=None, *, g=None,
                      initial_state=None, output_final_state: bool = False):
    """Ulysses over ``group``; same contract as :func:`megatron_lasp.parallel.lasp.lasp_attention`.

    Raises:
        ValueError: if the number of heads is not divisible by the group size.
    """
    info = group_info(group)
    if q.shape[2] % info.size != 0:
        raise ValueError(
            f"ulysses: the heads of q ({q.shape[2]}) must be divisible by the sequence-parallel group "
            f"size ({info.size}): every rank runs whole heads; use another mode or change the sizes"
        )
    o, final = _UlyssesFunction.apply(q, k, v, slopes, g, initial_state, output_final_state, info, backend, docs,
                                      triton_options)
    return (o, final) if output_final_state else o
