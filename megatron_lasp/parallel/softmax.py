"""``softmax_attn_sp``: causal softmax attention over the contiguous slices of a sequence-parallel group.

The softmax layers of a hybrid model share the linear layers' group and layout (rank ``r`` holds
tokens ``[r C, (r+1) C)``, :mod:`megatron_lasp.parallel.layout`), so no layout conversion happens
between layers. Two modes:

- ``allgather`` (default; LASP-2H's softmax half): one all-gather of K and V; rank ``r`` attends
  its ``C`` queries to the first ``(r+1) C`` keys, its queries being the last positions of that
  prefix (the kernel's bottom-right causal alignment is exactly the rank's causal offset ``r C``).
  Backward: the kernel's dK, dV of the prefix, one reduce-scatter sums every rank's contributions
  into the owner's slice. Any head count.
- ``allgather-balanced``: the all-gather, and each heavy rank ``W - 1 - r`` hands the tail of its
  queries to light rank ``r`` so that both do about the same causal work
  (:mod:`megatron_lasp.parallel.softmax_balanced`).
- ``ulysses``: one all-to-all turns the sequence slices of q, k, v into the whole sequence for
  ``1 / W`` of the heads, the kernel runs on the whole sequence, a second all-to-all returns the
  output to sequence slices (backward: the mirror image). Needs the query and the key/value heads
  (per tensor-parallel rank) divisible by ``W``.

Packed documents: the same global ``cu_seqlens`` as the linear layers (document starts over the
``B * W C`` tokens of the whole sequence's rows); every rank derives the document of every token,
so a document spanning ranks is attended across them and never beyond its start. How the causal
work falls on the ranks (contiguous slices give the last rank the most): README.md in this folder,
and :func:`causal_pairs_per_rank`.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn.documents import check_cu_seqlens, doc_ids_from_cu_seqlens
from megatron_lasp.ops.softmax_attn import softmax_attn
from megatron_lasp.parallel.comm import GroupInfo, all_gather_flat, gather_rows, group_info, reduce_scatter_flat
from megatron_lasp.parallel.softmax_balanced import balance_plan, balanced_attention
from megatron_lasp.parallel.sp import _cu_fingerprint, _validate_default
from megatron_lasp.parallel.ulysses import _heads_to_seq, _seq_to_heads

__all__ = ["SOFTMAX_SP_MODES", "softmax_attn_sp", "causal_pairs_per_rank"]

SOFTMAX_SP_MODES = ("allgather", "ulysses", "allgather-balanced")
"""The sequence-parallel modes of the softmax layers (the first is the default)."""


class _GatherKV(torch.autograd.Function):
    """``[B, C, H, D]`` slices of k and v -> the whole sequence ``[B, W C, H, D]`` of each.

    Forward: one all-gather of k and v packed together. Backward: one reduce-scatter of the packed
    gradients (every rank's queries read every earlier slice's keys, so the owner sums them).
    """

    @staticmethod
    def forward(ctx, k, v, info: GroupInfo):
        ctx.info, ctx.shapes = info, (k.shape, v.shape)
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        out = torch.empty(info.size * packed.numel(), dtype=packed.dtype, device=packed.device)
        all_gather_flat(out, packed, info.group)
        out = out.view(info.size, -1)
        return _unpack(out, k.shape, 0), _unpack(out, v.shape, k.numel())

    @staticmethod
    def backward(ctx, dk_full, dv_full):
        info, (shape_k, shape_v) = ctx.info, ctx.shapes
        W = info.size
        # [B, W C, H, D] -> [W, B C H D]: rank j's part first, in the all-gather's order
        parts = [g.reshape(g.shape[0], W, -1).transpose(0, 1).reshape(W, -1) for g in (dk_full, dv_full)]
        send = torch.cat(parts, dim=1).reshape(-1)
        mine = torch.empty(send.numel() // W, dtype=send.dtype, device=send.device)
        reduce_scatter_flat(mine, send, info.group)
        nk = shape_k.numel()
        return mine[:nk].view(shape_k), mine[nk:].view(shape_v), None


def _unpack(gathered: torch.Tensor, shape, start: int) -> torch.Tensor:
    """Rows ``[W, n]`` of the packed all-gather -> ``[B, W C, H, D]`` for the tensor at ``start``."""
    W = gathered.shape[0]
    B, C = shape[0], shape[1]
    part = gathered[:, start:start + shape.numel()].view(W, B, C, *shape[2:])
    return part.transpose(0, 1).reshape(B, W * C, *shape[2:])


class _SeqToHeads(torch.autograd.Function):
    """Ulysses' all-to-all ``[B, C, H, D]`` -> ``[B, W C, H / W, D]`` (several tensors, one call)."""

    @staticmethod
    def forward(ctx, info: GroupInfo, *xs):
        ctx.info = info
        return tuple(_seq_to_heads(xs, info))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_heads_to_seq(grads, ctx.info))


