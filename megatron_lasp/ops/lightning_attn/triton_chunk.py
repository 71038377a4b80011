"""The Triton backend of lightning attention: kernels, launch heuristic and the launches.

Over ~700 lines on purpose: each kernel's signature and its launch change together, so the
kernels live beside the code that launches them.

``backend="triton"`` of :mod:`.chunk` (CUDA; CPU tensors run in Triton's interpreter under
``TRITON_INTERPRET=1``). Inputs arrive validated. Entry points, mirroring :mod:`.torch_chunk`:

- :func:`triton_lightning_attn_fwd_phases` ``-> (final_state or None, finish)``,
  ``finish() -> (o, entry_states, config)``;
- :func:`triton_lightning_attn_bwd_phases` ``-> (d_initial_state, finish)``,
  ``finish() -> (dq, dk, dv)``, with the forward's ``entry_states`` and ``config``.

:class:`TritonOptions` (frozen) overrides the launch heuristic (benchmark sweeps) and poisons the
kernel buffers (tests); the forward resolves it into a :class:`TritonConfig`, which the backward
reuses.
"""

import dataclasses
import functools
import types
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .gate import block_cumsum

__all__ = ["TritonConfig", "TritonOptions", "triton_config", "triton_lightning_attn_fwd_phases",
           "triton_lightning_attn_bwd_phases", "triton_gated_fwd_phases", "KERNEL_NAMES"]


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
    Y, Z, LOC, SLOPES, DOC, GC, SEGLOG, T, H, NS, DX, DZ, TP,
    sy_b, sy_t, sy_h, sz_b, sz_t, sz_h,
    SEG, BT: tl.constexpr, BX: tl.constexpr, BZ: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr, F32_DOT: tl.constexpr, EVEN: tl.constexpr,
    HAS_DOC: tl.constexpr, GATED: tl.constexpr,
):
    """LOC[bh, g] = sum_{r in segment g} w_r y_r^T z_r, one [BX, BZ] tile.

    w_r = lam^(len_g-1-r) (the segment's own final state), or lam^(r+1) with REVERSE (its
    contribution to the state gradient entering the segment from the left). With HAS_DOC (DOC:
    [B, T] int32 document ids), w_r is 0 unless token r is in the segment's last document
    (REVERSE: in the document of the state entering the segment).

    GATED (per-token gates): GC [B*H, TP] fp32 holds the gates' cumulative sums restarted every BT
    tokens; lam^n becomes exp of a sum of gates, chained block by block from the weights' anchor
    (the segment's end, REVERSE: its start): g_off carries the totals of the blocks already visited.
    The program of the first tile also writes the segment's total log-decay to SEGLOG [B*H, NS].
    """
    i_xz, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_z = (DZ + BZ - 1) // BZ
    i_x, i_z = i_xz // n_z, i_xz % n_z
    i_b, i_h = i_bh // H, i_bh % H
    if GATED:
        g_base = GC + i_bh.to(tl.int64) * TP
        g_off = 0.0  # sum of the gates of the segment's blocks already visited (<= 0)
    else:
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
    if GATED:
        last_r0 = (seg_len - 1) // BT * BT
    for r0 in range(0, seg_len, BT):
        if GATED:
            # blocks visited from the weights' anchor: the segment start (REVERSE) or its end
            if REVERSE:
                rs = r0
            else:
                rs = last_r0 - r0
        else:
            rs = r0
        r = rs + tl.arange(0, BT)
        valid = r < seg_len
        rows = (seg_start + r).to(tl.int64)
        y = tl.load(y_base + rows[:, None] * sy_t + offs_x[None, :],
                    mask=valid[:, None] & mask_x[None, :], other=0.0)  # [BT, BX]
        z = tl.load(z_base + rows[:, None] * sz_t + offs_z[None, :],
                    mask=valid[:, None] & mask_z[None, :], other=0.0)  # [BT, BZ]
        if GATED:
            gb = tl.load(g_base + seg_start + r)  # [BT] block-local cumulative sums (0-padded past T)
            g_last = tl.load(g_base + seg_start + rs + BT - 1)  # the block's total
            if REVERSE:
                w = tl.where(valid, tl.exp(g_off + gb), 0.0)  # exp(G_r), G from the segment start
            else:
                w = tl.where(valid, tl.exp(g_off + (g_last - gb)), 0.0)  # exp(G_last - G_r)
            g_off += g_last
        elif REVERSE:
            w = tl.where(valid, tl.exp(-s * (r + 1).to(tl.float32)), 0.0)  # [BT]
        else:
            w = tl.where(valid, tl.exp(-s * (seg_len - 1 - r).to(tl.float32)), 0.0)  # [BT]
        if HAS_DOC:
            d = tl.load(d_base + rows, mask=valid, other=-1)
            w = tl.where(d == d_ref, w, 0.0)
        yw = y.to(tl.float32) * w[:, None]
        if DOT_F32:
            acc += tl.dot(tl.trans(yw), z.to(tl.float32), input_precision=F32_DOT)
        else:
            acc += tl.dot(tl.trans(yw.to(z.dtype)), z)
    loc = LOC + (i_bh.to(tl.int64) * NS + i_g) * DX * DZ
    tl.store(loc + offs_x[:, None] * DZ + offs_z[None, :], acc,
             mask=(offs_x < DX)[:, None] & (offs_z < DZ)[None, :])
    if GATED:
        if i_xz == 0:
            tl.store(SEGLOG + i_bh.to(tl.int64) * NS + i_g, g_off)


