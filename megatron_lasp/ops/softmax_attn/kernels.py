"""``softmax_attn``: causal softmax attention (bottom-right aligned) dispatched to a library kernel.

Kernels (``kernel=``):

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``. Without documents the causal
  mask is ``is_causal`` (``Tq == Tk``) or torch's lower-right ``CausalBias`` (``Tq < Tk``), so torch
  picks flash / cuDNN / memory-efficient attention on the GPU and never builds a mask. With
  documents it passes a boolean ``[B, 1, Tq, Tk]`` mask (memory-efficient / math backends).
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a block mask (causal offset and
  documents), compiled on the GPU; blocks that are wholly masked are skipped. Forward only on the
  CPU (torch has no CPU backward for it).
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (flash-attention's variable-length
  kernel, CUDA only, where torch has it): every (row, document) becomes one sequence, queries and
  keys with their own offsets; needs one host synchronisation for the longest segment.
- ``"math"``: SDPA with an explicit boolean mask in every case (the CPU path, any dtype).
- ``"auto"``: on CUDA ``sdpa`` without documents (``varlen`` for grouped-query attention with
  fewer queries than keys, fp16 / bf16, where SDPA would repeat the key/value heads) and ``varlen``
  with them (``flex`` for fp32 or a torch without ``varlen_attn``); on the CPU ``sdpa`` without
  documents, ``math`` with them. The
  choice is measured (README.md, "Which kernel"): on an H100 at 32K tokens, bf16, SDPA's flash
  kernel is 1.7x faster than ``flex`` and ``varlen`` without documents, and with 2K-token documents
  ``varlen`` is 2.5x faster than ``flex`` and 11x faster than SDPA's masked path, where ``flex``
  runs out of memory at 128K.

Grouped-query attention is native in every kernel except SDPA's lower-right causal bias, which
torch does not pass ``enable_gqa`` through: there the key/value heads are repeated (a copy of the
keys, the cost is written in README.md).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["SOFTMAX_KERNELS", "auto_kernel", "softmax_attn"]

SOFTMAX_KERNELS = ("auto", "sdpa", "flex", "varlen", "math")
"""The kernel choices of :func:`softmax_attn`."""


def _check(q, k, v, q_docs, k_docs, kernel):
    if kernel not in SOFTMAX_KERNELS:
        raise ValueError(f"softmax attention: unknown kernel {kernel!r}; choose one of {', '.join(SOFTMAX_KERNELS)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"softmax attention: q, k, v must be [B, T, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, Hq, D = q.shape
    if k.shape[:2] != v.shape[:2] or k.shape[0] != B or k.shape[2] != v.shape[2] or k.shape[3] != D:
        raise ValueError(f"softmax attention: k must be [B, Tk, Hkv, D] and v [B, Tk, Hkv, Dv] with q's B and D, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % k.shape[2] != 0:
        raise ValueError(f"softmax attention: the query heads ({Hq}) must be a multiple of the key/value heads "
                         f"({k.shape[2]}) (grouped-query attention)")
    if k.shape[1] < Tq:
        raise ValueError(f"softmax attention: the queries are the last Tq positions of the keys, so Tk "
                         f"({k.shape[1]}) must be >= Tq ({Tq})")
    if (q_docs is None) != (k_docs is None):
        raise ValueError("softmax attention: pass both q_docs and k_docs, or neither")
    if q_docs is not None and (tuple(q_docs.shape) != (B, Tq) or tuple(k_docs.shape) != (B, k.shape[1])):
        raise ValueError(f"softmax attention: q_docs must be [B, Tq] = {(B, Tq)} and k_docs [B, Tk] = "
                         f"{(B, k.shape[1])}, got {tuple(q_docs.shape)}, {tuple(k_docs.shape)}")


def _mask(q_docs, k_docs, Tq: int, Tk: int, device) -> torch.Tensor:
    """Boolean ``[B or 1, 1, Tq, Tk]``: True where query ``i`` may read key ``j``."""
    qpos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    mask = (torch.arange(Tk, device=device)[None, :] <= qpos)[None, None]
    if q_docs is not None:
        mask = mask & (q_docs[:, None, :, None] == k_docs[:, None, None, :])
    return mask


def _repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, Hkv n, T, D]`` (query head ``h`` reads head ``h // n``)."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _sdpa(q, k, v, mask, scale, gqa: int):
    """q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; ``mask`` a bool tensor, "causal" or a CausalBias."""
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa > 1)
    if not isinstance(mask, torch.Tensor):  # CausalBias: torch drops enable_gqa on its fused paths
        return F.scaled_dot_product_attention(q, _repeat_heads(k, gqa), _repeat_heads(v, gqa), attn_mask=mask,
                                              scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa > 1)


@functools.lru_cache(maxsize=None)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex(q, k, v, q_docs, k_docs, scale, gqa: int):
    from torch.nn.attention.flex_attention import create_block_mask

    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise ValueError("softmax attention: kernel 'flex' has no backward on the CPU in torch; use 'math' or 'sdpa'")
        q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses inputs that require grad there
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    offset = Tk - Tq
    if q_docs is None:
        def mask_mod(b, h, qi, ki):
            return ki <= qi + offset
    else:
        def mask_mod(b, h, qi, ki):
            return (ki <= qi + offset) & (q_docs[b, qi] == k_docs[b, ki])
    block_mask = create_block_mask(mask_mod, None if q_docs is None else B, None, Tq, Tk, device=q.device)
    return _flex_fn(q.device.type == "cuda")(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa > 1)


def _segments(docs: torch.Tensor):
    """``[B, T]`` document ids -> (segment index of every token ``[B T]``, number of segments).

    A segment is a run of one document inside one row (a row start always starts a segment).
    """
    B, T = docs.shape
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    seg = torch.cumsum(starts.reshape(-1).long(), 0) - 1
    return seg, int(seg[-1]) + 1


def _varlen(q, k, v, q_docs, k_docs, scale, gqa: int):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise ValueError("softmax attention: kernel 'varlen' needs torch.nn.attention.varlen (a newer torch); "
                         "use 'flex' or 'sdpa'") from e
    if q.dtype not in (torch.float16, torch.bfloat16):
        # flash-attention's varlen kernel has no fp32 form
        raise ValueError(f"softmax attention: kernel 'varlen' takes fp16 / bf16 inputs, got {q.dtype}; "
                         "use 'flex' or 'sdpa' (or 'auto') for fp32")
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    if k_docs is None:
        # one segment a sequence: the offsets follow from the shapes, with no host synchronisation
        # (so that a CUDA graph can hold the call)
        starts = torch.arange(B + 1, dtype=torch.int32, device=q.device)
        cu_q, cu_k, max_q, max_k = starts * Tq, starts * Tk, Tq, Tk
    else:
        # queries are the keys' last Tq positions, so a query's segment is the key segment it lies in
        k_seg, n_seg = _segments(k_docs)
        q_seg = k_seg.view(B, Tk)[:, Tk - Tq:].reshape(-1)
        len_k = torch.bincount(k_seg, minlength=n_seg)
        len_q = torch.bincount(q_seg, minlength=n_seg)
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        cu_k = torch.cat([zero, torch.cumsum(len_k, 0).to(torch.int32)])
        cu_q = torch.cat([zero, torch.cumsum(len_q, 0).to(torch.int32)])
        max_q, max_k = int(len_q.max()), int(len_k.max())  # the one host synchronisation
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"scale": scale} if "scale" in params else {}
    kk, vv = k.reshape(B * Tk, -1, D), v.reshape(B * Tk, k.shape[2], -1)
    if gqa > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif gqa > 1:
        kk, vv = kk.repeat_interleave(gqa, 1), vv.repeat_interleave(gqa, 1)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal, bottom-right aligned when Tq < Tk
    else:
        kwargs["is_causal"] = True
    o = varlen_attn(q.reshape(B * Tq, Hq, D), kk, vv, cu_q, cu_k, max_q, max_k, **kwargs)
    return o.view(B, Tq, Hq, -1)


def _has_varlen() -> bool:
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn")


def auto_kernel(device_type: str, dtype: torch.dtype, documents: bool, grouped_lower_right: bool = False) -> str:
    """The kernel ``"auto"`` runs for inputs on ``device_type`` in ``dtype``, with or without
    documents; ``grouped_lower_right``: grouped-query attention whose queries are the last ``Tq < Tk``
    positions of the keys (a sequence-parallel rank's slice against the gathered keys, a query
    chunk), where SDPA's lower-right causal path would repeat the key/value heads."""
    half = dtype in (torch.float16, torch.bfloat16)
    if not documents:
        # there varlen reads the grouped heads as they are, for 1-6% more time than SDPA on an
        # H100 (8K x 32K and 32K x 128K, 4 key/value heads, README.md "Which kernel")
        if grouped_lower_right and device_type == "cuda" and half and _has_varlen():
            return "varlen"
        return "sdpa"
    if device_type != "cuda":
        return "math"
    # Under torch.use_deterministic_algorithms (--deterministic-mode) flash-attention's varlen
    # backward takes its deterministic path (same bits twice, measured on an H100 by
    # tests/test_gpu_hybrid.py; without it dq is summed with atomics), so varlen stays the choice.
    return "varlen" if half and _has_varlen() else "flex"


