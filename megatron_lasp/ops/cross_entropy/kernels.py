"""Triton kernels of the loss's softmax part, and their launchers (no autograd here).

Both kernels read one chunk of fp32 logits ``[N, V]`` (this TP rank's vocabulary slice, rows
contiguous) once; offsets are int64. See README.md for the math and the traffic.

The kernels are plain functions wrapped at first use: with ``triton.jit`` for CUDA tensors, with
Triton's interpreter for CPU tensors (``TRITON_INTERPRET=1``). They call no ``@triton.jit`` helpers
(``tl.max`` and ``tl.sum`` included): those are compiled-mode functions when Triton was imported
without ``TRITON_INTERPRET``, and the interpreter refuses them. The row reductions are
``tl.reduce`` with Triton's own max / sum combine functions instead, which is what ``tl.max`` and
``tl.sum`` expand to when compiled and what the interpreter maps to NumPy. Those two are private
names of ``triton.language.standard`` (checked with Triton 3.6 and 3.9); a rename would fail at the
first launch with an AttributeError, not silently.
"""

from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl

__all__ = ["row_stats", "softmax_grad", "launch_config", "set_launch_config"]

_LAUNCH = {"block_v": 4096, "num_warps": 8}
"""Compiled launches: vocabulary columns per block and warps per program, both kernels (on an H100,
4096 x 8 and 8192 x 16 timed the same; the loss benchmark (``benchmarks/bench_loss.py``) sweeps them)."""
_INTERPRET_BLOCK_V = 64


def launch_config() -> dict:
    """The compiled launches' ``{"block_v": ..., "num_warps": ...}``."""
    return dict(_LAUNCH)


def set_launch_config(block_v: int, num_warps: int) -> None:
    """Set the compiled launches' block width (a power of 2) and warps per program (benchmarks)."""
    if block_v < 16 or block_v & (block_v - 1) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"block_v {block_v} must be a power of 2 >= 16, num_warps {num_warps} a power of 2 <= 32")
    _LAUNCH.update(block_v=block_v, num_warps=num_warps)


def _row_stats_kernel(L, TGT, M, S, TLOG, V, sl, vocab_start, BLOCK_V: tl.constexpr):
    """One row: M = max_v L, S = sum_v exp(L - M) (online over the blocks), TLOG = L[target] or 0."""
    row = tl.program_id(0).to(tl.int64)
    base = L + row * sl
    cols = tl.arange(0, BLOCK_V)
    # first block peeled: M starts finite, so the rescaling below never sees exp(-inf - -inf)
    x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # [BV]
    m = tl.reduce(x, 0, tl.standard._elementwise_max)
    s = tl.reduce(tl.exp(x - m), 0, tl.standard._sum_combine)
    for v0 in range(BLOCK_V, V, BLOCK_V):
        c = v0 + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)  # [BV]
        m_new = tl.maximum(m, tl.reduce(x, 0, tl.standard._elementwise_max))
        s = s * tl.exp(m - m_new) + tl.reduce(tl.exp(x - m_new), 0, tl.standard._sum_combine)
        m = m_new
    t = tl.load(TGT + row) - vocab_start
    in_range = (t >= 0) & (t < V)
    tlog = tl.load(base + tl.where(in_range, t, 0), mask=in_range, other=0.0).to(tl.float32)
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(TLOG + row, tlog)


def _grad_kernel(L, LSE, TGT, SCALE, G, V, sl, sg, vocab_start, BLOCK_V: tl.constexpr):
    """One [1, BV] block: G = (exp(L - LSE) - onehot(target)) * SCALE, in G's dtype."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = c < V
    x = tl.load(L + row * sl + c, mask=mask, other=0.0).to(tl.float32)  # [BV]
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    t = tl.load(TGT + row) - vocab_start  # outside [0, V): matches no column
    g = (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)) * scale
    tl.store(G + row * sg + c, g.to(G.dtype.element_ty), mask=mask)


_KERNEL_FNS = (_row_stats_kernel, _grad_kernel)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> types.SimpleNamespace:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return types.SimpleNamespace(**{fn.__name__.strip("_"): InterpretedFunction(fn) for fn in _KERNEL_FNS})
    # V and the row stride keep Triton's divisibility specialisation (vectorised loads)
    return types.SimpleNamespace(**{fn.__name__.strip("_"): triton.jit(fn) for fn in _KERNEL_FNS})


def _setup(logits: torch.Tensor):
    interpret = logits.device.type == "cpu"
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1, "fp32 [N, V] rows"
    launch = {"BLOCK_V": _INTERPRET_BLOCK_V} if interpret else {"BLOCK_V": _LAUNCH["block_v"],
                                                                "num_warps": _LAUNCH["num_warps"]}
    return _kernels(interpret), launch


def row_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int):
    """Per-row local softmax statistics of one chunk.

    Args:
        logits: ``[N, V]`` fp32, this rank's vocabulary columns ``[vocab_start, vocab_start + V)``.
        target: ``[N]`` int64 global token ids.
        vocab_start: the global id of column 0.

    Returns:
        ``(m, s, target_logit)``, each ``[N]`` fp32: the row max, ``sum exp(logits - m)``, and the
        target's logit where the target is in this slice (0 elsewhere).
    """
    kern, launch = _setup(logits)
    n, v = logits.shape
    m, s, tlog = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n:
        kern.row_stats_kernel[(n,)](logits, target.contiguous(), m, s, tlog, v, logits.stride(0), vocab_start,
                                    **launch)
    return m, s, tlog


def softmax_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, vocab_start: int,
                 scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(softmax(logits) - onehot(target)) * scale[:, None]`` in ``dtype``, one pass.

    Args:
        logits: ``[N, V]`` fp32 (as :func:`row_stats`).
        lse: ``[N]`` fp32 log-sum-exp of the whole row (over every TP rank's slice).
        target: ``[N]`` int64 global token ids (outside this slice: no one-hot term).
        vocab_start: the global id of column 0.
        scale: ``[N]`` fp32 per-row factor (loss weights or the incoming loss gradient).
        dtype: the gradient's dtype (the matmul inputs').

    Returns:
        ``[N, V]`` gradient of the loss with respect to the logits.
    """
    kern, launch = _setup(logits)
    n, v = logits.shape
    g = torch.empty((n, v), dtype=dtype, device=logits.device)
    if n:
        kern.grad_kernel[(n, triton.cdiv(v, launch["BLOCK_V"]))](
            logits, lse.contiguous(), target.contiguous(), scale.contiguous(), g, v, logits.stride(0), g.stride(0),
            vocab_start, **launch)
    return g
