"""The softmax part of the chunked output layer + cross entropy, as two Triton kernels.

:mod:`megatron_lasp.models.loss` computes one chunk of fp32 logits ``[N, V]`` at a time (this TP
rank's vocabulary slice); everything between that matmul and the two gradient matmuls is
elementwise work over the chunk. ``kernel="torch"`` (the default) runs it as PyTorch ops
(:func:`megatron_lasp.models.loss._chunk_stats` and ``_grad_logits_``, the reference);
``kernel="triton"`` runs it as the two kernels of :mod:`.kernels`:

- :func:`row_stats`: per row the local max ``m``, ``s = sum exp(logits - m)`` and the target
  logit, one read of the logits (the caller combines them over the TP group as before);
- :func:`softmax_grad`: ``(exp(logits - lse) - onehot(target)) * scale`` written once in the
  matmul dtype, one more read.

The Triton kernels run on CUDA tensors, and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, the tests). Measured against the PyTorch path and the libraries: README.md.
"""

from __future__ import annotations

import torch

from megatron_lasp.ops import interpreting

__all__ = ["KERNELS", "check_kernel", "row_stats", "softmax_grad"]

KERNELS = ("torch", "triton")
"""Values of the loss's ``kernel`` option."""


def check_kernel(kernel: str, device: torch.device) -> None:
    """Raise ``ValueError`` (one line, what to change) if ``kernel`` cannot run on ``device``."""
    if kernel not in KERNELS:
        raise ValueError(f"cross entropy kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel != "triton" or device.type == "cuda":
        return
    if device.type != "cpu" or not interpreting():
        raise ValueError(f"cross entropy kernel 'triton' needs CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1), got {device.type}: use kernel 'torch'")


def row_stats(logits, target, vocab_start):
    """See :func:`.kernels.row_stats` (imports Triton at first use)."""
    from .kernels import row_stats as fn

    return fn(logits, target, vocab_start)


def softmax_grad(logits, lse, target, vocab_start, scale, dtype):
    """See :func:`.kernels.softmax_grad` (imports Triton at first use)."""
    from .kernels import softmax_grad as fn

    return fn(logits, lse, target, vocab_start, scale, dtype)
