"""Chunked lightning attention: Triton kernels, the functional fwd/bwd entry points and autograd.

Entry points (same signatures for both backends, see the package docstring):

- :func:`lightning_attn_fwd` / :func:`lightning_attn_bwd`: functional, no autograd; what the
  sequence-parallel layers call.
- :func:`chunk_lightning_attn`: the autograd op; its Function only calls the two above.
"""

import dataclasses
import functools
import types
from typing import Any, Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from .torch_chunk import (
    TORCH_BLOCK_SIZE,
    torch_lightning_attn_bwd,
    torch_lightning_attn_bwd_phases,
    torch_lightning_attn_fwd,
    torch_lightning_attn_fwd_phases,
)
from .documents import check_cu_seqlens, check_doc_ids, doc_ids_from_cu_seqlens
from .utils import check_inputs, resolve_backend

__all__ = ["LightningAttnSaved", "lightning_attn_fwd", "lightning_attn_bwd", "lightning_attn_fwd_phases",
           "lightning_attn_bwd_phases", "chunk_lightning_attn"]


@dataclasses.dataclass
class LightningAttnSaved:
    """What the forward keeps for the backward (KV-state caching).

    Attributes:
        backend: the backend that produced it ("triton" or "torch").
        states: fp32 ``[B, H, N, Dk, Dv]``, the state entering each of the ``N`` spans of
            ``span`` tokens (initial state included).
        span: tokens per cached state (the torch backend's block; the triton backend's segment).
        config: the triton launch configuration (the backward must use the forward's).
        doc_ids: ``[B, T]`` int32 document ids of packed documents, or None (see ``documents.py``).
    """

    backend: str
    states: torch.Tensor
    span: int
    config: Any = None
    doc_ids: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------------------------
# Triton kernels. They are plain functions here and wrapped by `_kernels()` at first use: with
# `triton.jit` for CUDA tensors, with Triton's interpreter for CPU tensors (TRITON_INTERPRET=1).
# Building them at launch time, not at import, keeps the choice independent of the order in which
# modules were imported and of whether TRITON_INTERPRET was set before the import. For the same
# reason the kernels call no @triton.jit helpers (tl.cdiv, tl.zeros, tl.sum... included): those are compiled-mode
# functions when triton was imported without TRITON_INTERPRET, and the interpreter refuses them.
#
# The sequence is cut into segments of SEG tokens (one program each, in parallel) and each segment
# into blocks of BT tokens (looped inside the program). The generic pass of README.md:
#     causal (forward):       out_i = sum_{j <= i} lam^(i-j) (x_i . y_j) z_j + lam^(i+1) x_i S
#                             S <- lam^L S + sum_j lam^(L-1-j) y_j^T z_j
#     anti-causal (REVERSE):  out_j = sum_{i >= j} lam^(i-j) (x_j . y_i) z_i + lam^(L-1-j) x_j G
#                             G <- lam^L G + sum_i lam^(i+1) y_i^T z_i   (blocks from last to first)
# forward = causal(q, k, v; S); dq = causal(do, v, k; S^T); dv = reverse(k, q, do; G);
# dk = reverse(v, do, q; G^T), with G the gradient of the state.
# ----------------------------------------------------------------------------------------------


