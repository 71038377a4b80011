"""Triton kernels of the fused elementwise ops and their launchers (no autograd here).

Every kernel reads its inputs once, computes in fp32 and writes each output once in the
activation dtype; offsets are int64. Layouts (``T`` = tokens = s * b, token ``t = i_s * b + i_b``):

- rms_norm: ``x [N, C]`` rows -> ``y [N, C]``, ``rstd [N]`` fp32.
- qkv_features: ``mixed [T, H, P, D]`` (the fused projection, contiguous) -> ``q, k, v, sg``
  ``[T, H, D]`` contiguous each; backward writes ``d_mixed [T, H, P, D]`` in one pass (no
  zero-filled slice gradients, no accumulation).
- norm_gate: ``o`` (``[s, b, H, D]`` with any s/b strides, heads dense) and ``sg [T, H, D]`` ->
  ``y [T, H * D]`` (the row-parallel input), ``rstd [T, H / G]`` fp32.
- glu: ``x [T, 2F]`` -> ``y [T, F]``.

Weight gradients are reduced per program into an fp32 ``[programs, C]`` buffer that the caller
sums (deterministic, no atomics).

The kernels are plain functions wrapped with ``triton.jit`` at first use, so importing this module
does not compile anything; on CPU they run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` set before Triton is first imported (the tests do so).
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm_fwd", "rms_norm_bwd", "qkv_features_fwd", "qkv_features_bwd", "norm_gate_fwd",
           "norm_gate_bwd", "glu_fwd", "glu_bwd"]


def _rms_fwd_kernel(X, W, Y, RSTD, N, C, sx, sy, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)  # [BC]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def _rms_bwd_kernel(DY, X, W, RSTD, DX, DWP, N, C, sdy, sx, sdx, rows_per_prog, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = start + i
        m = cols < tl.where(row < N, C, 0)  # the rows past N of the last program load nothing
        x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sdy + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, N - 1))
        xhat = x * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / C
        tl.store(DX + row * sdx + cols, ((g - xhat * c) * rstd).to(DX.dtype.element_ty), mask=m)
        dw += dy * xhat
    tl.store(DWP + pid.to(tl.int64) * C + cols, dw, mask=mask)


def _feat_fwd_kernel(M, Q, K, V, SG, R, D, P: tl.constexpr, QK_SILU: tl.constexpr, V_SILU: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (token, head) pairs
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    src = M + rows[:, None] * (P * D) + cols[None, :]  # [BR, BD]
    dst = rows[:, None] * D + cols[None, :]
    q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(src + 2 * D, mask=mask, other=0.0).to(tl.float32)
    if QK_SILU:
        q = q / (1.0 + tl.exp(-q))
        k = k / (1.0 + tl.exp(-k))
    if V_SILU:
        v = v / (1.0 + tl.exp(-v))
    tl.store(Q + dst, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(K + dst, k.to(K.dtype.element_ty), mask=mask)
    tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)
    if P == 4:
        u = tl.load(src + 3 * D, mask=mask, other=0.0).to(tl.float32)
        tl.store(SG + dst, (1.0 / (1.0 + tl.exp(-u))).to(SG.dtype.element_ty), mask=mask)


def _feat_bwd_kernel(M, DQ, DK, DV, DSG, DM, R, H, B, D, sq_s, sq_b, sk_s, sk_b, sv_s, sv_b,
                     P: tl.constexpr, QK_SILU: tl.constexpr, V_SILU: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    t, h = rows // H, rows % H
    i_s, i_b = t // B, t % B
    src = rows[:, None] * (P * D) + cols[None, :]  # [BR, BD] into mixed / d_mixed
    hc = (h * D)[:, None] + cols[None, :]
    dq = tl.load(DQ + (i_s * sq_s + i_b * sq_b)[:, None] + hc, mask=mask, other=0.0).to(tl.float32)
    dk = tl.load(DK + (i_s * sk_s + i_b * sk_b)[:, None] + hc, mask=mask, other=0.0).to(tl.float32)
    dv = tl.load(DV + (i_s * sv_s + i_b * sv_b)[:, None] + hc, mask=mask, other=0.0).to(tl.float32)
    if QK_SILU:
        q = tl.load(M + src, mask=mask, other=0.0).to(tl.float32)
        k = tl.load(M + src + D, mask=mask, other=0.0).to(tl.float32)
        s_q = 1.0 / (1.0 + tl.exp(-q))
        s_k = 1.0 / (1.0 + tl.exp(-k))
        dq = dq * s_q * (1.0 + q * (1.0 - s_q))
        dk = dk * s_k * (1.0 + k * (1.0 - s_k))
    if V_SILU:
        v = tl.load(M + src + 2 * D, mask=mask, other=0.0).to(tl.float32)
        s_v = 1.0 / (1.0 + tl.exp(-v))
        dv = dv * s_v * (1.0 + v * (1.0 - s_v))
    tl.store(DM + src, dq.to(DM.dtype.element_ty), mask=mask)
    tl.store(DM + src + D, dk.to(DM.dtype.element_ty), mask=mask)
    tl.store(DM + src + 2 * D, dv.to(DM.dtype.element_ty), mask=mask)
    if P == 4:
        u = tl.load(M + src + 3 * D, mask=mask, other=0.0).to(tl.float32)
        dsg = tl.load(DSG + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_u = 1.0 / (1.0 + tl.exp(-u))
        tl.store(DM + src + 3 * D, (dsg * s_u * (1.0 - s_u)).to(DM.dtype.element_ty), mask=mask)


def _ng_fwd_kernel(O, SG, W, Y, RSTD, R, NG, B, GD, so_s, so_b, eps, HAS_GATE: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (token, group) pairs
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    mask = rmask[:, None] & (cols < GD)[None, :]
    t, g = rows // NG, rows % NG
    i_s, i_b = t // B, t % B
    x = tl.load(O + (i_s * so_s + i_b * so_b + g * GD)[:, None] + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)  # [BR, BC]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / GD + eps)  # [BR]
    w = tl.load(W + (g * GD)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w
    dense = rows[:, None] * GD + cols[None, :]
    if HAS_GATE:
        y = y * tl.load(SG + dense, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + dense, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


def _ng_bwd_kernel(DY, O, SG, W, RSTD, DO, DSG, DWP, T, NG, B, GD, so_s, so_b, tokens_per_prog,
                   HAS_GATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < GD
    w = tl.load(W + g * GD + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    start = pid * tokens_per_prog
    for t0 in range(start, start + tokens_per_prog, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        tmask = t < T
        mask = tmask[:, None] & cmask[None, :]
        i_s, i_b = t // B, t % B
        rows = t * NG + g
        dense = rows[:, None] * GD + cols[None, :]  # [BT, BC]
        x = tl.load(O + (i_s * so_s + i_b * so_b + g * GD)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=tmask, other=0.0)
        dy = tl.load(DY + dense, mask=mask, other=0.0).to(tl.float32)
        xhat = x * rstd[:, None]
        if HAS_GATE:
            sg = tl.load(SG + dense, mask=mask, other=0.0).to(tl.float32)
            tl.store(DSG + dense, (dy * xhat * w[None, :]).to(DSG.dtype.element_ty), mask=mask)
            dn = dy * sg
        else:
            dn = dy
        dw += dn * xhat
        gx = dn * w[None, :]
        c = tl.sum(gx * xhat, axis=1) / GD
        tl.store(DO + dense, ((gx - xhat * c[:, None]) * rstd[:, None]).to(DO.dtype.element_ty), mask=mask)
    tl.store(DWP + pid.to(tl.int64) * NG * GD + g * GD + cols, tl.sum(dw, axis=0), mask=cmask)


def _glu_fwd_kernel(X, Y, F, SILU: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(X + t * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X + t * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        a = a / (1.0 + tl.exp(-a))
    tl.store(Y + t * F + cols, (a * b).to(Y.dtype.element_ty), mask=mask)


def _glu_bwd_kernel(DY, X, DX, F, SILU: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(X + t * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X + t * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + t * F + cols, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        s = 1.0 / (1.0 + tl.exp(-a))
        da = dy * b * s * (1.0 + a * (1.0 - s))
        db = dy * a * s
    else:
        da = dy * b
        db = dy * a
    tl.store(DX + t * 2 * F + cols, da.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + t * 2 * F + F + cols, db.to(DX.dtype.element_ty), mask=mask)


# Token counts vary with the sequence length and stay unspecialised (one compile for every length);
# widths (C, D, GD, F) and strides keep Triton's divisibility specialisation, which the vectorised
# 16-byte accesses need, and are fixed for a model.
_SIZES = ("N", "R", "T", "rows_per_prog", "tokens_per_prog")


@functools.lru_cache(maxsize=None)
def _k() -> types.SimpleNamespace:
    """The jitted kernels (built once)."""
    out = {}
    for fn in (_rms_fwd_kernel, _rms_bwd_kernel, _feat_fwd_kernel, _feat_bwd_kernel, _ng_fwd_kernel,
               _ng_bwd_kernel, _glu_fwd_kernel, _glu_bwd_kernel):
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        out[fn.__name__[1:-7]] = triton.jit(fn, do_not_specialize=[n for n in _SIZES if n in names])
    return types.SimpleNamespace(**out)


def _programs(device: torch.device) -> int:
    """Programs for the weight-gradient reductions: a few per multiprocessor."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(elements: int) -> int:
    return 8 if elements >= 4096 else 4 if elements >= 1024 else 2 if elements >= 256 else 1


