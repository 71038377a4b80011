"""The layout contract: how one sequence is split over the ranks of a sequence-parallel group.

Rank ``i`` of the group holds the ``i``-th **contiguous** slice of the sequence, tokens
``[i * C, (i + 1) * C)`` with ``C = T / group_size``. This is what LASP's state passing needs (the
state flows from the slice before to the slice after). megatron-core's own
``get_batch_on_this_cp_rank`` zig-zags the sequence for softmax load balance and must not be used.

Both helpers are differentiable, assuming (as in training) that the full tensor is replicated over
the group: the gradient of a slice is all-gathered back, the gradient of a gathered tensor is sliced.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def check_sequence_split(length: int, world: int, name: str = "the sequence length") -> None:
    """The layout's one rule: the sequence splits into ``world`` slices of equal length.

    Raises:
        ValueError: ``"<name> (<length>) must be divisible by the sequence-parallel size ..."``.
    """
    if length % world != 0:
        raise ValueError(
            f"{name} ({length}) must be divisible by the sequence-parallel size ({world}): each rank "
            f"holds one contiguous slice of equal length; pad the sequence or change the size"
        )


def _slice(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    check_sequence_split(x.size(dim), world, f"the length of sequence dimension {dim}")
    chunk = x.size(dim) // world
    return x.narrow(dim, rank * chunk, chunk).contiguous()


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _slice(x, dim, dist.get_rank(group), dist.get_world_size(group))

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _slice(grad, ctx.dim, dist.get_rank(ctx.group), dist.get_world_size(ctx.group)), None, None


def split_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup], dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (``[B, T, ...]`` -> ``[B, T / W, ...]``).

    Args:
        x: the full sequence, the same on every rank of ``group``.
        group: the sequence-parallel group (None or size 1: ``x`` is returned unchanged).
        dim: the sequence dimension (1 for ``[B, T, ...]``, 0 for megatron's ``[S, B, H]``).

    Raises:
        ValueError: if the sequence length is not divisible by the group size.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _Split.apply(x, dim, group)


def gather_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_sequence`: concatenate the slices of all ranks in group order."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _Gather.apply(x, dim, group)


def sequence_slice_bounds(seq_length: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, end)`` token indices of ``rank``'s slice of a sequence of ``seq_length`` tokens."""
    check_sequence_split(seq_length, world)
    chunk = seq_length // world
    return rank * chunk, (rank + 1) * chunk
