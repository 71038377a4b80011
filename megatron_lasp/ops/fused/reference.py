"""Plain PyTorch versions of the fused elementwise ops (the CPU path and the tests' ground truth).

Each function is what the model computed before fusion, operation for operation, so that a run
with fusion off keeps its losses bit for bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["rms_norm_ref", "qkv_features_ref", "norm_gate_ref", "glu_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in ``x``'s dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def qkv_features_ref(
    mixed: torch.Tensor, heads: int, parts: int, head_dim: int, qk_silu: bool, v_silu: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``mixed [s, b, heads * parts * head_dim]`` -> ``phi(q), phi(k), psi(v), sigmoid(u)``, each
    ``[s, b, heads, head_dim]`` (``sigmoid(u)`` is None for ``parts == 3``)."""
    s, b = mixed.shape[:2]
    m = mixed.view(s, b, heads, parts, head_dim)
    q, k, v = m[:, :, :, 0], m[:, :, :, 1], m[:, :, :, 2]
    if qk_silu:
        q, k = F.silu(q), F.silu(k)
    if v_silu:
        v = F.silu(v)
    sg = torch.sigmoid(m[:, :, :, 3]) if parts == 4 else None
    return q, k, v, sg


def norm_gate_ref(
    o: torch.Tensor, sg: Optional[torch.Tensor], weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """Group RMSNorm of ``o [s, b, H, D]`` (groups of ``group_size`` heads, weight ``[H * D]``)
    times the gate ``sg [s, b, H, D]`` (or None) -> ``[s, b, H * D]``."""
    s, b, H, D = o.shape
    groups = H // group_size
    y = rms_norm_ref(o.reshape(s, b, groups, group_size * D), weight.view(groups, group_size * D), eps)
    y = y.view(s, b, H, D)
    if sg is not None:
        y = y * sg
    return y.reshape(s, b, H * D)


def glu_ref(x: torch.Tensor, silu: bool) -> torch.Tensor:
    """``act(a) * b`` for ``a, b = chunk(x, 2, -1)``, ``act`` = SiLU or identity (SGLU)."""
    a, b = torch.chunk(x, 2, dim=-1)
    return (F.silu(a) if silu else a) * b