class _HeadsToSeq(torch.autograd.Function):
    """The inverse all-to-all, ``[B, W C, H / W, D]`` -> ``[B, C, H, D]``."""

    @staticmethod
    def forward(ctx, info: GroupInfo, x):
        ctx.info = info
        return _heads_to_seq((x,), info)[0]

    @staticmethod
    def backward(ctx, grad):
        return None, _seq_to_heads((grad.contiguous(),), ctx.info)[0]


def _dtype_code(dtype: torch.dtype) -> int:
    names = ("float32", "float16", "bfloat16", "float64")
    name = str(dtype).replace("torch.", "")
    return names.index(name) if name in names else -1


def _check_across_group(q, k, v, mode: str, group, cu_seqlens) -> None:
    """One small all-gather: every rank must pass the same shapes, dtype, mode and documents."""
    mine = [*q.shape, *k.shape[2:], v.shape[-1], SOFTMAX_SP_MODES.index(mode), _dtype_code(q.dtype),
            *_cu_fingerprint(cu_seqlens)]
    rows = gather_rows(mine, group, q.device)
    if any(row != rows[0] for row in rows):
        raise ValueError(
            "softmax_attn_sp: the ranks of the sequence-parallel group disagree on the inputs (every rank "
            "must pass its equal-length slice of one sequence, in one dtype, with one mode and the same "
            f"global cu_seqlens); [B, C, Hq, D, Hkv, D, Dv, mode, dtype, cu...] per rank: {rows}"
        )


