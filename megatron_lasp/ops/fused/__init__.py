"""Fused elementwise ops around the matmuls of the linear LM (Triton; plain PyTorch on CPU).

Ops (each ``fused=True`` runs the Triton kernels for CUDA tensors, and for CPU tensors under
``TRITON_INTERPRET=1``; everything else runs the PyTorch reference of :mod:`.reference`):

- ``rms_norm(x, weight, eps)``: the pre-norms and the final norm, ``[..., C] -> [..., C]``.
- ``qkv_features(mixed, heads, parts, head_dim, qk_silu, v_silu)``: the fused projection output
  ``[s, b, heads * parts * head_dim]`` -> ``phi(q), phi(k), psi(v)`` and ``sigmoid(u)`` (None
  without the gate), each ``[s, b, heads, head_dim]``.
- ``norm_gate(o, sg, weight, group_size, eps)``: group RMSNorm of the attention output times the
  gate, ``[s, b, H, D] -> [s, b, H * D]``.
- ``glu(x, silu)``: the GLU product ``act(a) * b``, ``[..., 2F] -> [..., F]``.

Every op's forward and backward is one kernel each (plus a small sum of per-program weight
gradients). With ``recompute=True`` the output is tagged for :func:`discard_until_backward`
(selective recompute of elementwise outputs, see :mod:`.recompute`); the fused kernels then refill
the freed storage in place.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_lasp.ops import interpreting

from .recompute import discard_until_backward, mark_recomputable
from .reference import glu_ref, norm_gate_ref, qkv_features_ref, rms_norm_ref

__all__ = ["rms_norm", "qkv_features", "norm_gate", "glu", "fusion_default", "can_fuse", "interpreting",
           "discard_until_backward", "mark_recomputable", "rms_norm_ref", "qkv_features_ref", "norm_gate_ref",
           "glu_ref"]


def fusion_default() -> bool:
    """The default of the fusion switch: on with CUDA, off on CPU."""
    return torch.cuda.is_available()


def can_fuse(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device (CUDA, or CPU in the interpreter)."""
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and interpreting()


def _functions():
    from . import functions

    return functions


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = True,
             recompute: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math), in ``x``'s dtype."""
    def run(into=None):
        if fused and can_fuse(x):
            f = _functions()
            if into is None:
                return f.FusedRMSNorm.apply(x, weight, eps)
            return f.rms_norm_into(x, weight, eps, into)
        return rms_norm_ref(x, weight, eps)

    y = run()
    if recompute:
        mark_recomputable(y, run, writes_into=True)
    return y


def qkv_features(mixed: torch.Tensor, heads: int, parts: int, head_dim: int, qk_silu: bool, v_silu: bool,
                 fused: bool = True):
    """``(q, k, v, sg)`` from the fused projection output (see the module docstring)."""
    if fused and can_fuse(mixed):
        out = _functions().FusedQKVFeatures.apply(mixed, heads, parts, head_dim, qk_silu, v_silu)
        return tuple(out) if parts == 4 else (*out, None)
    return qkv_features_ref(mixed, heads, parts, head_dim, qk_silu, v_silu)


def norm_gate(o: torch.Tensor, sg: Optional[torch.Tensor], weight: torch.Tensor, group_size: int, eps: float,
              fused: bool = True, recompute: bool = False) -> torch.Tensor:
    """Group RMSNorm x gate: ``[s, b, H, D] -> [s, b, H * D]``."""
    def run(into=None):
        if fused and can_fuse(o):
            f = _functions()
            if into is None:
                return f.FusedNormGate.apply(o, sg, weight, group_size, eps)
            return f.norm_gate_into(o, sg, weight, group_size, eps, into)
        return norm_gate_ref(o, sg, weight, group_size, eps)

    y = run()
    if recompute:
        mark_recomputable(y, run, writes_into=True)
    return y


def glu(x: torch.Tensor, silu: bool, fused: bool = True, recompute: bool = False) -> torch.Tensor:
    """``act(a) * b`` with ``a, b = chunk(x, 2, -1)``: ``[..., 2F] -> [..., F]``."""
    def run(into=None):
        if fused and can_fuse(x):
            f = _functions()
            if into is None:
                return f.FusedGLU.apply(x, silu)
            return f.glu_into(x, silu, into)
        return glu_ref(x, silu)

    y = run()
    if recompute:
        mark_recomputable(y, run, writes_into=True)
    return y