def _local_state_kernel(
    Y, Z, LOC, SLOPES, DOC, T, H, NS, DX, DZ,
    sy_b, sy_t, sy_h, sz_b, sz_t, sz_h,
    SEG, BT: tl.constexpr, BX: tl.constexpr, BZ: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr, EVEN: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """LOC[bh, g] = sum_{r in segment g} w_r y_r^T z_r, one [BX, BZ] tile.

    w_r = lam^(len_g-1-r) (the segment's own final state), or lam^(r+1) with REVERSE (its
    contribution to the state gradient entering the segment from the left). With HAS_DOC (DOC:
    [B, T] int32 document ids), w_r is 0 unless token r is in the segment's last document
    (REVERSE: in the document of the state entering the segment).
    """
    i_xz, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_z = (DZ + BZ - 1) // BZ
    i_x, i_z = i_xz // n_z, i_xz % n_z
    i_b, i_h = i_bh // H, i_bh % H
    s = tl.load(SLOPES + i_h).to(tl.float32)
    seg_start = i_g * SEG
    seg_len = tl.minimum(SEG, T - seg_start)
    offs_x = i_x * BX + tl.arange(0, BX)
    offs_z = i_z * BZ + tl.arange(0, BZ)
    if EVEN:  # see _chunk_kernel
        mask_x = tl.full([BX], 1, tl.int1)
        mask_z = tl.full([BZ], 1, tl.int1)
    else:
        mask_x = offs_x < DX
        mask_z = offs_z < DZ
    y_base = Y + i_b.to(tl.int64) * sy_b + i_h.to(tl.int64) * sy_h
    z_base = Z + i_b.to(tl.int64) * sz_b + i_h.to(tl.int64) * sz_h
    if HAS_DOC:
        d_base = DOC + i_b.to(tl.int64) * T
        if REVERSE:
            d_ref = tl.load(d_base + tl.maximum(seg_start - 1, 0))
        else:
            d_ref = tl.load(d_base + seg_start + seg_len - 1)
    acc = tl.full([BX, BZ], 0.0, dtype=tl.float32)
    for r0 in range(0, seg_len, BT):
        r = r0 + tl.arange(0, BT)
        valid = r < seg_len
        rows = (seg_start + r).to(tl.int64)
        y = tl.load(y_base + rows[:, None] * sy_t + offs_x[None, :],
                    mask=valid[:, None] & mask_x[None, :], other=0.0)  # [BT, BX]
        z = tl.load(z_base + rows[:, None] * sz_t + offs_z[None, :],
                    mask=valid[:, None] & mask_z[None, :], other=0.0)  # [BT, BZ]
        if REVERSE:
            w = tl.where(valid, tl.exp(-s * (r + 1).to(tl.float32)), 0.0)  # [BT]
        else:
            w = tl.where(valid, tl.exp(-s * (seg_len - 1 - r).to(tl.float32)), 0.0)  # [BT]
        if HAS_DOC:
            d = tl.load(d_base + rows, mask=valid, other=-1)
            w = tl.where(d == d_ref, w, 0.0)
        yw = y.to(tl.float32) * w[:, None]
        if DOT_F32:
            acc += tl.dot(tl.trans(yw), z.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(yw.to(z.dtype)), z)
    loc = LOC + (i_bh.to(tl.int64) * NS + i_g) * DX * DZ
    tl.store(loc + offs_x[:, None] * DZ + offs_z[None, :], acc,
             mask=(offs_x < DX)[:, None] & (offs_z < DZ)[None, :])


def _scan_kernel(
    LOC, INIT, ENTRY, FINAL, SLOPES, DOC, T, H, NS, NXZ,
    SEG, BLOCK: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """ENTRY[bh, g] = state entering segment g; FINAL = state after the last segment.

    carry <- lam^(len_g) carry + LOC[g], over g = 0..NS-1 (forward: the KV state), or over
    g = NS-1..0 with REVERSE (the state gradient, entering each segment from its right end; FINAL
    is then the gradient of the initial state). With HAS_DOC the factor is 0 for a segment whose
    last token is not in the document of the state entering it (a boundary inside).
    """
    i_e, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    if HAS_DOC:
        d_base = DOC + (i_bh // H).to(tl.int64) * T
    s = tl.load(SLOPES + i_h).to(tl.float32)
    offs = i_e * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NXZ
    if HAS_INIT:
        carry = tl.load(INIT + i_bh.to(tl.int64) * NXZ + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for it in range(0, NS):
        if REVERSE:
            g = NS - 1 - it
        else:
            g = it
        base = (i_bh.to(tl.int64) * NS + g) * NXZ
        tl.store(ENTRY + base + offs, carry, mask=mask)
        seg_len = tl.minimum(SEG, T - g * SEG)
        factor = tl.exp(-s * seg_len.to(tl.float32))
        if HAS_DOC:
            d_entry = tl.load(d_base + tl.maximum(g * SEG - 1, 0))
            d_last = tl.load(d_base + g * SEG + seg_len - 1)
            factor = tl.where(d_entry == d_last, factor, 0.0)
        carry = factor * carry + tl.load(LOC + base + offs, mask=mask, other=0.0)
    if STORE_FINAL:
        tl.store(FINAL + i_bh.to(tl.int64) * NXZ + offs, carry, mask=mask)


def _chunk_kernel(
    X, Y, Z, OUT, ENTRY, SLOPES, DOC, T, H, DX, DZ,
    sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, sz_b, sz_t, sz_h, so_b, so_t, so_h,
    se_bh, se_g, se_x, se_z,
    SEG, BT: tl.constexpr, DXP: tl.constexpr, BZ: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr, EVEN: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """One segment, one BZ-wide tile of out: intra-block term + inter term + state update, fused.

    The running state [DXP, BZ] (fp32) lives in registers across the segment's blocks. With
    HAS_DOC every decay factor of a block is masked by "same document" (README.md).
    """
    i_z, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    s = tl.load(SLOPES + i_h).to(tl.float32)
    seg_start = i_g * SEG
    seg_len = tl.minimum(SEG, T - seg_start)
    offs_x = tl.arange(0, DXP)
    offs_z = i_z * BZ + tl.arange(0, BZ)
    if EVEN:
        # Row-only masks when no column can overrun: a column mask stops Triton from pipelining
        # the loads (cp.async), which costs a large share of the kernel's time.
        mask_x = tl.full([DXP], 1, tl.int1)
        mask_z = tl.full([BZ], 1, tl.int1)
    else:
        mask_x = offs_x < DX
        mask_z = offs_z < DZ
    x_base = X + i_b.to(tl.int64) * sx_b + i_h.to(tl.int64) * sx_h
    y_base = Y + i_b.to(tl.int64) * sy_b + i_h.to(tl.int64) * sy_h
    z_base = Z + i_b.to(tl.int64) * sz_b + i_h.to(tl.int64) * sz_h
    if HAS_DOC:
        d_base = DOC + i_b.to(tl.int64) * T
    o_base = OUT + i_b.to(tl.int64) * so_b + i_h.to(tl.int64) * so_h
    e_base = ENTRY + i_bh.to(tl.int64) * se_bh + i_g.to(tl.int64) * se_g
    state = tl.load(e_base + offs_x[:, None] * se_x + offs_z[None, :] * se_z,
                    mask=mask_x[:, None] & mask_z[None, :], other=0.0).to(tl.float32)  # [DXP, BZ]

    i_loc = tl.arange(0, BT)
    if REVERSE:
        # anti-causal: out_j sums over i >= j; the mask's exponent is i - j
        diff = (i_loc[None, :] - i_loc[:, None]).to(tl.float32)
    else:
        diff = (i_loc[:, None] - i_loc[None, :]).to(tl.float32)
    n_blk = (seg_len + BT - 1) // BT
    for it in range(0, n_blk):
        if REVERSE:
            blk = n_blk - 1 - it
        else:
            blk = it
        r = blk * BT + i_loc
        valid = r < seg_len
        rows = (seg_start + r).to(tl.int64)
        blk_len = tl.minimum(BT, seg_len - blk * BT)
        x = tl.load(x_base + rows[:, None] * sx_t + offs_x[None, :],
                    mask=valid[:, None] & mask_x[None, :], other=0.0)  # [BT, DXP]
        y = tl.load(y_base + rows[:, None] * sy_t + offs_x[None, :],
                    mask=valid[:, None] & mask_x[None, :], other=0.0)  # [BT, DXP]
        z = tl.load(z_base + rows[:, None] * sz_t + offs_z[None, :],
                    mask=valid[:, None] & mask_z[None, :], other=0.0)  # [BT, BZ]
        # a: lam^(i+1), weight of the state entering the block at its token i;
        # b: lam^(L-1-i), weight of token i in the state leaving the block (0 past the block end).
        w_a = tl.exp(-s * (i_loc.to(tl.float32) + 1.0))
        w_b = tl.where(valid, tl.exp(-s * (blk_len - 1 - i_loc).to(tl.float32)), 0.0)
        state_decay = tl.exp(-s * blk_len.to(tl.float32))
        if HAS_DOC:
            # entry: the document of the state entering the block (the first token's for the
            # sequence's first block, which the initial state feeds); last: of its last token.
            blk_start = seg_start + blk * BT
            d_entry = tl.load(d_base + tl.maximum(blk_start - 1, 0))
            d_last = tl.load(d_base + blk_start + blk_len - 1)
            d = tl.load(d_base + rows, mask=valid, other=-1)
            w_a = tl.where(d == d_entry, w_a, 0.0)
            w_b = tl.where(d == d_last, w_b, 0.0)
            state_decay = tl.where(d_entry == d_last, state_decay, 0.0)
            keep = (diff >= 0) & (d[:, None] == d[None, :])
        else:
            keep = diff >= 0
        if REVERSE:
            w_out, w_upd = w_b, tl.where(valid, w_a, 0.0)
        else:
            w_out, w_upd = w_a, w_b
        # Decay mask recomputed per block and the weights applied to the narrow operands: registers
        # are what limits this kernel.
        if DOT_F32:
            zf = z.to(tl.float32)
            scores = tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision="ieee")  # [BT, BT]
            scores = tl.where(keep, scores * tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
            out = tl.dot(x.to(tl.float32), state, input_precision="ieee") * w_out[:, None]  # [BT, BZ]
            out = tl.dot(scores, zf, acc=out, input_precision="ieee")
            state = tl.dot(tl.trans(y.to(tl.float32)), zf * w_upd[:, None], acc=state * state_decay,
                           input_precision="ieee")  # [DXP, BZ]
        else:
            scores = tl.dot(x, tl.trans(y))
            scores = tl.where(keep, scores * tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
            out = tl.dot(x, state.to(z.dtype)) * w_out[:, None]
            out = tl.dot(scores.to(z.dtype), z, acc=out)
            zw = (z.to(tl.float32) * w_upd[:, None]).to(z.dtype)
            state = tl.dot(tl.trans(y), zw, acc=state * state_decay)
        tl.store(o_base + rows[:, None] * so_t + offs_z[None, :], out.to(OUT.dtype.element_ty),
                 mask=valid[:, None] & mask_z[None, :])


_KERNEL_FNS = (_local_state_kernel, _scan_kernel, _chunk_kernel)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> types.SimpleNamespace:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return types.SimpleNamespace(**{fn.__name__.lstrip("_"): InterpretedFunction(fn) for fn in _KERNEL_FNS})
    # Sizes stay unspecialised (one compile serves every T, H, D and segment length); strides keep
    # Triton's divisibility specialisation, which the vectorised loads need.
    sizes = ["T", "H", "NS", "DX", "DZ", "NXZ", "SEG"]
    jitted = {}
    for fn in _KERNEL_FNS:
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        jitted[fn.__name__.lstrip("_")] = triton.jit(fn, do_not_specialize=[n for n in sizes if n in names])
    return types.SimpleNamespace(**jitted)


@dataclasses.dataclass
class TritonConfig:
    """Launch parameters of the triton backend (see README.md "Kernels" and NOTES_kernels.md)."""

    block: int  # BT, tokens per block inside a segment (>= 16, power of two)
    segment: int  # SEG, tokens per program; a multiple of `block`
    tile: int  # BZ, width of the output tile (columns of v for the forward)
    num_warps: int = 4
    num_stages: int = 2
    state_tile: int = 64  # BX = BZ of the local-state kernel
    state_warps: int = 4


# Tests set this to fill every buffer a kernel writes with NaN first, so that an unwritten element fails.
POISON_OUTPUTS = False


def _empty(shape, device, dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)
    return torch.empty(tuple(shape), device=device, dtype=dtype)


# Overrides of the launch heuristic, for benchmarks/bench_kernels.py sweeps: any TritonConfig field
# plus "programs" (the number of programs the segment length aims at).
TUNING: dict = {}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _triton_config(B: int, T: int, H: int, dx: int, dz: int, interpret: bool,
                   dtype: torch.dtype = torch.bfloat16) -> TritonConfig:
    if interpret:
        # Small blocks and segments so that short test sequences cross several of both.
        return TritonConfig(block=16, segment=32, tile=max(16, min(32, _pow2(dz))))
    dxp = max(16, _pow2(dx))
    block = TUNING.get("block", 64 if dxp <= 128 else 32)
    tile = max(16, min(TUNING.get("tile", 64 if dxp <= 128 else 32), _pow2(dz)))
    n_tiles = -(-dz // tile)
    # Segment length: the largest power of two (block <= SEG <= 4096) that still gives about
    # `programs` programs: enough waves over 132 SMs, while long segments keep the scan short.
    programs = TUNING.get("programs", 1024)
    segment = block
    while segment < 4096 and B * H * n_tiles * -(-T // (2 * segment)) >= programs:
        segment *= 2
    fields = dict(block=block, segment=segment, tile=tile, num_warps=4 if dxp <= 128 else 8)
    if dx == 128 and dz == 128 and dtype != torch.float32:
        # One 128x128 tile per segment reads k and v (q and do) once instead of twice: measured
        # 1.22 vs 1.28-1.37 ms fwd+bwd at B1 T32K H16 D128 (docs/benchmarks/kernels_sweep_local.json).
        # Only where it was checked on the GPU (bf16/fp16, D = 128).
        fields.update(state_tile=128, state_warps=8)
    fields.update({k: v for k, v in TUNING.items() if k in TritonConfig.__dataclass_fields__ and k not in ("block", "tile")})
    return TritonConfig(**fields)


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride()[:3]


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _segment_states(kern, y, z, slopes, init, cfg, reverse, dot_f32, store_final, docs):
    """Local segment states of y^T z, then the scan: (entry [B, H, NS, DY, DZ], final or None)."""
    B, T, H, dy = y.shape
    dz = z.shape[-1]
    ns = -(-T // cfg.segment)
    bx = max(16, min(cfg.state_tile, _pow2(dy)))
    bz = max(16, min(cfg.state_tile, _pow2(dz)))
    loc = _empty((B, H, ns, dy, dz), y.device, torch.float32)
    grid = (-(-dy // bx) * -(-dz // bz), ns, B * H)
    has_doc = docs is not None
    kern.local_state_kernel[grid](
        y, z, loc, slopes, docs if has_doc else slopes, T, H, ns, dy, dz, *_strides(y), *_strides(z),
        SEG=cfg.segment, BT=cfg.block, BX=bx, BZ=bz, REVERSE=reverse, DOT_F32=dot_f32,
        EVEN=(dy % bx == 0 and dz % bz == 0), HAS_DOC=has_doc,
        num_warps=cfg.state_warps, num_stages=cfg.num_stages)
    entry = _empty(loc.shape, y.device, torch.float32)
    final = _empty((B, H, dy, dz), y.device, torch.float32) if store_final else entry
    nxz = dy * dz
    block = 1024
    has_init = init is not None
    kern.scan_kernel[(-(-nxz // block), B * H)](
        loc, init if has_init else loc, entry, final, slopes, docs if has_doc else slopes, T, H, ns, nxz,
        SEG=cfg.segment, BLOCK=block, HAS_INIT=has_init, STORE_FINAL=store_final, REVERSE=reverse,
        HAS_DOC=has_doc, num_warps=4)
    return entry, (final if store_final else None)


def _chunk(kern, x, y, z, entry, slopes, cfg, reverse, dot_f32, transpose_entry, docs):
    """out = generic chunk pass (README.md) of x, y, z with the given segment entry states."""
    B, T, H, dx = x.shape
    dz = z.shape[-1]
    ns = entry.shape[2]
    out = _empty((B, T, H, dz), x.device, x.dtype)
    tile = max(16, min(cfg.tile, _pow2(dz)))
    dxp = max(16, _pow2(dx))
    se = entry.stride()
    se_x, se_z = (se[4], se[3]) if transpose_entry else (se[3], se[4])
    grid = (-(-dz // tile), ns, B * H)
    kern.chunk_kernel[grid](
        x, y, z, out, entry, slopes, docs if docs is not None else slopes, T, H, dx, dz,
        *_strides(x), *_strides(y), *_strides(z), *_strides(out),
        se[1], se[2], se_x, se_z,
        SEG=cfg.segment, BT=cfg.block, DXP=dxp, BZ=tile,
        REVERSE=reverse, DOT_F32=dot_f32, EVEN=(dx == dxp and dz % tile == 0), HAS_DOC=docs is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _triton_setup(q, v):
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    # Interpreter: bf16 tl.dot is wrong there, so every dot runs in fp32 (as for fp32 inputs).
    dot_f32 = interpret or q.dtype == torch.float32
    return kern, dot_f32


def _triton_fwd(q, k, v, slopes, initial_state, output_final_state, docs=None):
    final, finish = _triton_fwd_phases(q, k, v, slopes, initial_state, output_final_state, docs)
    o, saved = finish()
    return o, final, saved


def _triton_fwd_phases(q, k, v, slopes, initial_state, output_final_state, docs=None):
    """(final state or None, finish): the segment states and their scan now, the output in finish()."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    kern, dot_f32 = _triton_setup(q, v)
    cfg = _triton_config(B, T, H, dk, dv, q.device.type == "cpu", q.dtype)
    if B * H > 65535 or -(-T // cfg.segment) > 65535:
        raise ValueError(f"lightning attention (triton): B*H = {B * H} and the segment count must stay <= 65535 "
                         "(CUDA grid limit); split the batch or use backend='torch'")
    slopes = slopes.float().contiguous()
    init = None if initial_state is None else initial_state.float().contiguous()
    if docs is not None:
        docs = docs.to(torch.int32).contiguous()
    entry, final = _segment_states(kern, k, v, slopes, init, cfg, False, dot_f32, output_final_state, docs)

    def finish():
        o = _chunk(kern, q, k, v, entry, slopes, cfg, False, dot_f32, False, docs)
        return o, LightningAttnSaved("triton", entry, cfg.segment, cfg, docs)

    return final, finish


def _triton_bwd(q, k, v, slopes, do, d_final_state, saved):
    dh0, finish = _triton_bwd_phases(q, k, v, slopes, do, d_final_state, saved)
    return finish() + (dh0,)


def _triton_bwd_phases(q, k, v, slopes, do, d_final_state, saved):
    """(d_initial_state, finish): the state-gradient pass now, dq, dk, dv in finish()."""
    q, k, v, do = _contig(q), _contig(k), _contig(v), _contig(do)
    kern, dot_f32 = _triton_setup(q, v)
    cfg = saved.config
    slopes = slopes.float().contiguous()
    dht = None if d_final_state is None else d_final_state.float().contiguous()
    docs = saved.doc_ids
    if docs is not None:
        docs = docs.to(torch.int32).contiguous()
    # State gradients at segment boundaries, in the reversed frame, from q^T do.
    dentry, dh0 = _segment_states(kern, q, do, slopes, dht, cfg, True, dot_f32, True, docs)

    def finish():
        # dq: the forward pass of (do, v, k) with the transposed forward states (KV-state caching).
        dq = _chunk(kern, do, v, k, saved.states, slopes, cfg, False, dot_f32, True, docs)
        dv = _chunk(kern, k, q, do, dentry, slopes, cfg, True, dot_f32, False, docs)
        dk = _chunk(kern, v, do, q, dentry, slopes, cfg, True, dot_f32, True, docs)
        return dq, dk, dv

    return dh0, finish


def lightning_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], LightningAttnSaved]:
    """Forward without autograd.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16; fp64 on "torch").
        slopes: ``[H]`` fp32, ``lam_h = exp(-slopes[h])``.
        initial_state: ``[B, H, Dk, Dv]`` fp32 or None (zeros).
        output_final_state: also return the state after the last token.
        backend: "triton", "torch" or None (see :func:`utils.resolve_backend`).
        cu_seqlens: packed documents, ``[N + 1]`` int starts over the ``B * T`` tokens (first 0,
            last ``B * T``; see ``documents.py``), or None. The state restarts at every document
            start; ``initial_state`` feeds only each row's first document and the final state is
            its last document's.
        doc_ids: the same as per-token document ids ``[B, T]`` (non-decreasing per row), instead
            of ``cu_seqlens`` (what the sequence-parallel layers pass).

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv] or None, saved)``;
        ``saved`` is a :class:`LightningAttnSaved` to hand to :func:`lightning_attn_bwd`.
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    docs = resolve_doc_ids(q, cu_seqlens, doc_ids)
    if backend == "torch":
        o, final, states = torch_lightning_attn_fwd(q, k, v, slopes, initial_state, output_final_state,
                                                    doc_ids=docs)
        return o, final, LightningAttnSaved("torch", states, TORCH_BLOCK_SIZE, None, docs)
    return _triton_fwd(q, k, v, slopes, initial_state, output_final_state, docs)


def resolve_doc_ids(q: torch.Tensor, cu_seqlens, doc_ids) -> Optional[torch.Tensor]:
    """Check ``cu_seqlens`` / ``doc_ids`` and return the ``doc_ids [B, T]`` (or None)."""
    B, T = q.shape[:2]
    if cu_seqlens is not None and doc_ids is not None:
        raise ValueError("lightning attention: give cu_seqlens or doc_ids, not both")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * T, q.device)
        return doc_ids_from_cu_seqlens(cu_seqlens, B, T, q.device)
    if doc_ids is not None:
        check_doc_ids(doc_ids, B, T, q.device)
    return doc_ids


def lightning_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    do: torch.Tensor,
    d_final_state: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    saved: Optional[LightningAttnSaved] = None,
    backend: Optional[str] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward without autograd.

    Args:
        q, k, v, slopes: the forward's inputs.
        do: ``[B, T, H, Dv]``, gradient of ``o``.
        d_final_state: ``[B, H, Dk, Dv]`` gradient of the final state, or None (zeros).
        initial_state: the forward's initial state; only read when ``saved`` is None.
        saved: the forward's :class:`LightningAttnSaved`; None recomputes the forward states.
        backend: as in :func:`lightning_attn_fwd` (must match ``saved.backend``).
        cu_seqlens, doc_ids: the forward's documents; only read when ``saved`` is None (``saved``
            carries them).

    Returns:
        ``(dq, dk, dv, d_initial_state)``: ``dq``/``dk``/``dv`` in their input's dtype;
        ``d_initial_state`` fp32 ``[B, H, Dk, Dv]`` is always computed (it equals
        ``lam^T dS_T + sum_t lam^(t+1) q_t^T do_t``, which a sequence-parallel layer needs to send
        to the previous rank even when the forward had no initial state).
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    if do.shape != v.shape:
        raise ValueError(f"lightning attention: do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")
    if d_final_state is not None and d_final_state.shape != (q.shape[0], q.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(f"lightning attention: d_final_state must be [B, H, Dk, Dv], got {tuple(d_final_state.shape)}")
    if saved is None:
        saved = lightning_attn_fwd(q, k, v, slopes, initial_state, False, backend,
                                   cu_seqlens=cu_seqlens, doc_ids=doc_ids)[2]
    if saved.backend != backend:
        raise ValueError(f"lightning attention: `saved` comes from the {saved.backend} backend, "
                         f"backward asked for {backend}")
    return _bwd_dispatch(q, k, v, slopes, do.to(q.dtype), d_final_state, saved)


def lightning_attn_fwd_phases(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    backend: Optional[str] = None,
    *,
    doc_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Callable[[], Tuple[torch.Tensor, LightningAttnSaved]]]:
    """The forward with no initial state in two phases: ``(final_state, finish)``.

    The first phase is the state-only pass (the segment or block states and their scan), so the
    final state is ready before the output is computed; ``finish() -> (o, saved)`` runs the
    output pass. ``final_state``, ``o`` and ``saved`` equal :func:`lightning_attn_fwd`'s (what a
    sequence-parallel layer uses to send its state on before computing its output).
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, None, backend)
    docs = resolve_doc_ids(q, None, doc_ids)
    if backend == "torch":
        final, finish = torch_lightning_attn_fwd_phases(q, k, v, slopes, None, doc_ids=docs)

        def torch_finish():
            o, states = finish()
            return o, LightningAttnSaved("torch", states, TORCH_BLOCK_SIZE, None, docs)

        return final, torch_finish
    return _triton_fwd_phases(q, k, v, slopes, None, True, docs)


def lightning_attn_bwd_phases(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    do: torch.Tensor,
    saved: LightningAttnSaved,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The backward with no final-state gradient in two phases: ``(d_initial_state, finish)``.

    The first phase is the state-gradient pass, so ``d_initial_state`` is ready before the
    gradients of the slice; ``finish() -> (dq, dk, dv)``. Equal to :func:`lightning_attn_bwd`.
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, None, backend)
    if do.shape != v.shape:
        raise ValueError(f"lightning attention: do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")
    if saved.backend != backend:
        raise ValueError(f"lightning attention: `saved` comes from the {saved.backend} backend, "
                         f"backward asked for {backend}")
    do = do.to(q.dtype)
    if backend == "torch":
        return torch_lightning_attn_bwd_phases(q, k, v, slopes, do, None, saved.states, saved.span,
                                               doc_ids=saved.doc_ids)
    return _triton_bwd_phases(q, k, v, slopes, do, None, saved)


def _bwd_dispatch(q, k, v, slopes, do, d_final_state, saved: LightningAttnSaved):
    """Backward on already validated inputs (the autograd Function skips the checks)."""
    if saved.backend == "torch":
        return torch_lightning_attn_bwd(q, k, v, slopes, do, d_final_state, saved.states, saved.span,
                                        doc_ids=saved.doc_ids)
    return _triton_bwd(q, k, v, slopes, do, d_final_state, saved)


class _LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, initial_state, output_final_state, backend, cu_seqlens):
        o, final, saved = lightning_attn_fwd(q, k, v, slopes, initial_state, output_final_state, backend,
                                             cu_seqlens=cu_seqlens)
        ctx.save_for_backward(q, k, v, slopes, saved.states, saved.doc_ids)
        ctx.saved_meta = (saved.backend, saved.span, saved.config)
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, slopes, states, docs = ctx.saved_tensors
        backend, span, config = ctx.saved_meta
        saved = LightningAttnSaved(backend, states, span, config, docs)
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        dq, dk, dv, dh0 = _bwd_dispatch(q, k, v, slopes, do.to(q.dtype), d_final, saved)
        if ctx.state_dtype is None:
            dh0 = None
        else:
            dh0 = dh0.to(ctx.state_dtype)
        return dq, dk, dv, None, dh0, None, None, None


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention with per-head constant decay (lightning attention), autograd-enabled.

    ``o_t = sum_{s<=t} lam^(t-s) (q_t . k_s) v_s + lam^(t+1) q_t S_0`` with ``lam = exp(-slopes)``;
    no softmax, scaling or normalisation.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16); Dk, Dv <= 256.
        slopes: ``[H]`` fp32 (no gradient).
        initial_state: ``[B, H, Dk, Dv]`` fp32 ``S_0`` or None.
        output_final_state: return ``S_T = lam^T S_0 + sum_s lam^(T-1-s) k_s^T v_s``.
        backend: "triton", "torch", or None (triton on CUDA, torch otherwise;
            ``$MEGATRON_LASP_KERNEL_BACKEND`` overrides the default).
        cu_seqlens: packed documents (flash-attention's convention): int32/int64 ``[N_docs + 1]``
            document starts in the ``B * T`` tokens of the rows laid end to end (for ``B = 1``, in
            the packed sequence), first 0, last ``B * T``; or None. The state restarts at every
            document start: each document gives what it gives alone. ``initial_state`` feeds
            only the first document of each row; the final state is the last document's.
            Values are checked when the tensor is on the CPU (on a GPU, only shape and dtype:
            a value check would synchronise the host).

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv] or None)``.
    """
    return _LightningAttnFunction.apply(q, k, v, slopes, initial_state, output_final_state, backend, cu_seqlens)