def _scan_kernel(
    LOC, INIT, ENTRY, FINAL, SLOPES, DOC, SEGLOG, T, H, NS, NXZ,
    SEG, BLOCK: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, HAS_DOC: tl.constexpr,
    GATED: tl.constexpr,
):
    """ENTRY[bh, g] = state entering segment g; FINAL = state after the last segment.

    carry <- lam^(len_g) carry + LOC[g], over g = 0..NS-1 (forward: the KV state), or over
    g = NS-1..0 with REVERSE (the state gradient, entering each segment from its right end; FINAL
    is then the gradient of the initial state). With HAS_DOC the factor is 0 for a segment whose
    last token is not in the document of the state entering it (a boundary inside). GATED: the
    factor is exp(SEGLOG[bh, g]), the segment's total log-decay.
    """
    i_e, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    if HAS_DOC:
        d_base = DOC + (i_bh // H).to(tl.int64) * T
    if not GATED:
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
        if GATED:
            factor = tl.exp(tl.load(SEGLOG + i_bh.to(tl.int64) * NS + g))
        else:
            factor = tl.exp(-s * seg_len.to(tl.float32))
        if HAS_DOC:
            d_entry = tl.load(d_base + tl.maximum(g * SEG - 1, 0))
            d_last = tl.load(d_base + g * SEG + seg_len - 1)
            factor = tl.where(d_entry == d_last, factor, 0.0)
        carry = factor * carry + tl.load(LOC + base + offs, mask=mask, other=0.0)
    if STORE_FINAL:
        tl.store(FINAL + i_bh.to(tl.int64) * NXZ + offs, carry, mask=mask)


def _chunk_kernel(
    X, Y, Z, OUT, ENTRY, SLOPES, DOC, GC, W, DOT_OUT, T, H, DX, DZ, TP, SD_Z,
    sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, sz_b, sz_t, sz_h, so_b, so_t, so_h,
    sw_b, sw_t, sw_h, se_bh, se_g, se_x, se_z,
    SEG, BT: tl.constexpr, DXP: tl.constexpr, BZ: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr, F32_DOT: tl.constexpr, EVEN: tl.constexpr,
    HAS_DOC: tl.constexpr, GATED: tl.constexpr, DOTS: tl.constexpr = False, DOT_SIGN: tl.constexpr = 1.0,
    SUM_BY_DOT: tl.constexpr = True,
):
    """One segment, one BZ-wide tile of out: intra-block term + inter term + state update, fused.

    The running state [DXP, BZ] (fp32) lives in registers across the segment's blocks. With
    HAS_DOC every decay factor of a block is masked by "same document" (README.md). GATED: the
    factors are exp of differences of the block-local cumulative sums GC [B*H, TP] (README.md,
    "Per-token gates"), every exponent <= 0.

    DOTS (the gates' gradient): also DOT_OUT[i_z, bh, t] = DOT_SIGN * sum over this tile's columns of
    W_t * out_t (W: q for the dq pass, k for the dk pass), from the fp32 accumulator before out is
    rounded to its dtype; DOT_OUT is [n_tiles, B*H, T] fp32 with SD_Z = B*H*T. Off, nothing of it is
    compiled (the fixed-decay kernel is unchanged). SUM_BY_DOT: the interpreter's form of the row sums.
    """
    i_z, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    if GATED:
        g_base = GC + i_bh.to(tl.int64) * TP
    else:
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
    if DOTS:
        w_base = W + i_b.to(tl.int64) * sw_b + i_h.to(tl.int64) * sw_h
        dots_base = DOT_OUT + i_z.to(tl.int64) * SD_Z + i_bh.to(tl.int64) * T
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
        if GATED:
            gb = tl.load(g_base + seg_start + blk * BT + i_loc)  # [BT], 0-padded past T
            g_last = tl.load(g_base + seg_start + blk * BT + BT - 1)  # the block's total
            w_a = tl.exp(gb)
            w_b = tl.where(valid, tl.exp(g_last - gb), 0.0)
            state_decay = tl.exp(g_last)
            if REVERSE:
                gdiff = gb[None, :] - gb[:, None]
            else:
                gdiff = gb[:, None] - gb[None, :]
            decay = tl.exp(tl.minimum(gdiff, 0.0))  # [BT, BT], masked below
        else:
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
            scores = tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision=F32_DOT)  # [BT, BT]
            if GATED:
                scores = tl.where(keep, scores * decay, 0.0)
            else:
                scores = tl.where(keep, scores * tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
            out = tl.dot(x.to(tl.float32), state, input_precision=F32_DOT) * w_out[:, None]  # [BT, BZ]
            out = tl.dot(scores, zf, acc=out, input_precision=F32_DOT)
            state = tl.dot(tl.trans(y.to(tl.float32)), zf * w_upd[:, None], acc=state * state_decay,
                           input_precision=F32_DOT)  # [DXP, BZ]
        else:
            scores = tl.dot(x, tl.trans(y))
            if GATED:
                scores = tl.where(keep, scores * decay, 0.0)
            else:
                scores = tl.where(keep, scores * tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
            out = tl.dot(x, state.to(z.dtype)) * w_out[:, None]
            out = tl.dot(scores.to(z.dtype), z, acc=out)
            zw = (z.to(tl.float32) * w_upd[:, None]).to(z.dtype)
            state = tl.dot(tl.trans(y), zw, acc=state * state_decay)
        if DOTS:
            # Row sums of the unrounded out. Compiled: tl.sum (shuffles inside the accumulator's
            # layout; a dot would first move the tile through shared memory: more registers
            # spilled, measured with ptxas). The interpreter refuses tl.sum (see above): a dot
            # with a ones matrix there, the same sums.
            w = tl.load(w_base + rows[:, None] * sw_t + offs_z[None, :],
                        mask=valid[:, None] & mask_z[None, :], other=0.0)  # [BT, BZ]
            if SUM_BY_DOT:
                ones = tl.full([BZ, 16], DOT_SIGN, tl.float32)
                rsum = tl.dot(w.to(tl.float32) * out, ones, input_precision=F32_DOT)  # [BT, 16], equal columns
                cols = tl.arange(0, 16)
                tl.store(dots_base + rows[:, None] + cols[None, :] * 0, rsum,
                         mask=valid[:, None] & (cols == 0)[None, :])
            else:
                tl.store(dots_base + rows, tl.sum(w.to(tl.float32) * out, axis=1) * DOT_SIGN, mask=valid)
        tl.store(o_base + rows[:, None] * so_t + offs_z[None, :], out.to(OUT.dtype.element_ty),
                 mask=valid[:, None] & mask_z[None, :])


def _gate_grad_kernel(
    PARTS, STATES, FINAL, DSTATES, DOC, DG, T, H, NS, NP, SD_P, NXZ,
    SEG, BT: tl.constexpr, CW: tl.constexpr, HAS_DOC: tl.constexpr, F32_DOT: tl.constexpr,
    SUM_BY_DOT: tl.constexpr = True,
):
    """The gates' gradient of one segment of one (batch row, head), from segment-local sums
    (README.md, "Gradient of the gates", (14); ``gate.segment_gate_grad`` is the torch form):

        dg_s = sum_{t in [s, e], doc(t) = doc(s)} dots_t  +  [doc(s) = doc(e)] c <D, S>

    ``dots_t`` the sum of the NP rows of PARTS [NP, B*H, T] (the dq and dk passes' row sums, SD_P =
    B*H*T apart), ``e`` the segment's last token, ``S`` the state after it (STATES [B*H, NS, NXZ]
    of the next segment, FINAL [B*H, NXZ] for the last), ``D`` the state gradient entering it from
    the right (DSTATES), ``c`` 0 where a document starts right after ``e``. DG [B*H, T] fp32.

    The blocks of BT tokens run from the segment's end to its start with a carry: the sum of the
    tokens right of the block in the document that reaches into it. Compiled, the sums are
    tl.sum over masked [BT, BT] tiles (a few thousand adds per block on the CUDA cores). The
    interpreter refuses tl.sum (see above), so SUM_BY_DOT forms the same sums as dots with 0/1
    masks, on ``x`` repeated over 16 columns: each result row holds its value 16 times and column 0
    is stored; its carry and ``<D, S>`` are kept in that repeated form.
    """
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    seg_start = i_g * SEG
    seg_len = tl.minimum(SEG, T - seg_start)
    seg_last = seg_start + seg_len - 1
    i_loc = tl.arange(0, BT)

    # <D, S> over the NXZ state entries, in rows of CW
    if i_g == NS - 1:
        s_base = FINAL + i_bh.to(tl.int64) * NXZ
    else:
        s_base = STATES + (i_bh.to(tl.int64) * NS + i_g + 1) * NXZ
    d_st_base = DSTATES + (i_bh.to(tl.int64) * NS + i_g) * NXZ
    offs_r = tl.arange(0, 16)
    offs_c = tl.arange(0, CW)
    acc = tl.full([16, CW], 0.0, tl.float32)
    for r0 in range(0, NXZ, 16 * CW):
        offs = r0 + offs_r[:, None] * CW + offs_c[None, :]
        m = offs < NXZ
        prod = tl.load(s_base + offs, mask=m, other=0.0) * tl.load(d_st_base + offs, mask=m, other=0.0)
        if SUM_BY_DOT:
            acc = tl.dot(tl.full([16, 16], 1.0, tl.float32), prod, acc=acc, input_precision=F32_DOT)
        else:
            acc += prod
    if SUM_BY_DOT:
        # [16, CW] of equal rows (column sums) -> [BT, 16], every entry the total
        bnd = tl.dot(tl.full([BT, CW], 1.0, tl.float32), tl.trans(acc), input_precision=F32_DOT)
    else:
        bnd = tl.sum(tl.sum(acc, axis=1), axis=0)
    if HAS_DOC:
        d_base = DOC + (i_bh // H).to(tl.int64) * T
        d_end = tl.load(d_base + seg_last)
        if i_g < NS - 1:
            # a document starting right after the segment: its state gradient does not reach here
            bnd = tl.where(tl.load(d_base + seg_last + 1) == d_end, bnd, 0.0)

    p_base = PARTS + i_bh.to(tl.int64) * T
    o_base = DG + i_bh.to(tl.int64) * T
    later = i_loc[None, :] >= i_loc[:, None]  # [t, u]: u at or after t
    cols = tl.arange(0, 16)
    if SUM_BY_DOT:
        rep = tl.full([BT, 16], 0.0, tl.float32)
        carry = tl.full([BT, 16], 0.0, tl.float32)
    else:
        carry = tl.sum(tl.full([BT], 0.0, tl.float32), axis=0)  # a scalar tensor: loop-carried, one type
    if HAS_DOC:
        d_carry = d_end  # any value: the carry is 0 before the first block
    n_blk = (seg_len + BT - 1) // BT
    for it in range(0, n_blk):
        blk = n_blk - 1 - it
        r = blk * BT + i_loc
        valid = r < seg_len
        rows = (seg_start + r).to(tl.int64)
        x = tl.load(p_base + rows, mask=valid, other=0.0)
        for p in range(1, NP):
            x += tl.load(p_base + p * SD_P.to(tl.int64) + rows, mask=valid, other=0.0)
        if HAS_DOC:
            d = tl.load(d_base + rows, mask=valid, other=-1)
            first = tl.load(d_base + seg_start + blk * BT)
            keep = later & (d[:, None] == d[None, :])  # [t, u]: u from t on, in t's document
            in_first = d == first  # [BT]: u in the block's first token's document
            reach = d == d_carry  # [BT]: the carry's document goes on into t's
            at_end = d == d_end  # [BT]: t in the segment's last document
            keep_carry = first == d_carry
        else:
            # one document: every token is in the first token's, the carry's and the last one's
            keep = later
            in_first = i_loc >= 0
            reach = in_first
            at_end = in_first
            keep_carry = True
        if SUM_BY_DOT:
            xr = x[:, None] + rep  # [BT, 16], x in every column
            y = tl.dot(tl.where(keep, 1.0, 0.0), xr, input_precision=F32_DOT) + tl.where(reach[:, None], carry, 0.0)
            # the block's first token: its document's sum from there on (the next block's carry)
            first_rows = in_first[None, :] & (i_loc[:, None] >= 0)  # [BT, BT], equal rows
            block_first = tl.dot(tl.where(first_rows, 1.0, 0.0), xr, input_precision=F32_DOT)
            dg = y + tl.where(at_end[:, None], bnd, 0.0)
            tl.store(o_base + rows[:, None] + cols[None, :] * 0, dg, mask=valid[:, None] & (cols == 0)[None, :])
        else:
            y = tl.sum(tl.where(keep, x[None, :], 0.0), axis=1) + tl.where(reach, carry, 0.0)
            block_first = tl.sum(tl.where(in_first, x, 0.0), axis=0)  # the next block's carry
            dg = y + tl.where(at_end, bnd, 0.0)
            tl.store(o_base + rows, dg, mask=valid)
        carry = block_first + tl.where(keep_carry, carry, 0.0)
        if HAS_DOC:
            d_carry = first


_KERNEL_FNS = (_local_state_kernel, _scan_kernel, _chunk_kernel, _gate_grad_kernel)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> types.SimpleNamespace:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return types.SimpleNamespace(**{fn.__name__.lstrip("_"): InterpretedFunction(fn) for fn in _KERNEL_FNS})
    # Sizes stay unspecialised (one compile serves every T, H, D and segment length); strides keep
    # Triton's divisibility specialisation, which the vectorised loads need.
    sizes = ["T", "H", "NS", "DX", "DZ", "NXZ", "SEG", "TP", "D", "SD_Z", "NP", "SD_P"]
    jitted = {}
    for fn in _KERNEL_FNS:
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        jitted[fn.__name__.lstrip("_")] = triton.jit(fn, do_not_specialize=[n for n in sizes if n in names])
    return types.SimpleNamespace(**jitted)



KERNEL_NAMES = tuple(fn.__name__ for fn in _KERNEL_FNS)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the triton backend (see README.md "Kernels" and NOTES_kernels.md)."""

    block: int  # BT, tokens per block inside a segment (>= 16, power of two)
    segment: int  # SEG, tokens per program; a multiple of `block`
    tile: int  # BZ, width of the output tile (columns of v for the forward)
    num_warps: int = 4
    num_stages: int = 2
    state_tile: int = 64  # BX = BZ of the local-state kernel
    state_warps: int = 4
    poison: bool = False  # fill every buffer a kernel writes with NaN first (an unwritten element fails)


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """Overrides of the launch heuristic, and the NaN poisoning of kernel buffers.

    Every field left None keeps the heuristic's choice (:func:`triton_config`). ``programs`` is the
    number of programs the segment length aims at (default: 512 for the fixed decay, 256 for the
    per-token gates, on 132 multiprocessors, scaled to the device's count). ``poison_outputs``:
    fill every buffer a kernel writes with NaN first, so that an element no kernel wrote shows up
    (tests). The overrides apply on the GPU only; the
    interpreter always uses its small test configuration.
    """

    block: Optional[int] = None
    segment: Optional[int] = None
    tile: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    state_tile: Optional[int] = None
    state_warps: Optional[int] = None
    programs: Optional[int] = None
    poison_outputs: bool = False

    def overrides(self) -> dict:
        """The tuning fields that are set (not the poisoning)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "poison_outputs" and getattr(self, f.name) is not None}


_DEFAULT_OPTIONS = TritonOptions()


def _empty(shape, device, dtype, poison: bool) -> torch.Tensor:
    if poison:
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)
    return torch.empty(tuple(shape), device=device, dtype=dtype)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_programs(device: torch.device) -> int:
    """Programs the fixed decay's segment length aims at: 512 on the 132 SMs it was tuned on, scaled
    to the device."""
    return max(1, round(512 * _multiprocessors(device) / 132))


def triton_config(B: int, T: int, H: int, dx: int, dz: int, device: torch.device,
                  dtype: torch.dtype = torch.bfloat16, options: Optional[TritonOptions] = None,
                  gated: bool = False) -> TritonConfig:
    """The launch configuration for ``[B, T, H]`` inputs of head dims ``dx`` (keys) and ``dz`` (values);
    ``gated``: for the per-token-gate kernels."""
    options = options or _DEFAULT_OPTIONS
    poison = options.poison_outputs
    if device.type == "cpu":
        # Triton's interpreter: small blocks and segments so that short test sequences cross several of both.
        return TritonConfig(block=16, segment=32, tile=max(16, min(32, _pow2(dz))), poison=poison)
    tuning = options.overrides()
    dxp = max(16, _pow2(dx))
    block = tuning.get("block", 64 if dxp <= 128 else 32)
    tile = max(16, min(tuning.get("tile", 64 if dxp <= 128 else 32), _pow2(dz)))
    n_tiles = -(-dz // tile)
    # Segment length: the largest power of two (block <= SEG <= 4096) that still gives about
    # `programs` programs: enough waves over the SMs, while long segments keep the scan short.
    # The fixed decay aims at 512 programs: fwd+bwd at B1 T32K H16 D128 bf16, H100, 1.259 ms against
    # 1.361 with 1024 (segments of 2048 instead of 1024 tokens; docs/benchmarks/kernels_sweep_1208a.json).
    # The gated kernels aim at half as many (256), up to 8192 tokens a segment: each segment
    # costs them more (the gates' cumulative sums and row sums, the gates' gradient), so fewer, longer
    # segments win. fwd+bwd from CUDA-graph replays, H100, B1 H16 D128 bf16, against the fixed decay's
    # earlier launch (1024 programs, 4096 cap): 8K 0.47 vs 0.63 ms, 32K 1.59 vs 1.73, 128K 5.89 vs 6.07
    # (docs/benchmarks/kernels_sweep_gated.json).
    programs = tuning.get("programs") or _default_programs(device) // (2 if gated else 1)
    cap = 8192 if gated else 4096
    segment = block
    while segment < cap and B * H * n_tiles * -(-T // (2 * segment)) >= programs:
        segment *= 2
    fields = dict(block=block, segment=segment, tile=tile, num_warps=4 if dxp <= 128 else 8)
    if dx == 128 and dz == 128 and dtype != torch.float32:
        # One 128x128 tile per segment reads k and v (q and do) once instead of twice: measured
        # 1.22 vs 1.28-1.37 ms fwd+bwd at B1 T32K H16 D128 (docs/benchmarks/kernels_sweep_local.json).
        # Only where it was checked on the GPU (bf16/fp16, D = 128).
        fields.update(state_tile=128, state_warps=8)
    fields.update({k: v for k, v in tuning.items() if k not in ("block", "tile", "programs")})
    return TritonConfig(**fields, poison=poison)


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride()[:3]


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _segment_states(kern, y, z, slopes, init, cfg, reverse, dot_f32, store_final, docs, gc=None):
    """Local segment states of y^T z, then the scan: (entry [B, H, NS, DY, DZ], final or None).

    ``gc``: per-token gates (``[B, H, TP]`` block-local cumulative sums), ``slopes`` then unused."""
    B, T, H, dy = y.shape
    dz = z.shape[-1]
    ns = -(-T // cfg.segment)
    bx = max(16, min(cfg.state_tile, _pow2(dy)))
    bz = max(16, min(cfg.state_tile, _pow2(dz)))
    loc = _empty((B, H, ns, dy, dz), y.device, torch.float32, cfg.poison)
    grid = (-(-dy // bx) * -(-dz // bz), ns, B * H)
    has_doc = docs is not None
    gated = gc is not None
    seglog = torch.empty((B, H, ns), device=y.device, dtype=torch.float32) if gated else slopes
    kern.local_state_kernel[grid](
        y, z, loc, slopes, docs if has_doc else slopes, gc if gated else slopes, seglog,
        T, H, ns, dy, dz, gc.shape[-1] if gated else 0, *_strides(y), *_strides(z),
        SEG=cfg.segment, BT=cfg.block, BX=bx, BZ=bz, REVERSE=reverse, DOT_F32=dot_f32, F32_DOT=_f32_dot(y),
        EVEN=(dy % bx == 0 and dz % bz == 0), HAS_DOC=has_doc, GATED=gated,
        num_warps=cfg.state_warps, num_stages=cfg.num_stages)
    entry = _empty(loc.shape, y.device, torch.float32, cfg.poison)
    final = _empty((B, H, dy, dz), y.device, torch.float32, cfg.poison) if store_final else entry
    nxz = dy * dz
    block = 1024
    has_init = init is not None
    kern.scan_kernel[(-(-nxz // block), B * H)](
        loc, init if has_init else loc, entry, final, slopes, docs if has_doc else slopes, seglog, T, H, ns, nxz,
        SEG=cfg.segment, BLOCK=block, HAS_INIT=has_init, STORE_FINAL=store_final, REVERSE=reverse,
        HAS_DOC=has_doc, GATED=gated, num_warps=4)
    return entry, (final if store_final else None)


def _chunk_tiles(dz: int, cfg: TritonConfig) -> Tuple[int, int]:
    """``(tile, n_tiles)``: the width of the chunk kernel's output tile and the tiles across ``dz``."""
    tile = max(16, min(cfg.tile, _pow2(dz)))
    return tile, -(-dz // tile)


def _chunk(kern, x, y, z, entry, slopes, cfg, reverse, dot_f32, transpose_entry, docs, gc=None,
           dots_of=None, dots=None, dot_sign=1.0):
    """out = generic chunk pass (README.md) of x, y, z with the given segment entry states.

    ``dots_of`` (shaped like out) and ``dots`` (``[n_tiles, B*H, T]`` fp32): also write
    ``dots[i, bh, t] = dot_sign * dots_of_t . out_t`` over the i-th output tile (the kernel's DOTS);
    ``dots`` None: nothing of it (``dots_of`` is not read)."""
    B, T, H, dx = x.shape
    dz = z.shape[-1]
    ns = entry.shape[2]
    out = _empty((B, T, H, dz), x.device, x.dtype, cfg.poison)
    tile, n_tiles = _chunk_tiles(dz, cfg)
    dxp = max(16, _pow2(dx))
    se = entry.stride()
    se_x, se_z = (se[4], se[3]) if transpose_entry else (se[3], se[4])
    grid = (n_tiles, ns, B * H)
    has_dots = dots is not None
    kern.chunk_kernel[grid](
        x, y, z, out, entry, slopes, docs if docs is not None else slopes, gc if gc is not None else slopes,
        dots_of if has_dots else slopes, dots if has_dots else slopes,
        T, H, dx, dz, gc.shape[-1] if gc is not None else 0, dots.stride(0) if has_dots else 0,
        *_strides(x), *_strides(y), *_strides(z), *_strides(out),
        *(_strides(dots_of) if has_dots else (0, 0, 0)),
        se[1], se[2], se_x, se_z,
        SEG=cfg.segment, BT=cfg.block, DXP=dxp, BZ=tile,
        REVERSE=reverse, DOT_F32=dot_f32, F32_DOT=_f32_dot(x), EVEN=(dx == dxp and dz % tile == 0),
        HAS_DOC=docs is not None, GATED=gc is not None, DOTS=has_dots, DOT_SIGN=float(dot_sign),
        SUM_BY_DOT=x.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _gate_grad(kern, parts, states, final_state, d_states, docs, cfg):
    """``dg [B, T, H]`` fp32 (a view of ``[B, H, T]``) from the dq and dk passes' row sums ``parts
    [2, n_tiles, B*H, T]`` and the state gradients ``d_states`` at segment ends (see
    :func:`_gate_grad_kernel`)."""
    B, H, ns = states.shape[:3]
    T = parts.shape[-1]
    nxz = states.shape[3] * states.shape[4]
    dg = _empty((B, H, T), parts.device, torch.float32, cfg.poison)
    final_state = final_state.float().contiguous()
    has_doc = docs is not None
    kern.gate_grad_kernel[(ns, B * H)](
        parts, states, final_state, d_states, docs if has_doc else parts, dg, T, H, ns,
        parts.shape[0] * parts.shape[1], B * H * T, nxz,
        SEG=cfg.segment, BT=max(16, cfg.block), CW=128 if nxz >= 128 * 16 else 16, HAS_DOC=has_doc,
        F32_DOT=_f32_dot(parts), SUM_BY_DOT=parts.device.type == "cpu", num_warps=4)
    return dg.transpose(1, 2)


def _f32_dot(x: torch.Tensor) -> str:
    """The precision of the kernels' fp32 dots: three TF32 tensor-core products (``tf32x3``) on the
    GPU, ``ieee`` in the interpreter (which has no TF32).

    On an H200 the ``ieee`` form runs on the CUDA cores: 497 of the 749 ms of a 2-layer fp32
    TNL-1B step at 8K tokens, against 7.7 ms with ``tf32x3``, whose error against fp64 is 5.6e-7
    relative (outputs and gradients at 8K tokens), the order of the 8.2e-7 measured for ``ieee`` at 32K.
    """
    return "tf32x3" if x.is_cuda else "ieee"


def _triton_setup(q, v):
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    # Interpreter: bf16 tl.dot is wrong there, so every dot runs in fp32 (as for fp32 inputs).
    dot_f32 = interpret or q.dtype == torch.float32
    return kern, dot_f32


def _forward_setup(q, k, v, options: Optional[TritonOptions], gated: bool = False):
    """A forward's contiguous ``q, k, v``, kernels, dot precision and launch config (grid checked)."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    B, T, H, dk = q.shape
    kern, dot_f32 = _triton_setup(q, v)
    cfg = triton_config(B, T, H, dk, v.shape[-1], q.device, q.dtype, options, gated=gated)
    if B * H > 65535 or -(-T // cfg.segment) > 65535:
        raise ValueError(f"lightning attention (triton): B*H = {B * H} and the segment count must stay <= 65535 "
                         "(CUDA grid limit); split the batch or use backend='torch'")
    return q, k, v, kern, dot_f32, cfg


def triton_lightning_attn_fwd_phases(q, k, v, slopes, initial_state, output_final_state, doc_ids=None,
                                     options: Optional[TritonOptions] = None):
    """``(final state or None, finish)``: the segment states and their scan now, the output in
    ``finish() -> (o, entry_states, config)``; ``entry_states [B, H, NS, Dk, Dv]`` fp32."""
    q, k, v, kern, dot_f32, cfg = _forward_setup(q, k, v, options)
    slopes = slopes.float().contiguous()
    init = None if initial_state is None else initial_state.float().contiguous()
    docs = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
    entry, final = _segment_states(kern, k, v, slopes, init, cfg, False, dot_f32, output_final_state, docs)

    def finish():
        o = _chunk(kern, q, k, v, entry, slopes, cfg, False, dot_f32, False, docs)
        return o, entry, cfg

    return final, finish


def triton_lightning_attn_bwd_phases(q, k, v, slopes, do, d_final_state, entry_states, cfg: TritonConfig,
                                     doc_ids=None, gc=None, final_state=None):
    """``(d_initial_state, finish)``: the state-gradient pass now, ``finish() -> (dq, dk, dv)``.

    ``entry_states`` and ``cfg``: the forward's (``finish()`` of the forward returned them);
    ``gc``: per-token gates, the forward's cumulative sums (``slopes`` then None).
    ``final_state`` (with ``gc``): the forward's final state; ``finish() -> (dq, dk, dv, dg)`` with
    ``dg [B, T, H]`` fp32 the gates' gradient of these terms, summed inside segments
    (:func:`_gate_grad_kernel`, the torch backend's ``gate.segment_gate_grad``): the dq and dk passes
    write ``q_t . dq_t`` and ``- k_t . dk_t`` from their fp32 accumulators (before dq, dk are rounded
    to their dtype), and one more kernel sums them with the state gradients at segment ends.
    """
    q, k, v, do = _contig(q), _contig(k), _contig(v), _contig(do)
    kern, dot_f32 = _triton_setup(q, v)
    slopes = gc if gc is not None else slopes.float().contiguous()
    dht = None if d_final_state is None else d_final_state.float().contiguous()
    docs = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
    # State gradients at segment boundaries, in the reversed frame, from q^T do.
    dentry, dh0 = _segment_states(kern, q, do, slopes, dht, cfg, True, dot_f32, True, docs, gc)

    def finish():
        # gates: the dq pass also writes + q . dq over its tiles of Dk, the dk pass - k . dk;
        # summed over all tiles by the gate-gradient kernel.
        B, T, H, dk_dim = q.shape
        parts = None
        if gc is not None:
            parts = _empty((2, _chunk_tiles(dk_dim, cfg)[1], B * H, T), q.device, torch.float32, cfg.poison)
        # dq: the forward pass of (do, v, k) with the transposed forward states (KV-state caching).
        dq = _chunk(kern, do, v, k, entry_states, slopes, cfg, False, dot_f32, True, docs, gc,
                    q, None if parts is None else parts[0], 1.0)
        dv = _chunk(kern, k, q, do, dentry, slopes, cfg, True, dot_f32, False, docs, gc)
        dk = _chunk(kern, v, do, q, dentry, slopes, cfg, True, dot_f32, True, docs, gc,
                    k, None if parts is None else parts[1], -1.0)
        if parts is None:
            return dq, dk, dv
        return dq, dk, dv, _gate_grad(kern, parts, entry_states, final_state, dentry, docs, cfg)

    return dh0, finish


def triton_gated_fwd_phases(q, k, v, g, initial_state, doc_ids=None, options: Optional[TritonOptions] = None):
    """Per-token gates ``g [B, T, H]``: ``(final state, finish)``, ``finish() -> (o, entry_states,
    config, gc)`` with ``gc [B, H, TP]`` the gates' cumulative sums restarted every ``config.block``
    tokens (fp32), which the backward takes. The final state is always computed (``dg`` needs it)."""
    q, k, v, kern, dot_f32, cfg = _forward_setup(q, k, v, options, gated=True)
    gc = block_cumsum(g, cfg.block, torch.float32).contiguous()
    init = None if initial_state is None else initial_state.float().contiguous()
    docs = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
    entry, final = _segment_states(kern, k, v, gc, init, cfg, False, dot_f32, True, docs, gc)

    def finish():
        o = _chunk(kern, q, k, v, entry, gc, cfg, False, dot_f32, False, docs, gc)
        return o, entry, cfg, gc

    return final, finish
