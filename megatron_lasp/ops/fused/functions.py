"""Autograd Functions over the Triton kernels of :mod:`.kernels` (forward and backward fused)."""

from __future__ import annotations

import torch

from . import kernels

__all__ = ["FusedRMSNorm", "FusedQKVFeatures", "FusedNormGate", "FusedGLU", "rms_norm_into", "norm_gate_into",
           "glu_into"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[N, C]`` rows with a unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class FusedRMSNorm(torch.autograd.Function):
    """``y = x * rsqrt(mean(x^2) + eps) * w`` over the last dim (fp32 math, ``x``'s dtype out)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        y, rstd = kernels.rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = kernels.rms_norm_bwd(_rows(dy), x2, weight, rstd)
        return dx.view(ctx.shape), dw.to(weight.dtype), None


def rms_norm_into(x, weight, eps, out):
    """:class:`FusedRMSNorm`'s forward values written into ``out`` (dense, ``x``'s shape): the same
    kernel on the same rows, so the same bits (the in-place refill of a recomputed output)."""
    kernels.rms_norm_fwd(_rows(x), weight, eps, out=out.view(-1, out.shape[-1]))
    return out


def _heads_dense(t: torch.Tensor) -> torch.Tensor:
    """A ``[s, b, H, D]`` tensor whose heads and channels are dense (any s / b strides)."""
    H, D = t.shape[2:]
    if t.stride(3) == 1 and (t.stride(2) == D or H == 1):
        return t
    return t.contiguous()


class FusedQKVFeatures(torch.autograd.Function):
    """Split the fused projection output and apply the feature maps and the gate's sigmoid.

    ``mixed [s, b, H * P * D]`` -> ``q, k, v[, sigmoid(u)]`` each ``[s, b, H, D]``; the backward
    writes the whole ``d_mixed`` in one kernel.
    """

    @staticmethod
    def forward(ctx, mixed, heads, parts, head_dim, qk_silu, v_silu):
        mixed = mixed.contiguous()
        q, k, v, sg = kernels.qkv_features_fwd(mixed, heads, parts, head_dim, qk_silu, v_silu)
        ctx.save_for_backward(mixed)
        ctx.args = (heads, parts, head_dim, qk_silu, v_silu)
        return (q, k, v, sg) if parts == 4 else (q, k, v)

    @staticmethod
    def backward(ctx, dq, dk, dv, dsg=None):
        (mixed,) = ctx.saved_tensors
        dq, dk, dv = _heads_dense(dq), _heads_dense(dk), _heads_dense(dv)
        dsg = dsg.contiguous() if dsg is not None else None
        dm = kernels.qkv_features_bwd(mixed, dq, dk, dv, dsg, *ctx.args)
        return dm, None, None, None, None, None


class FusedNormGate(torch.autograd.Function):
    """Group RMSNorm of the attention output times the gate: ``o, sg [s, b, H, D] -> y [s, b, H * D]``."""

    @staticmethod
    def forward(ctx, o, sg, weight, group_size, eps):
        o = _heads_dense(o)
        y, rstd = kernels.norm_gate_fwd(o, sg, weight, group_size, eps)
        ctx.save_for_backward(o, sg, weight, rstd)
        ctx.group_size = group_size
        return y

    @staticmethod
    def backward(ctx, dy):
        o, sg, weight, rstd = ctx.saved_tensors
        do, dsg, dw = kernels.norm_gate_bwd(dy.contiguous(), o, sg, weight, rstd, ctx.group_size)
        return do, dsg, dw.to(weight.dtype), None, None


def norm_gate_into(o, sg, weight, group_size, eps, out):
    """:class:`FusedNormGate`'s forward values written into ``out`` (dense ``[s, b, H * D]``)."""
    kernels.norm_gate_fwd(_heads_dense(o), sg, weight, group_size, eps, out=out)
    return out


def _glu_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


class FusedGLU(torch.autograd.Function):
    """``act(a) * b`` for ``a, b = chunk(x, 2, -1)`` (``act`` = SiLU or identity)."""

    @staticmethod
    def forward(ctx, x, silu):
        x2 = _glu_rows(x)
        y = kernels.glu_fwd(x2, silu)
        ctx.save_for_backward(x2)
        ctx.silu, ctx.shape = silu, x.shape
        return y.view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dx = kernels.glu_bwd(dy.reshape(x2.shape[0], -1).contiguous(), x2, ctx.silu)
        return dx.view(ctx.shape), None


def glu_into(x, silu, out):
    """:class:`FusedGLU`'s forward values written into ``out`` (dense, ``[..., F]``)."""
    kernels.glu_fwd(_glu_rows(x), silu, out=out.view(-1, out.shape[-1]))
    return out
