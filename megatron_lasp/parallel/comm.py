"""Helpers shared by the sequence-parallel modes: peers, state dtype, decay factors, state terms.

Notation (``parallel/README.md``, per head): a rank holds a contiguous slice of ``C`` tokens; ``lam = exp(-slope)``;
``a_t = lam^(t+1)`` is the weight of the state entering the slice at its token ``t`` and
``b_t = lam^(C-1-t)`` the weight of token ``t`` in the state leaving the slice.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import LightningAttnSaved, decay_powers, state_decay

__all__ = [
    "GroupInfo",
    "group_info",
    "state_dtype",
    "SliceDecays",
    "add_state_term",
    "local_state",
    "decayed_prefix",
    "decayed_suffix",
    "with_entry_state",
    "all_gather_flat",
    "reduce_scatter_flat",
]


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """This rank's place in a sequence-parallel group."""

    group: dist.ProcessGroup
    """The group itself."""
    rank: int
    """Rank inside the group (= index of this rank's slice)."""
    size: int
    """Number of ranks (slices)."""
    prev: Optional[int]
    """Global rank holding the slice before this one, None on the first rank."""
    next: Optional[int]
    """Global rank holding the slice after this one, None on the last rank."""


def group_info(group: dist.ProcessGroup) -> GroupInfo:
    """Rank, size and neighbours of this rank in ``group``.

    Neighbours are global ranks taken from the group's own order, so strided groups (TP > 1) work.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prev = dist.get_global_rank(group, rank - 1) if rank > 0 else None
    nxt = dist.get_global_rank(group, rank + 1) if rank < size - 1 else None
    return GroupInfo(group, rank, size, prev, nxt)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and their gradients are fp32 whatever the activations (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class SliceDecays:
    """Decay factors of one slice of ``length`` tokens, fp32.

    Attributes:
        a: ``[H, C]``, ``lam^(t+1)``.
        b: ``[H, C]``, ``lam^(C-1-t)``.
        across: ``[H]``, ``lam^C`` (the decay of a state carried across the slice; may underflow to 0).
    """

    a: torch.Tensor
    b: torch.Tensor
    across: torch.Tensor

    @classmethod
    def of(cls, slopes: torch.Tensor, length: int) -> "SliceDecays":
        return cls(
            decay_powers(slopes, length),
            decay_powers(slopes, length, reverse=True),
            state_decay(slopes, length),
        )


def add_state_term(out: torch.Tensor, x: torch.Tensor, state: torch.Tensor, w: torch.Tensor) -> None:
    """In place: ``out[b, t, h] += w[h, t] * x[b, t, h] @ state[b, h]``.

    Args:
        out: ``[B, T, H, Do]``, any float dtype.
        x: ``[B, T, H, Di]``.
        state: ``[B, H, Di, Do]`` (fp32; cast to ``x``'s dtype for the matmul, as the kernels do
            for low-precision inputs).
        w: ``[H, T]`` fp32 per-token weights.
    """
    term = torch.matmul(x.transpose(1, 2), state.to(x.dtype))  # [B, H, T, Do]
    out.add_((term * w[None, :, :, None]).transpose(1, 2))


def local_state(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_t w[h, t] k_t^T v_t`` in the state dtype: ``[B, H, Dk, Dv]`` from k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``."""
    sdt = state_dtype(k.dtype)
    kw = k.to(sdt) * w.t()[None, :, :, None]
    return torch.einsum("bthk,bthv->bhkv", kw, v.to(sdt))


def decayed_prefix(states: List[torch.Tensor], across: torch.Tensor, upto: int) -> Optional[torch.Tensor]:
    """State entering slice ``upto``: ``sum_{j < upto} lam^(C (upto-1-j)) states[j]`` (None if ``upto == 0``).

    Args:
        states: per-slice local states ``[B, H, Dk, Dv]`` in group order.
        across: ``[H]``, ``lam^C``.
        upto: index of the slice whose incoming state is wanted.
    """
    carry = None
    for j in range(upto):
        carry = states[j].clone() if carry is None else carry.mul_(across.view(1, -1, 1, 1)).add_(states[j])
    return carry


def decayed_suffix(grads: List[torch.Tensor], across: torch.Tensor, after: int) -> Optional[torch.Tensor]:
    """Gradient of the state leaving slice ``after``: ``sum_{j > after} lam^(C (j-after-1)) grads[j]``.

    ``grads[j]`` is slice ``j``'s own contribution to the gradient of the state entering it
    (``(diag(a) Q_j)^T dO_j``). None if ``after`` is the last slice.
    """
    carry = None
    for j in range(len(grads) - 1, after, -1):
        carry = grads[j].clone() if carry is None else carry.mul_(across.view(1, -1, 1, 1)).add_(grads[j])
    return carry


def with_entry_state(saved: LightningAttnSaved, s_in: torch.Tensor, slopes: torch.Tensor) -> LightningAttnSaved:
    """The kernel's cached segment states as if the forward had started from ``s_in``.

    The state entering the span starting at token ``n * span`` gains ``lam^(n span) s_in``.
    """
    sdt = saved.states.dtype
    starts = torch.arange(saved.states.shape[2], device=slopes.device, dtype=sdt) * saved.span
    w = torch.exp(-slopes.to(sdt)[:, None] * starts[None, :])  # [H, N]
    states = saved.states + w[None, :, :, None, None] * s_in.to(sdt)[:, :, None]
    return LightningAttnSaved(saved.backend, states, saved.span, saved.config)


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    """All-gather of 1-d ``inp`` into 1-d ``out`` (``W`` times longer), in group order.

    Uses ``all_gather_single`` where torch has it (``all_gather_into_tensor`` is deprecated there).
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Sum-reduce-scatter of 1-d ``inp`` (``W`` equal parts, in group order) into 1-d ``out``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)