def softmax_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_docs: Optional[torch.Tensor] = None,
                 k_docs: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                 kernel: str = "auto") -> torch.Tensor:
    """Causal softmax attention of ``Tq`` queries that are the last positions of ``Tk`` keys.

    Query ``i`` sits at position ``Tk - Tq + i`` and reads key ``j`` iff ``j <= Tk - Tq + i`` and
    (with documents) ``q_docs[b, i] == k_docs[b, j]``. Differentiable (autograd through the
    library kernel).

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``; ``Hq % Hkv == 0``.
        q_docs: ``[B, Tq]`` int document ids of the queries, or None (one document per row).
        k_docs: ``[B, Tk]`` document ids of the keys (the queries' ids are its last ``Tq`` columns).
        scale: the logit scale, default ``D ** -0.5``.
        kernel: one of :data:`SOFTMAX_KERNELS` (module docstring).

    Returns:
        ``o [B, Tq, Hq, Dv]`` in q's dtype.
    """
    _check(q, k, v, q_docs, k_docs, kernel)
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    gqa = Hq // k.shape[2]
    if kernel == "auto":
        kernel = auto_kernel(q.device.type, q.dtype, q_docs is not None, Tq < Tk and gqa > 1)
    if kernel == "varlen":
        return _varlen(q, k, v, q_docs, k_docs, scale, gqa)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    if kernel == "flex":
        o = _flex(qh, kh, vh, q_docs, k_docs, scale, gqa)
    elif kernel == "sdpa" and q_docs is None:
        from torch.nn.attention.bias import causal_lower_right

        o = _sdpa(qh, kh, vh, "causal" if Tq == Tk else causal_lower_right(Tq, Tk), scale, gqa)
    else:
        o = _sdpa(qh, kh, vh, _mask(q_docs, k_docs, Tq, Tk, q.device), scale, gqa)
    return o.transpose(1, 2)
