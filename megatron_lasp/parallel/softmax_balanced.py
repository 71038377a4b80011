"""``allgather-balanced``: the all-gather softmax mode with the causal work evened out over the ranks.

With contiguous slices rank ``r``'s queries read ``C^2 (r + 1/2)`` key pairs, so the last rank
does ``(2W - 1) / W`` times the mean (``parallel/README.md``). The layout stays contiguous; instead
the ranks pair up, light ``r`` with heavy ``p = W - 1 - r`` (with packed documents either may be
the heavier), and the heavier rank hands the last ``x`` of its queries (its most expensive ones)
to its partner, which already holds every key after the all-gather. ``x`` is chosen so that both end as close as possible to the pair's mean work,
counted per query from the document starts (``plan``, the same on every rank). Per layer and pass
only those ``x`` queries and their outputs move (backward: their output gradients and query
gradients), against the all-gather's ``(W - 1) C`` keys and values.

Forward:
1. one all-gather of K and V (packed);
2. one all-to-all: each heavy rank sends its tail queries to its partner (the others send none);
3. the kernel: every rank on its kept queries against the keys up to their last position, a light
   rank also on its guest queries (bottom-right alignment: the guests are the last positions of
   the heavy rank's prefix);
4. one all-to-all: the guests' outputs go back.
Backward mirrors it: the tail's output gradients to the light rank, the kernels' backward (autograd
over the graph kept from the forward), the guests' query gradients back, one reduce-scatter of the
full-length dK, dV. Every rank runs the same collectives in the same order, pair or not.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.softmax_attn import softmax_attn
from megatron_lasp.parallel.comm import GroupInfo, all_gather_flat, reduce_scatter_flat

__all__ = ["balanced_attention", "balance_plan"]


def balance_plan(keys_per_query: torch.Tensor, world: int) -> List[int]:
    """Queries each rank hands to its partner ``W - 1 - r``: the heavier rank of each pair moves
    its last ``moved[j]`` queries, the other none (0 for the middle rank of an odd group).

    Args:
        keys_per_query: ``[B, W C]`` int, the keys each query reads (from its document's start).
        world: the group size ``W``.

    Returns:
        ``W`` counts (on the host: one synchronisation), ``moved[p] <= C``.
    """
    per_query = keys_per_query.sum(dim=0).view(world, -1).double()  # [W, C], rows summed
    work = per_query.sum(dim=1)
    C = per_query.shape[1]
    # tail[j, x] = work of slice j's last x queries
    tail = torch.cat([per_query.new_zeros(world, 1), per_query.flip(1).cumsum(1)], dim=1)
    moved = [0] * world
    for r in range(world // 2):
        p = world - 1 - r
        heavy, light = (p, r) if work[p] >= work[r] else (r, p)  # documents can make r the heavier
        # after moving the heavy rank's last x queries: heavy - t(x), light + t(x); minimise the larger
        after = torch.maximum(work[heavy] - tail[heavy], work[light] + tail[heavy])
        moved[heavy] = int(torch.argmin(after))
        assert moved[heavy] <= C
    return moved


def _swap_rows(x: torch.Tensor, n_recv: int, partner: Optional[int], info: GroupInfo) -> torch.Tensor:
    """Send ``x`` (``[B, n, ...]``) to group rank ``partner`` and receive ``n_recv`` rows from it.

    One all-to-all over the group (every rank calls it; a rank without a partner sends and
    receives nothing).
    """
    rest = x.shape[2:]
    send = x.transpose(0, 1).contiguous()  # rows first: the all-to-all splits dim 0
    recv = x.new_empty((n_recv, x.shape[0], *rest))
    sizes_in, sizes_out = [0] * info.size, [0] * info.size
    if partner is not None:
        sizes_in[partner], sizes_out[partner] = send.shape[0], n_recv
    dist.all_to_all_single(recv, send, sizes_out, sizes_in, group=info.group)
    return recv.transpose(0, 1)


class _BalancedAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info: GroupInfo, moved: List[int], docs, scale, kernel):
        W, r = info.size, info.rank
        B, C = q.shape[:2]
        partner = W - 1 - r if W - 1 - r != r else None
        heavy = moved[r] > 0  # this rank sends its tail; its partner receives it
        x = moved[r] if heavy else (moved[partner] if partner is not None else 0)
        # 1. K and V of the whole sequence
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        gathered = torch.empty(W * packed.numel(), dtype=packed.dtype, device=packed.device)
        all_gather_flat(gathered, packed, info.group)
        gathered = gathered.view(W, -1)

        def full(start, shape):
            part = gathered[:, start:start + shape.numel()].view(W, B, C, *shape[2:])
            return part.transpose(0, 1).reshape(B, W * C, *shape[2:])

        k_all = full(0, k.shape).requires_grad_(True)
        v_all = full(k.numel(), v.shape).requires_grad_(True)
        # 2. the heavy rank's tail queries to the light rank
        keep = C - x if heavy else C
        guest_q = _swap_rows(q[:, keep:] if heavy else q[:, :0], 0 if heavy else x, partner, info)
        q_keep = q[:, :keep].detach().requires_grad_(True)
        guest_q = guest_q.detach().requires_grad_(True)
        # 3. the kernels, with the graph kept for the backward
        outputs, leaves = [], [q_keep]
        with torch.enable_grad():
            end = r * C + keep
            qd = None if docs is None else docs[:, end - keep:end]
            o_keep = softmax_attn(q_keep, k_all[:, :end], v_all[:, :end], q_docs=qd,
                                  k_docs=None if docs is None else docs[:, :end], scale=scale, kernel=kernel)
            outputs.append(o_keep)
            o_guest = None
            if not heavy and x:
                gend = (partner + 1) * C
                qd = None if docs is None else docs[:, gend - x:gend]
                o_guest = softmax_attn(guest_q, k_all[:, :gend], v_all[:, :gend], q_docs=qd,
                                       k_docs=None if docs is None else docs[:, :gend], scale=scale, kernel=kernel)
                outputs.append(o_guest)
                leaves.append(guest_q)
        # 4. the guests' outputs back
        back = o_guest.detach() if o_guest is not None else o_keep.new_empty((B, 0, *o_keep.shape[2:]))
        o_tail = _swap_rows(back, x if heavy else 0, partner, info)
        ctx.info, ctx.meta = info, (heavy, partner, x, keep)
        ctx.graph = (outputs, leaves, k_all, v_all)
        return torch.cat([o_keep.detach(), o_tail], dim=1) if heavy else o_keep.detach()

    @staticmethod
    def backward(ctx, do):
        info = ctx.info
        heavy, partner, x, keep = ctx.meta
        outputs, leaves, k_all, v_all = ctx.graph
        do_guest = _swap_rows(do[:, keep:] if heavy else do[:, :0], 0 if heavy else x, partner, info)
        grads = [do[:, :keep]] + ([do_guest] if len(outputs) == 2 else [])
        torch.autograd.backward(outputs, grads)
        dq_keep = leaves[0].grad
        dq_guest = leaves[1].grad if len(leaves) == 2 else do.new_zeros((do.shape[0], 0, *dq_keep.shape[2:]))
        dq_tail = _swap_rows(dq_guest, x if heavy else 0, partner, info)
        dq = torch.cat([dq_keep, dq_tail], dim=1) if heavy else dq_keep
        # every rank's contributions to every slice's dK, dV, summed into the owner's slice
        W = info.size
        dk_all = k_all.grad if k_all.grad is not None else torch.zeros_like(k_all)
        dv_all = v_all.grad if v_all.grad is not None else torch.zeros_like(v_all)
        parts = [g.reshape(g.shape[0], W, -1).transpose(0, 1).reshape(W, -1) for g in (dk_all, dv_all)]
        send = torch.cat(parts, dim=1).reshape(-1)
        mine = torch.empty(send.numel() // W, dtype=send.dtype, device=send.device)
        reduce_scatter_flat(mine, send, info.group)
        B, C = do.shape[0], do.shape[1]
        nk = B * C * k_all.shape[2] * k_all.shape[3]
        dk = mine[:nk].view(B, C, *k_all.shape[2:])
        dv = mine[nk:].view(B, C, *v_all.shape[2:])
        ctx.graph = None
        return dq, dk, dv, None, None, None, None, None


def balanced_attention(q, k, v, info: GroupInfo, keys_per_query: torch.Tensor, docs, scale, kernel) -> torch.Tensor:
    """The ``allgather-balanced`` mode (module docstring); the contract of ``softmax_attn_sp``.

    Args:
        q, k, v: this rank's slices ``[B, C, H, D]``.
        info: the group.
        keys_per_query: ``[B, W C]`` keys each query reads (the same on every rank).
        docs: ``[B, W C]`` document ids, or None.
        scale, kernel: as in ``softmax_attn``.
    """
    moved = balance_plan(keys_per_query, info.size)
    return _BalancedAllGather.apply(q, k, v, info, moved, docs, scale, kernel)