def softmax_attn_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    mode: str = "allgather",
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    kernel: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Causal softmax attention of a sequence split contiguously over ``group``.

    The result equals ``softmax_attn`` on the whole sequence, sliced; gradients flow to q, k, v.

    Args:
        q: ``[B, C, Hq, D]``; k: ``[B, C, Hkv, D]``; v: ``[B, C, Hkv, Dv]``: this rank's slice
            (``Hq % Hkv == 0``).
        group: the sequence-parallel group; None or one rank runs the kernel on the slice alone.
        mode: ``"allgather"`` or ``"ulysses"`` (module docstring).
        cu_seqlens: packed documents with **global** offsets over the ``B * W C`` tokens (the
            convention of :func:`megatron_lasp.parallel.lightning_attn_sp`), the same on every
            rank; None: one document per row.
        scale: the logit scale, default ``D ** -0.5``.
        kernel: the local kernel (:data:`megatron_lasp.ops.softmax_attn.SOFTMAX_KERNELS`).
        validate: check that the ranks agree (one tiny all-gather) and the values of
            ``cu_seqlens``; default on unless ``$MEGATRON_LASP_SP_VALIDATE=0``.

    Returns:
        ``o [B, C, Hq, Dv]``: this rank's slice of the output.

    Raises:
        ValueError: unknown mode, bad documents, ranks that disagree, heads that do not divide the
            group size under ulysses.
    """
    if mode not in SOFTMAX_SP_MODES:
        raise ValueError(f"softmax_attn_sp: unknown mode {mode!r}; choose one of {', '.join(SOFTMAX_SP_MODES)}")
    world = 1 if group is None else dist.get_world_size(group)
    B, C = q.shape[:2]
    validate = _validate_default() if validate is None else validate
    docs = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * C * world, q.device, values=True if validate else None,
                         where="softmax_attn_sp")
        docs = doc_ids_from_cu_seqlens(cu_seqlens, B, C * world, q.device)  # [B, W C]
    if world == 1:
        return softmax_attn(q, k, v, q_docs=docs, k_docs=docs, scale=scale, kernel=kernel)
    if validate:
        _check_across_group(q, k, v, mode, group, cu_seqlens)
    info = group_info(group)
    if mode == "allgather-balanced":
        keys = _keys_per_query(B, C * world, cu_seqlens, q.device)
        return balanced_attention(q, k, v, info, keys, docs, scale, kernel)
    if mode == "allgather":
        end = (info.rank + 1) * C  # keys after this rank's last query are never read
        k_all, v_all = _GatherKV.apply(k, v, info)
        q_docs = None if docs is None else docs[:, end - C:end]
        k_docs = None if docs is None else docs[:, :end]
        return softmax_attn(q, k_all[:, :end], v_all[:, :end], q_docs=q_docs, k_docs=k_docs, scale=scale,
                            kernel=kernel)
    if q.shape[2] % world or k.shape[2] % world:
        raise ValueError(
            f"softmax_attn_sp: ulysses needs the query heads ({q.shape[2]}) and the key/value heads "
            f"({k.shape[2]}) of each tensor-parallel rank divisible by the sequence-parallel size ({world}); "
            "use --softmax-sequence-parallel-mode allgather or change the sizes"
        )
    (qh,) = _SeqToHeads.apply(info, q)
    kh, vh = _SeqToHeads.apply(info, k, v)
    oh = softmax_attn(qh, kh, vh, q_docs=docs, k_docs=docs, scale=scale, kernel=kernel)
    return _HeadsToSeq.apply(info, oh.contiguous())


def causal_pairs_per_rank(seq_len: int, world: int, mode: str = "allgather",
                          cu_seqlens: Optional[torch.Tensor] = None, batch: int = 1) -> List[int]:
    """The (query, key) pairs each rank computes: the causal work of one head, per rank.

    Under ``allgather`` rank ``r`` computes the pairs of its own queries (``i`` in slice ``r``,
    ``j <= i`` in the same document); under ``ulysses`` every rank computes the whole sequence for
    ``1 / W`` of the heads, i.e. ``1 / W`` of all pairs; under ``allgather-balanced`` the heavy
    ranks' tails move to their partners (``softmax_balanced.balance_plan``).

    Args:
        seq_len: tokens per row (``W C``); world: the group size ``W``; mode: as in
            :func:`softmax_attn_sp`; cu_seqlens: global document starts over ``batch * seq_len``
            tokens, or None; batch: rows ``B``.

    Returns:
        One count per rank (a flash kernel skips whole masked blocks, so its time follows these
        counts up to the block granularity).
    """
    if mode not in SOFTMAX_SP_MODES:
        raise ValueError(f"causal_pairs_per_rank: unknown mode {mode!r}; choose one of {', '.join(SOFTMAX_SP_MODES)}")
    if seq_len % world:
        raise ValueError(f"causal_pairs_per_rank: seq_len ({seq_len}) must be divisible by world ({world})")
    keys = _keys_per_query(batch, seq_len, cu_seqlens, torch.device("cpu"))
    per_query = keys.view(batch, world, -1).sum(dim=0)  # [W, C]
    per_slice = per_query.sum(dim=1)
    if mode == "ulysses":
        total = int(per_slice.sum())
        return [total // world + (1 if r < total % world else 0) for r in range(world)]
    if mode == "allgather-balanced":
        moved = balance_plan(keys, world)
        work = [int(x) for x in per_slice]
        for j, x in enumerate(moved):
            if x:
                tail = int(per_query[j, per_query.shape[1] - x:].sum())
                work[j] -= tail
                work[world - 1 - j] += tail
        return work
    return [int(x) for x in per_slice]


def _keys_per_query(batch: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[B, N]`` int64: the keys each causal query reads (from its document's start)."""
    pos = torch.arange(seq_len, dtype=torch.int64, device=device).expand(batch, seq_len)
    if cu_seqlens is None:
        return pos + 1
    cu = cu_seqlens.to(device).long()
    docs = doc_ids_from_cu_seqlens(cu, batch, seq_len, device).long()
    flat = torch.arange(batch * seq_len, device=device).view(batch, seq_len)
    row_start = (flat // seq_len) * seq_len
    return flat - torch.maximum(cu[docs], row_start) + 1
