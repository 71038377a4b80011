"""The halo of a causal short convolution over a sequence-parallel group.

A causal convolution of ``K`` taps reads, at a slice's first tokens, the last ``K - 1`` inputs of
the slice before it (rank ``r - 1`` of the group, :mod:`megatron_lasp.parallel.layout`). Before
the convolution each rank sends its last ``width = K - 1`` tokens to the next rank and receives
the previous rank's (the first rank gets zeros, the convolution's own padding). Backward is the
mirror: the gradient of the received halo goes back to the rank that sent it and is added to the
gradient of its last ``width`` tokens.

Packed documents: a halo token belongs to the slice's first token's document only if that
document started at least as far back (``first_positions``, the first token's position inside its
document); the others are zeroed, so no tap reaches into an earlier document (and no gradient
flows back into one).

The point-to-point is :func:`megatron_lasp.parallel.comm.send_state` / ``recv_state`` (through
host memory for CUDA tensors on a gloo group), the peers :func:`~megatron_lasp.parallel.comm.group_info`'s.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.parallel.comm import GroupInfo, group_info, recv_state, send_state

__all__ = ["conv_halo"]


class _Halo(torch.autograd.Function):
    """``x [s, b, ...]`` -> the previous rank's ``x[-width:]`` (zeros on the first rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, width: int, info: GroupInfo) -> torch.Tensor:
        ctx.width, ctx.info, ctx.shape = width, info, x.shape
        halo = x.new_zeros((width,) + tuple(x.shape[1:]))
        works = []
        if info.prev is not None:
            works.append(recv_state(halo, info.prev, info.group))
        if info.next is not None:
            works.append(send_state(x[-width:], info.next, info.group))
        for work in works:
            work.wait()
        return halo

    @staticmethod
    def backward(ctx, d_halo: torch.Tensor):
        width, info = ctx.width, ctx.info
        d_tail = d_halo.new_zeros(d_halo.shape)
        works = []
        if info.next is not None:
            works.append(recv_state(d_tail, info.next, info.group))
        if info.prev is not None:
            works.append(send_state(d_halo, info.prev, info.group))
        for work in works:
            work.wait()
        dx = d_halo.new_zeros(ctx.shape)
        if info.next is not None:
            dx[-width:] = d_tail
        return dx, None, None


def conv_halo(x: torch.Tensor, width: int, group: Optional[dist.ProcessGroup],
              first_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``width`` inputs before this rank's slice: the previous rank's last ones, differentiably.

    Args:
        x: ``[s, b, ...]`` this rank's slice, sequence first (every rank the same shape).
        width: halo tokens (``K - 1`` for a ``K``-tap convolution); at most ``s``.
        group: the sequence-parallel group; None or one rank: zeros (nothing before the slice).
        first_positions: packed documents: ``[b]`` int, the position of the slice's first token
            inside its document (0 where a document starts there); halo tokens further back than
            that are zeroed. None: no documents (every halo token counts).

    Returns:
        ``halo [width, b, ...]`` in ``x``'s dtype: ``halo[j]`` is the token ``width - j`` before
        the slice's first one (zeros on the group's first rank and where masked). Its gradient
        flows back to the rank that sent it.

    Raises:
        ValueError: a slice shorter than the halo (it would need tokens of two ranks back).
    """
    if width < 0 or (width > x.shape[0] and group is not None and dist.get_world_size(group) > 1):
        raise ValueError(f"conv_halo: the halo ({width} tokens) must be between 0 and the slice length "
                         f"({x.shape[0]}): use fewer sequence-parallel ranks or a shorter convolution")
    if group is None or dist.get_world_size(group) == 1 or width == 0:
        return x.new_zeros((width,) + tuple(x.shape[1:]))
    halo = _Halo.apply(x, width, group_info(group))
    if first_positions is not None:
        lag = torch.arange(width, 0, -1, device=x.device)  # halo[j] is lag width - j
        keep = first_positions.to(x.device).view(1, -1) >= lag.view(-1, 1)  # [width, b]
        halo = halo * keep.view(keep.shape + (1,) * (x.dim() - 2)).to(halo.dtype)
    return halo