# ---------------------------------------------------------------------------------------------- rms


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None):
    """``x2 [N, C]`` (unit column stride) -> ``(y [N, C], rstd [N] fp32)``; ``out``: a dense ``[N, C]``
    tensor to write ``y`` into."""
    N, C = x2.shape
    y = torch.empty((N, C), device=x2.device, dtype=x2.dtype) if out is None else out
    rstd = torch.empty((N,), device=x2.device, dtype=torch.float32)
    BC = _pow2(C)
    if N:
        _k().rms_fwd[(N,)](x2, weight, y, rstd, N, C, x2.stride(0), y.stride(0), float(eps), BLOCK_C=BC,
                           num_warps=_warps(BC))
    return y, rstd


def rms_norm_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """-> ``(dx [N, C] in x's dtype, dw [C] fp32)``."""
    N, C = x2.shape
    dx = torch.empty((N, C), device=x2.device, dtype=x2.dtype)
    progs = max(1, min(N, _programs(x2.device)))
    per = triton.cdiv(N, progs)
    dwp = torch.empty((progs, C), device=x2.device, dtype=torch.float32)
    BC = _pow2(C)
    _k().rms_bwd[(progs,)](dy2, x2, weight, rstd, dx, dwp, N, C, dy2.stride(0), x2.stride(0), dx.stride(0), per,
                           BLOCK_C=BC, num_warps=_warps(BC))
    return dx, dwp.sum(0)


# ---------------------------------------------------------------------------------------------- features


def _feat_blocks(D: int):
    BD = _pow2(D)
    BR = max(1, 2048 // BD)
    return BR, BD


def qkv_features_fwd(mixed: torch.Tensor, heads: int, parts: int, head_dim: int, qk_silu: bool, v_silu: bool):
    """``mixed`` contiguous ``[s, b, heads * parts * head_dim]`` -> ``q, k, v, sg`` ``[s, b, heads, head_dim]``."""
    s, b = mixed.shape[:2]
    R = s * b * heads
    shape = (s, b, heads, head_dim)
    q, k, v = (torch.empty(shape, device=mixed.device, dtype=mixed.dtype) for _ in range(3))
    sg = torch.empty(shape, device=mixed.device, dtype=mixed.dtype) if parts == 4 else q
    BR, BD = _feat_blocks(head_dim)
    _k().feat_fwd[(triton.cdiv(R, BR),)](mixed, q, k, v, sg, R, head_dim, P=parts, QK_SILU=qk_silu, V_SILU=v_silu,
                                         BLOCK_R=BR, BLOCK_D=BD, num_warps=_warps(BR * BD))
    return q, k, v, (sg if parts == 4 else None)


def qkv_features_bwd(mixed, dq, dk, dv, dsg, heads: int, parts: int, head_dim: int, qk_silu: bool, v_silu: bool):
    """Gradients ``[s, b, heads, head_dim]`` (any s / b strides; heads dense) -> ``d_mixed`` like ``mixed``."""
    s, b = mixed.shape[:2]
    R = s * b * heads
    dm = torch.empty_like(mixed)
    BR, BD = _feat_blocks(head_dim)
    if dsg is None:
        dsg = dq
    _k().feat_bwd[(triton.cdiv(R, BR),)](
        mixed, dq, dk, dv, dsg, dm, R, heads, b, head_dim,
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        P=parts, QK_SILU=qk_silu, V_SILU=v_silu, BLOCK_R=BR, BLOCK_D=BD, num_warps=_warps(BR * BD))
    return dm


# ---------------------------------------------------------------------------------------------- norm x gate


def norm_gate_fwd(o: torch.Tensor, sg, weight: torch.Tensor, group_size: int, eps: float,
                  out: Optional[torch.Tensor] = None):
    """``o [s, b, H, D]`` (heads dense), ``sg`` contiguous or None -> ``(y [s, b, H * D], rstd [s * b * H / G])``;
    ``out``: a dense ``[s, b, H * D]`` tensor to write ``y`` into."""
    s, b, H, D = o.shape
    NG, GD = H // group_size, group_size * D
    R = s * b * NG
    y = torch.empty((s, b, H * D), device=o.device, dtype=o.dtype) if out is None else out
    rstd = torch.empty((R,), device=o.device, dtype=torch.float32)
    BC = _pow2(GD)
    BR = max(1, 2048 // BC)
    _k().ng_fwd[(triton.cdiv(R, BR),)](o, sg if sg is not None else o, weight, y, rstd, R, NG, b, GD,
                                       o.stride(0), o.stride(1), float(eps), HAS_GATE=sg is not None,
                                       BLOCK_R=BR, BLOCK_C=BC, num_warps=_warps(BR * BC))
    return y, rstd


def norm_gate_bwd(dy: torch.Tensor, o: torch.Tensor, sg, weight: torch.Tensor, rstd: torch.Tensor, group_size: int):
    """``dy`` contiguous ``[s, b, H * D]`` -> ``(do [s, b, H, D], dsg or None, dw [H * D] fp32)``."""
    s, b, H, D = o.shape
    NG, GD = H // group_size, group_size * D
    T = s * b
    BC = _pow2(GD)
    BT = max(1, min(2048 // BC, _pow2(T)))
    progs = max(1, min(triton.cdiv(T, BT), max(1, _programs(o.device) // NG)))
    per = triton.cdiv(triton.cdiv(T, progs), BT) * BT
    progs = triton.cdiv(T, per)
    do = torch.empty((s, b, H, D), device=o.device, dtype=o.dtype)
    dsg = torch.empty((s, b, H, D), device=o.device, dtype=o.dtype) if sg is not None else None
    dwp = torch.empty((progs, NG * GD), device=o.device, dtype=torch.float32)
    _k().ng_bwd[(progs, NG)](dy, o, sg if sg is not None else o, weight, rstd, do, dsg if dsg is not None else do, dwp,
                             T, NG, b, GD, o.stride(0), o.stride(1), per, HAS_GATE=sg is not None,
                             BLOCK_T=BT, BLOCK_C=BC, num_warps=_warps(BT * BC))
    return do, dsg, dwp.sum(0)


# ---------------------------------------------------------------------------------------------- glu

_GLU_BLOCK = 1024


def glu_fwd(x2: torch.Tensor, silu: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2`` contiguous ``[T, 2F]`` -> ``[T, F]``; ``out``: a dense ``[T, F]`` tensor to write into."""
    T, F2 = x2.shape
    F = F2 // 2
    y = torch.empty((T, F), device=x2.device, dtype=x2.dtype) if out is None else out
    BLOCK = min(_GLU_BLOCK, _pow2(F))
    if T:
        _k().glu_fwd[(T, triton.cdiv(F, BLOCK))](x2, y, F, SILU=silu, BLOCK=BLOCK, num_warps=_warps(BLOCK))
    return y


def glu_bwd(dy2: torch.Tensor, x2: torch.Tensor, silu: bool) -> torch.Tensor:
    """``dy2`` contiguous ``[T, F]`` -> ``dx [T, 2F]``."""
    T, F2 = x2.shape
    F = F2 // 2
    dx = torch.empty_like(x2)
    BLOCK = min(_GLU_BLOCK, _pow2(F))
    if T:
        _k().glu_bwd[(T, triton.cdiv(F, BLOCK))](dy2, x2, dx, F, SILU=silu, BLOCK=BLOCK, num_warps=_warps(BLOCK))
    return dx
