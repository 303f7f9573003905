"""Triton kernels of the mixed-format fused MoE (the Python entry points are in moe.py).

One launch per projection side serves every format of the layer: a program handles one
(token, expert) pair (GEMV path, decode) or one block of BM pairs of one expert (dot path,
prefill), looks its expert up in the expert maps of up to 4 buckets ("slots") and runs the
tile loop of that slot's layout. The slot layouts are compile-time constants, so a layer with
formats {int4, fp8} compiles exactly those two tile loops into the kernel; the branch taken is
uniform per program.

Slot description (compile-time int `C`, built by `_slot` in moe.py):
  bits 0-1 layout (0 dense, 1 fp8, 2 intq, 3 int8), bit 2 act (0 a16, 1 w8a8),
  bit 3 has zero points, bit 4 has perm, bits 5-6 proj (0 gate_up, 1 gate, 2 up, 3 down),
  bit 7 intq bits == 8, bit 8 fp8 GEMV tiles fold the scales into x (set per launch, moe._fold).
`G` is the intq group size or the fp8 block along K, `B` the fp8 block along N.

Weights per expert are the canonical layouts of formats/base.py:
  dense/fp8/int8 `weight [N, K]`; intq `qweight [K/pf, N]` (K packed, N contiguous).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import pdl
from .gemv_mma import gemv_int4_mma, lane_rows
from .gemv_tiles import gemv_intq_cols, intq_scale
from .intq import intq_dequant_tile
from .quant import (dp4a, e4m3_f16x2, fp8_tile_dot16, int4_field_dots, int4_field_dots_grouped, int4_swap_tiles,
                    words_at, x_tile)

_DENSE = tl.constexpr(0)
_FP8 = tl.constexpr(1)
_INTQ = tl.constexpr(2)
_INT8 = tl.constexpr(3)
_GATE_UP = tl.constexpr(0)
_GATE = tl.constexpr(1)
_UP = tl.constexpr(2)
_DOWN = tl.constexpr(3)
# kernel modes
_MODE_UP = tl.constexpr(0)
_MODE_DOWN = tl.constexpr(1)


# ----------------------------------------------------------------------------------------------
# slot bookkeeping (all compile-time)

@triton.jit
def _covers(PROJ: tl.constexpr, HALF: tl.constexpr):
    # HALF: 0 gate rows, 1 up rows, 2 down, 3 gate and up rows in one K loop (gate_up slots)
    if HALF == 2:
        return PROJ == _DOWN
    elif HALF == 3:
        return PROJ == _GATE_UP
    elif HALF == 0:
        return (PROJ == _GATE_UP) or (PROJ == _GATE)
    else:
        return (PROJ == _GATE_UP) or (PROJ == _UP)


@triton.jit
def _intq_consts(BITS: tl.constexpr, F: tl.constexpr):
    # Field j of a 16-bit half sits at bits BITS*j. OR-ing exponent (150 - BITS*j) makes the
    # float 2^(23-BITS*j) + q exactly, so one LOP3 + one FADD turns a code into a float.
    j = tl.arange(0, F)[None, None, :, None]
    fmask = ((1 << BITS) - 1) << (j * BITS)
    magic = (150 - j * BITS) << 23
    return fmask, magic, magic.to(tl.float32, bitcast=True)


@triton.jit
def _intq_codes(q, fmask, magic, off):
    # q: [R, BN] int32 words -> [R, 2, F, BN] float codes, k = r*PF + half*F + j
    q2 = tl.permute(tl.join(q, q >> 16), (0, 2, 1))
    b = (q2[:, :, None, :] & fmask) | magic
    return b.to(tl.float32, bitcast=True) - off


@triton.jit
def _intq_expert(w, s, z, pm, loc, rs, nw, G: tl.constexpr, PF: tl.constexpr):
    """Expert slot loc of an intq bucket: its codes [rs/PF, nw], scales and zeros [cdiv(rs, G), nw]
    and perm [rs] (rs: stored rows, K or more for a padded act-order shard)."""
    return (w + loc * ((rs // PF) * nw), s + loc * (tl.cdiv(rs, G) * nw), z + loc * (tl.cdiv(rs, G) * nw),
            pm + loc * rs)


@triton.jit
def _fp8_expert(w, s, loc, nw, K, G: tl.constexpr, B: tl.constexpr):
    """Expert slot loc of an fp8 bucket: its weight [nw, K] and block scales [cdiv(nw, B), cdiv(K, G)]."""
    return w + loc * (nw * K), s + loc * (tl.cdiv(nw, B) * tl.cdiv(K, G))


# ----------------------------------------------------------------------------------------------
# GEMV tiles (one pair per program): each returns y[n0:n0+BN] in fp32

@triton.jit
def _gemv_rows(xrow, qrow, srow, wp, sp, zp, rows, nm, run0, K, k_lo, k_hi,
               LAY: tl.constexpr, ACT: tl.constexpr, HZ: tl.constexpr, BKW: tl.constexpr,
               BNW: tl.constexpr, BK: tl.constexpr, EVK: tl.constexpr,
               FOLD: tl.constexpr, PDL: tl.constexpr):
    # y at the weight rows `rows` [R] (mask nm) of a row-major [*, K] weight (dense / fp8 / int8):
    # NH runs of R / NH consecutive rows starting at run0 [NH] (the gate and the up half of a
    # gate_up tile side by side).
    # W8A8 (ACT 1) reads the row's codes and scales from _act_quant_kernel (qrow, srow), not x.
    # fp8 FOLD: each run's rows share one scale row, so the weight scale (and the W8A8 activation
    # scale) depends on k only and multiplies x, not each weight; the tile then may span SUB-wide
    # slices of constant scale (more bytes per step). Otherwise the tile sits in one block.
    if ACT == 1:
        SUB: tl.constexpr = BK if BK < 128 else 128
    else:
        SUB: tl.constexpr = BK if BK < (BKW & -BKW) else (BKW & -BKW)
    U: tl.constexpr = BK // SUB
    R: tl.constexpr = rows.shape[0]
    NH: tl.constexpr = run0.shape[0]
    rows = rows.to(tl.int64)
    rk = tl.arange(0, BK)
    if LAY == _FP8:
        wp = wp.to(tl.pointer_type(tl.uint8))  # fp8 loaded as bytes: masked lanes read 0, not NaN
        if ACT == 1:
            xrow = (qrow + K).to(tl.pointer_type(tl.uint8))   # plane 1: e4m3 codes
    if LAY == _INT8:
        if ACT == 1:
            xrow = qrow.to(tl.pointer_type(tl.int8))          # plane 0: int8 codes
    wrow = wp + rows[:, None] * K
    if FOLD:    # [NH] each run's scale row
        s_run = sp + (run0 // BNW) * tl.cdiv(K, BKW)
    xsum = tl.zeros([BK], dtype=tl.float32)
    acc = tl.zeros([R, BK], dtype=tl.float32)
    k_hi = tl.minimum(k_hi, K)
    if EVK:
        w_nxt = tl.load(wrow + (k_lo + rk)[None, :], mask=tl.where(k_lo < k_hi, nm, False)[:, None], other=0)
    else:
        w_nxt = tl.load(wrow + (k_lo + rk)[None, :], mask=nm[:, None] & (k_lo + rk < k_hi)[None, :], other=0)
    pdl.wait(PDL)   # (down side) the first tile is loaded; x comes from the kernel before
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        w = w_nxt
        kn = kk + BK
        if EVK:
            w_nxt = tl.load(wrow + kn[None, :], mask=tl.where(k0 + BK < k_hi, nm, False)[:, None], other=0)
            x = tl.load(xrow + kk)
        else:
            w_nxt = tl.load(wrow + kn[None, :], mask=nm[:, None] & (kn < k_hi)[None, :], other=0)
            x = tl.load(xrow + kk, mask=kk < K, other=0)
        if LAY == _FP8:
            ks = k0 + tl.arange(0, U) * SUB                                      # [U] slice starts
            if ACT == 1:
                a = tl.load(srow + 1 + ks // 128, mask=ks < K, other=0.0)        # their activation scales
                x2 = tl.reshape(x.to(tl.float8e4nv, bitcast=True).to(tl.float32), (U, SUB)) * a[:, None]
            else:
                x2 = tl.reshape(x.to(tl.float32), (U, SUB))
            wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            if FOLD:
                sc = tl.load(s_run[:, None] + (ks // BKW)[None, :], mask=(ks < K)[None, :], other=0.0)  # [NH, U]
                xs = tl.reshape(x2[None, :, :] * sc[:, :, None], (NH, 1, BK))
                acc += tl.reshape(tl.reshape(wf, (NH, R // NH, BK)) * xs, (R, BK))
            else:
                sc = tl.load(sp + (rows // BNW) * tl.cdiv(K, BKW) + k0 // BKW, mask=nm, other=0.0)
                acc += (wf * sc[:, None]) * tl.reshape(x2, (BK,))[None, :]
        elif LAY == _INT8:
            xf = x.to(tl.float32)
            # int8 -> fp32 without I2F: 2^23 + 128 + q has q in the mantissa
            wf = ((w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0)
            acc += wf * xf[None, :]
            if HZ:
                xsum += xf
        else:
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    res = tl.sum(acc, axis=1)
    if LAY == _INT8:
        if HZ:
            zero = tl.load(zp + rows, mask=nm, other=0.0)
            res -= zero * tl.sum(xsum, axis=0)
        res = res * tl.load(sp + rows, mask=nm, other=0.0)
        if ACT == 1:
            res = res * tl.load(srow)
    return res


@triton.jit
def _gemv_fp8_words(qrow, srow, wp, sp, rows, nm, run0, K, k_lo, k_hi,
                    BKW: tl.constexpr, BNW: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # _gemv_rows for fp8 W8A8 with folded scales (each run's rows share a scale row), the codes
    # multiplied in packed fp16 (quant.fp8_words_dot16, as the dense fp8 GEMV does): weights and
    # the row's e4m3 activation codes (_act_quant_kernel's plane 1) read as int32 words, 16
    # products per call, per-thread partials [R, BK / 16] summed once after the K loop. K % 4 == 0
    # (the host checks it before it sets F16 on an fp8 launch).
    SUB: tl.constexpr = BK if BK < 128 else 128
    U: tl.constexpr = BK // SUB
    G: tl.constexpr = BK // 16
    R: tl.constexpr = rows.shape[0]
    NH: tl.constexpr = run0.shape[0]
    K4 = K // 4
    rw = tl.arange(0, BK // 4)
    wrow = wp.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * K4
    xw = (qrow + K).to(tl.pointer_type(tl.int32))                 # plane 1: e4m3 codes as words
    s_run = sp + (run0 // BNW) * tl.cdiv(K, BKW)                   # [NH] each run's scale row
    acc = tl.zeros([R, G], dtype=tl.float32)
    k_hi = tl.minimum(k_hi, K)
    w_nxt = words_at(wrow, k_lo // 4 + rw, nm, k_hi)
    pdl.wait(PDL)   # (down side) the first tile is loaded; the codes come from the kernel before
    for k0 in range(k_lo, k_hi, BK):
        w = w_nxt
        w_nxt = words_at(wrow, (k0 + BK) // 4 + rw, nm, k_hi)
        x_lo, x_hi = e4m3_f16x2(tl.load(xw + k0 // 4 + rw, mask=k0 // 4 + rw < k_hi // 4, other=0), True)   # [BK/4]
        ks = k0 + tl.arange(0, U) * SUB
        a = tl.load(srow + 1 + ks // 128, mask=ks < K, other=0.0)                      # [U] activation scales
        sc = tl.load(s_run[:, None] + (ks // BKW)[None, :], mask=(ks < K)[None, :], other=0.0)   # [NH, U]
        f = tl.reshape(tl.broadcast_to((sc * a[None, :] * 512.0)[:, :, None], (NH, U, SUB // 16)), (NH, 1, G))
        d = fp8_tile_dot16(w, x_lo, x_hi)                                             # [R, G]
        acc += tl.reshape(tl.reshape(d, (NH, R // NH, G)) * f, (R, G))
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_int8_words(qrow, srow, wp, sp, zp, rows, nm, K, k_lo, k_hi,
                     HZ: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    # _gemv_rows for int8 W8A8: weights and the row's int8 codes (_act_quant_kernel's plane 0)
    # as int32 words, 4 products per dp4a into exact int32 per-thread partials [R, BK / 4], summed
    # once after the K loop (the fp32 loop widens every code and rounds sums past 2^24).
    # K % 4 == 0 (the host checks it before it sets F16).
    R: tl.constexpr = rows.shape[0]
    rw = tl.arange(0, BK // 4)
    wrow = wp.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (K // 4)
    xw = qrow.to(tl.pointer_type(tl.int32))                       # plane 0: int8 codes as words
    acc = tl.zeros([R, BK // 4], dtype=tl.int32)
    xs = tl.zeros([BK // 4], dtype=tl.int32)
    k_hi = tl.minimum(k_hi, K)
    w_nxt = words_at(wrow, k_lo // 4 + rw, nm, k_hi)
    pdl.wait(PDL)   # (down side) the first tile is loaded; the codes come from the kernel before
    for k0 in range(k_lo, k_hi, BK):
        w = w_nxt
        w_nxt = words_at(wrow, (k0 + BK) // 4 + rw, nm, k_hi)
        x = tl.load(xw + k0 // 4 + rw, mask=k0 // 4 + rw < k_hi // 4, other=0)        # [BK/4]
        acc = dp4a(w, tl.broadcast_to(x[None, :], w.shape), acc)
        if HZ:
            xs = dp4a(x, tl.full(x.shape, 0x01010101, tl.int32), xs)                 # sum of the codes
    res = tl.sum(acc, axis=1).to(tl.float32)
    if HZ:
        res -= tl.load(zp + rows, mask=nm, other=0.0) * tl.sum(xs, axis=0).to(tl.float32)
    return res * tl.load(sp + rows, mask=nm, other=0.0) * tl.load(srow)


@triton.jit
def _slot_rows(PROJ: tl.constexpr, HALF: tl.constexpr, INTER, HID):
    """(stored rows nw, rows to compute n_lim, first row row0) of one expert's weight in a bucket
    of projection PROJ, for half HALF (0 gate, 1 up, 2 down): gate_up stacks gate then up rows."""
    if PROJ == _DOWN:
        nw = HID
        n_lim = HID
    elif PROJ == _GATE_UP:
        nw = 2 * INTER
        n_lim = INTER
    else:
        nw = INTER
        n_lim = INTER
    row0 = 0
    if PROJ == _GATE_UP:
        if HALF == 1:
            row0 = INTER
    return nw, n_lim, row0


@triton.jit
def _slot_index(mp, e, C: tl.constexpr):
    """Expert e's index in a slot's bucket (-1: not there): its expert map, or e itself in a bucket
    of every expert in order (CODE_IDENT; one dependent load fewer before the weight loads)."""
    loc = e
    if (C // 512) % 2 == 0:
        loc = tl.load(mp + e)
    return loc


@triton.jit
def _mma_fits(BITS: tl.constexpr, HP: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr, xrow):
    """Whether an int4 slot runs gemv_mma's tile (a config's "mma"): 4-bit codes in K order, groups
    of 128 inputs or a multiple, 16-bit x, gate and up of BN = 16 or 32 rows in one loop or BN = 32 or
    64 down rows (2 or 4 column tiles per lane)."""
    return (BITS == 4 and HP == 0 and G % 128 == 0 and xrow.dtype.element_ty != tl.float32
            and ((HALF == 3 and (BN == 16 or BN == 32)) or (HALF == 2 and (BN == 32 or BN == 64))))


@triton.jit
def _gemv_slot(res, found, xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_hi,
               w, s, z, pm, mp, rs, C: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
               HALF: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr, BKF: tl.constexpr,
               BKQ: tl.constexpr, BKI: tl.constexpr, EVK: tl.constexpr, PDL: tl.constexpr,
               F16: tl.constexpr, MMA: tl.constexpr):
    LAY: tl.constexpr = C % 4
    ACT: tl.constexpr = (C // 4) % 2
    HZ: tl.constexpr = (C // 8) % 2
    HP: tl.constexpr = (C // 16) % 2
    PROJ: tl.constexpr = (C // 32) % 4
    BITS: tl.constexpr = 8 if (C // 128) % 2 == 1 else 4
    FOLD: tl.constexpr = (C // 256) % 2
    if _covers(PROJ, HALF):
        loc32 = _slot_index(mp, e, C)
        if loc32 >= 0:
            loc = loc32.to(tl.int64)
            nw, n_lim, row0 = _slot_rows(PROJ, HALF, INTER, HID)
            if HALF == 3:   # BN gate rows, then the BN up rows
                c = tl.arange(0, 2 * BN)
                rn = n0 + c % BN
                rows = rn + (c // BN) * INTER
            else:
                rn = n0 + tl.arange(0, BN)
                rows = row0 + rn
            nm = rn < n_lim
            run0 = row0 + n0 + tl.arange(0, 2 if HALF == 3 else 1) * INTER    # first row of each run
            if LAY == _INTQ:
                PF: tl.constexpr = 32 // BITS
                qe, se, ze, pe = _intq_expert(w, s, z, pm, loc, rs, nw, G, PF)   # x is read via perm
                if MMA > 0 and _mma_fits(BITS, HP, G, HALF, BN, xrow):
                    # on the tensor cores (gemv_mma): "lo" / "hi" columns = the gate / up rows n0 ..
                    # n0 + BN - 1 (HALF 3), or the two halves of BN down rows
                    T: tl.constexpr = BN // 8 if HALF == 3 else BN // 16    # tiles per lane
                    hi0 = INTER + n0 if HALF == 3 else n0 + 8 * T
                    res = gemv_int4_mma(xrow, qe, se, ze, n0, hi0, n_lim, (2 * INTER) if HALF == 3 else n_lim,
                                        nw, rs, k_lo, k_hi, G, HZ, MMA, T, PDL, 1, 0, 1)
                else:
                    res = gemv_intq_cols(xrow, qe, se, ze, pe, rows, nm, nw, rs,
                                         qm if BITS == 4 else (qm << 4) | qm, k_lo, k_hi, BITS, G, HZ, HP, BKQ, EVK, PDL, F16)
            elif LAY == _FP8:
                we, se = _fp8_expert(w, s, loc, nw, K, G, B)
                if F16 and ACT == 1 and FOLD == 1:
                    res = _gemv_fp8_words(qrow, srow, we, se, rows, nm, run0, K, k_lo, k_hi, G, B, BKF, PDL)
                else:
                    res = _gemv_rows(xrow, qrow, srow, we, se, z, rows, nm, run0, K, k_lo, k_hi,
                                     LAY, ACT, HZ, G, B, BKF, EVK, FOLD, PDL)
            elif LAY == _INT8:
                if F16 and ACT == 1:
                    res = _gemv_int8_words(qrow, srow, w + loc * (nw * K), s + loc * nw, z + loc * nw, rows, nm,
                                           K, k_lo, k_hi, HZ, BKI, PDL)
                else:
                    res = _gemv_rows(xrow, qrow, srow, w + loc * (nw * K), s + loc * nw, z + loc * nw, rows, nm,
                                     run0, K, k_lo, k_hi, LAY, ACT, HZ, 1, 1, BKI, EVK, 0, PDL)
            else:
                res = _gemv_rows(xrow, qrow, srow, w + loc * (nw * K), s, z, rows, nm, run0, K, k_lo, k_hi,
                                 LAY, 0, 0, 1, 1, BKD, EVK, 0, PDL)
        found = tl.maximum(found, (loc32 >= 0).to(tl.int32))
    return res, found


@triton.jit
def _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_hi,
               w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
               C0: tl.constexpr, G0: tl.constexpr, B0: tl.constexpr,
               C1: tl.constexpr, G1: tl.constexpr, B1: tl.constexpr,
               C2: tl.constexpr, G2: tl.constexpr, B2: tl.constexpr,
               C3: tl.constexpr, G3: tl.constexpr, B3: tl.constexpr,
               NS: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr,
               BKF: tl.constexpr, BKQ: tl.constexpr, BKI: tl.constexpr, EVK: tl.constexpr, PDL: tl.constexpr,
               F16: tl.constexpr, MMA: tl.constexpr):
    RB: tl.constexpr = 2 * BN if HALF == 3 else BN   # HALF 3: gate then up columns
    res = tl.zeros([RB], dtype=tl.float32)
    found = e * 0  # int32 0/1: some slot holds this expert
    res, found = _gemv_slot(res, found, xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_hi, w0, s0, z0, p0, m0, r0, C0, G0, B0,
                            HALF, BN, BKD, BKF, BKQ, BKI, EVK, PDL, F16, MMA)
    if NS > 1:
        res, found = _gemv_slot(res, found, xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_hi, w1, s1, z1, p1, m1, r1, C1, G1, B1,
                                HALF, BN, BKD, BKF, BKQ, BKI, EVK, PDL, F16, MMA)
    if NS > 2:
        res, found = _gemv_slot(res, found, xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_hi, w2, s2, z2, p2, m2, r2, C2, G2, B2,
                                HALF, BN, BKD, BKF, BKQ, BKI, EVK, PDL, F16, MMA)
    if NS > 3:
        res, found = _gemv_slot(res, found, xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_hi, w3, s3, z3, p3, m3, r3, C3, G3, B3,
                                HALF, BN, BKD, BKF, BKQ, BKI, EVK, PDL, F16, MMA)
    return res, found


@triton.jit
def _silu_mul(g, u):
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _join_gate_up(wsp, INTER, CHUNKS: tl.constexpr, mask):
    """(gate, up) of a split gate/up launch: the sums over its CHUNKS K chunks of the fp32
    partials at wsp + (2 c) * INTER (gate) and wsp + (2 c + 1) * INTER (up), read past L1 (other
    programs wrote them)."""
    g = tl.load(wsp, mask=mask, other=0.0, cache_modifier=".cg")
    u = tl.load(wsp + INTER, mask=mask, other=0.0, cache_modifier=".cg")
    for c in tl.static_range(1, CHUNKS):
        g += tl.load(wsp + (2 * c) * INTER, mask=mask, other=0.0, cache_modifier=".cg")
        u += tl.load(wsp + (2 * c + 1) * INTER, mask=mask, other=0.0, cache_modifier=".cg")
    return g, u


@triton.jit
def _zero_counters(cnt_ptr, n_cnt, pid, npid, ZB: tl.constexpr):
    # counters of the down kernel's fused sum, zeroed by the up kernel that runs before it
    per = tl.cdiv(n_cnt, npid)
    for c0 in range(0, per, ZB):
        c = pid * per + c0 + tl.arange(0, ZB)
        tl.store(cnt_ptr + c, tl.zeros([ZB], dtype=tl.int32), mask=(c < n_cnt) & (c0 + tl.arange(0, ZB) < per))


@triton.jit
def _moe_gemv_kernel(x_ptr, q_ptr, qs_ptr, NQS, ids_ptr, rw_ptr, out_ptr, fin_ptr, cnt_ptr, ws_ptr, ucnt_ptr,
                     K, INTER, HID, n_cnt, qm, k_per,
                     w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                     C0: tl.constexpr, G0: tl.constexpr, B0: tl.constexpr,
                     C1: tl.constexpr, G1: tl.constexpr, B1: tl.constexpr,
                     C2: tl.constexpr, G2: tl.constexpr, B2: tl.constexpr,
                     C3: tl.constexpr, G3: tl.constexpr, B3: tl.constexpr,
                     NS: tl.constexpr, MODE: tl.constexpr, TOPK: tl.constexpr, BN: tl.constexpr,
                     BKD: tl.constexpr, BKF: tl.constexpr, BKQ: tl.constexpr, BKI: tl.constexpr,
                     SUM: tl.constexpr, ZMISS: tl.constexpr, EVK: tl.constexpr, SPLIT: tl.constexpr,
                     GU: tl.constexpr = False, PDL: tl.constexpr = False, F16: tl.constexpr = False,
                     XPAIR: tl.constexpr = False, MMA: tl.constexpr = 0):
    """Grid (P pairs, N tiles, SPLIT). UP: act[p, n] = silu(x W_gate^T) * (x W_up^T) for the expert
    of pair p (x = x[p // TOPK]); DOWN: buf[p, n] = w_p * act[p] W_down^T, and the last of a token's
    TOPK pairs to finish a tile writes out[token, tile] = sum of its rows (deterministic order).
    SPLIT > 1 gives each output tile more programs (more loads in flight at decode): UP program z
    computes half z % 2 (gate, up) over K chunk z // 2 into ws [P, SPLIT, INTER] fp32 and the last
    of the SPLIT to arrive (counter ucnt, left zero) applies silu * mul; DOWN program z computes
    K chunk z into buf row p * SPLIT + z, and the token's sum takes TOPK * SPLIT rows. GU (SPLIT 1,
    moe._gate_up_fused): gate and up in one K loop (_gemv_half's HALF 3). F16 (a config's "f16"):
    int4 slots in packed fp16 math (gemv_tiles.gemv_intq_cols). XPAIR: UP reads x row p (x [P, K]:
    _permute_pairs_kernel's rows in the pair's act-order), not row p // TOPK. MMA (a config's
    "mma", SPLIT 1; the kernel's warp count, 0: off): int4 slots that _mma_fits run gemv_mma's
    tensor-core tiles."""
    p = tl.program_id(0)
    t = tl.program_id(1)
    z = tl.program_id(2)
    n0 = t * BN
    if MODE == _MODE_UP:
        pdl.wait(PDL)     # the routing and x come from the kernels just before
        # the down launch may start now: the routing it reads before its own wait is complete
        pdl.launch_dependents(PDL)
    # DOWN: ids are older than the kernel before this one (pdl.py), so they and the first weight
    # tile are read before the wait for the up launch's act (inside the tile loop)
    e = tl.load(ids_ptr + p)
    rn = n0 + tl.arange(0, BN)
    if MODE == _MODE_UP:
        if t == 0 and z == 0:
            _zero_counters(cnt_ptr, n_cnt, p, tl.num_programs(0), 256)
        xr = (p // TOPK).to(tl.int64)
        xrow = x_ptr + (p.to(tl.int64) if XPAIR else xr) * K
        qrow = q_ptr + xr * 2 * K     # W8A8 codes / scales of row xr (_act_quant_kernel)
        srow = qs_ptr + xr * NQS
        if SPLIT == 1:
            if GU:
                gu, fg = _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, 0, k_per,
                                    w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                    C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 3, BN, BKD, BKF, BKQ, BKI, EVK, False, F16, MMA)
                g, u = tl.split(tl.permute(tl.reshape(gu, (2, BN)), (1, 0)))
                fu = fg
            else:
                g, fg = _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, 0, k_per,
                                   w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                   C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 0, BN, BKD, BKF, BKQ, BKI, EVK, False, F16, MMA)
                u, fu = _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, 0, k_per,
                                   w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                   C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 1, BN, BKD, BKF, BKQ, BKI, EVK, False, F16, MMA)
            tl.store(out_ptr + p.to(tl.int64) * INTER + rn, _silu_mul(g, u).to(out_ptr.dtype.element_ty),
                     mask=rn < INTER * fg * fu)  # fg, fu: 0/1
        else:
            k_lo = (z // 2) * k_per
            if z % 2 == 0:
                part, fnd = _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_lo + k_per,
                                     w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                     C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 0, BN, BKD, BKF, BKQ, BKI, EVK, False, F16, MMA)
            else:
                part, fnd = _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_lo + k_per,
                                     w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                     C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 1, BN, BKD, BKF, BKQ, BKI, EVK, False, F16, MMA)
            # a pair whose expert is in none of this launch's buckets (another gate/up launch's, or no
            # rank's: expert parallel) computes zero partials and leaves its act row alone; the gate
            # and up of one expert are in the same launch (up_launches), so either half's flag says
            nm = rn < INTER
            wsp = ws_ptr + p.to(tl.int64) * SPLIT * INTER + rn
            tl.store(wsp + z * INTER, part, mask=nm)
            tl.debug_barrier()   # all threads' partial stores precede the release below
            old = tl.atomic_add(ucnt_ptr + p * tl.num_programs(1) + t, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if old == SPLIT - 1:
                g, u = _join_gate_up(wsp, INTER, SPLIT // 2, nm)
                tl.store(out_ptr + p.to(tl.int64) * INTER + rn, _silu_mul(g, u).to(out_ptr.dtype.element_ty),
                         mask=rn < INTER * fnd)
                tl.atomic_xchg(ucnt_ptr + p * tl.num_programs(1) + t, 0)   # ready for the next launch
    else:
        xrow = x_ptr + p.to(tl.int64) * K
        qrow = q_ptr + p.to(tl.int64) * 2 * K
        srow = qs_ptr + p.to(tl.int64) * NQS
        k_lo = z * k_per
        d, fd = _gemv_half(xrow, qrow, srow, e, n0, K, INTER, HID, qm, k_lo, k_lo + k_per,
                           w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                           C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 2, BN, BKD, BKF, BKQ, BKI, EVK, PDL, F16, MMA)
        pdl.wait(PDL)     # a pair in no bucket (expert parallel) has not waited in a tile loop yet
        nm = rn < HID
        val = d * tl.load(rw_ptr + p)
        orow = out_ptr + (p * SPLIT + z).to(tl.int64) * HID + rn
        if ZMISS:
            # single down launch: a pair whose expert is in no bucket (expert parallel) adds zero
            # (d stays 0 when no slot matched)
            tl.store(orow, val.to(out_ptr.dtype.element_ty), mask=nm)
        else:
            tl.store(orow, val.to(out_ptr.dtype.element_ty), mask=rn < HID * fd)
        if SUM:
            # fused sum over the token's TOPK * SPLIT rows: the last program of the token to finish
            # this tile adds them in a fixed order (deterministic); counters were zeroed by the up launch
            tl.debug_barrier()
            tok = p // TOPK
            old = tl.atomic_add(cnt_ptr + tok * tl.num_programs(1) + t, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if old == TOPK * SPLIT - 1:
                tot = tl.zeros([BN], dtype=tl.float32)
                for jj in tl.static_range(TOPK * SPLIT):
                    tot += tl.load(out_ptr + (tok * TOPK * SPLIT + jj).to(tl.int64) * HID + rn, mask=nm, other=0.0,
                                   cache_modifier=".cg").to(tl.float32)
                tl.store(fin_ptr + tok.to(tl.int64) * HID + rn, tot.to(fin_ptr.dtype.element_ty), mask=nm)


# ----------------------------------------------------------------------------------------------
# dot tiles (BM pairs of one expert per program): each returns acc [BM, BN] fp32

@triton.jit
def _dot_intq_t(acc, arow, rm, qp, sp, zp, pp, col0, nw, K, n_lim, n0, k_lo, k_hi,
                GS: tl.constexpr, HZ: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """_dot_intq for int4 tiles of BM >= 32 rows inside one group (GS % BK == 0, BK >= 128): the
    swap tiles of intq.py (quant.int4_swap_tiles), acc^T += W^T x^T."""
    rn = n0 + tl.arange(0, BN)
    acc_t = int4_swap_tiles(tl.zeros([BN, acc.shape[0]], dtype=tl.float32), qp, nw, sp, nw, zp, nw, col0 + rn,
                            rn < n_lim, arow[:, None], rm[:, None], pp, k_lo, tl.minimum(k_hi, K), K, GS, HZ, HP, BK)
    return acc + tl.trans(acc_t)


@triton.jit
def _dot_intq(acc, arow, rm, qp, sp, zp, pp, col0, nw, K, n_lim, n0, k_lo, k_hi,
              BITS: tl.constexpr, GS: tl.constexpr, HZ: tl.constexpr, HP: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr):
    PF: tl.constexpr = 32 // BITS
    F: tl.constexpr = PF // 2
    R: tl.constexpr = BK // PF
    rn = n0 + tl.arange(0, BN)
    nm = rn < n_lim
    cols = col0 + rn
    r = tl.arange(0, R)
    rk = tl.arange(0, BK)
    fmask, magic, off = _intq_consts(BITS, F)
    KP = K // PF
    # per-field dots only with BM 16 tiles (mma); BM >= 64 goes to wgmma, whose B operand
    # round-trips shared memory per dot (measured 2-3x slower): int4 tiles of BM >= 32 in one
    # group take _dot_intq_t instead (_dot_slot), so that is the small-group / 8-bit prefill row
    # groups smaller than the tile (GS a multiple of 8: a word is in one group) scale each word row
    # before the dots
    FIELD_DOTS: tl.constexpr = BITS == 4 and R >= 16 and acc.shape[0] == 16
    if FIELD_DOTS:
        a_nxt = x_tile(arow[:, None], rm[:, None], pp, k_lo, K, BK, HP)
    for k0 in range(k_lo, tl.minimum(k_hi, K), BK):
        rr = k0 // PF + r
        q = tl.load(qp + rr[:, None] * nw + cols[None, :], mask=(rr < KP)[:, None] & nm[None, :], other=0)
        if GS % BK == 0:    # the tile is in one group: exact integers q - z in the dot, scale after
            g = k0 // GS
            s = tl.load(sp + g * nw + cols, mask=nm, other=0.0).to(tl.float32)
        if FIELD_DOTS:
            # int4: no reshuffle of the codes into K order, one dot per code field (quant.py);
            # the next tile's activations are loaded while this one computes
            a = a_nxt
            a_nxt = x_tile(arow[:, None], rm[:, None], pp, k0 + BK, K, BK, HP)
            if GS % BK == 0:
                part = int4_field_dots(tl.zeros_like(acc), q, zp + g * nw + cols, nm, a, HZ)
                acc += part * s[None, :]
            else:
                acc = int4_field_dots_grouped(acc, q, sp, nw, zp, nw, k0, K, GS, cols, nm, a, HZ)
        elif GS % BK == 0:
            if HZ:
                z = tl.load(zp + g * nw + cols, mask=nm, other=0).to(tl.float32)[None, None, None, :]
            else:
                z = 2 ** (BITS - 1)
            w = tl.reshape(_intq_codes(q, fmask, magic, off + z), (BK, BN))
        else:               # groups smaller than the tile: dequantize each row before the dot
            s2, zs2 = intq_scale(sp, zp, k0, K, cols, nm, nw, r, HZ, BITS, GS, PF, BK)
            w = tl.reshape(_intq_codes(q, fmask, magic, off) * s2[:, None, None, :] - zs2[:, None, None, :], (BK, BN))
        if not FIELD_DOTS:
            kk = k0 + rk
            km = kk < K
            if HP:
                xi = tl.load(pp + kk, mask=km, other=0)
                a = tl.load(arow[:, None] + xi[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            else:
                a = tl.load(arow[:, None] + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            if GS % BK == 0:
                acc += tl.dot(a, w.to(a.dtype)) * s[None, :]
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


@triton.jit
def _dot_intq_gu(accg, accu, arow, rm, qp, sp, zp, pp, nw, K, INTER, n0, k_lo, k_hi,
                 GS: tl.constexpr, HZ: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """_dot_intq's 16-row per-field tiles (int4, tiles inside one group) for the gate (columns
    n0..) and the up (INTER + n0..) half of a gate_up weight in one K loop: each activation tile is
    loaded, and split into its fields, once for both, and both halves' words are in flight at once."""
    R: tl.constexpr = BK // 8
    rn = n0 + tl.arange(0, BN)
    nm = rn < INTER
    rr0 = tl.arange(0, R)
    KP = K // 8
    a_nxt = x_tile(arow[:, None], rm[:, None], pp, k_lo, K, BK, HP)
    for k0 in range(k_lo, tl.minimum(k_hi, K), BK):
        rr = k0 // 8 + rr0
        wm = (rr < KP)[:, None] & nm[None, :]
        qg = tl.load(qp + rr[:, None] * nw + rn[None, :], mask=wm, other=0)
        qu = tl.load(qp + rr[:, None] * nw + (INTER + rn)[None, :], mask=wm, other=0)
        g = k0 // GS
        sg = tl.load(sp + g * nw + rn, mask=nm, other=0.0).to(tl.float32)
        su = tl.load(sp + g * nw + INTER + rn, mask=nm, other=0.0).to(tl.float32)
        a = a_nxt
        a_nxt = x_tile(arow[:, None], rm[:, None], pp, k0 + BK, K, BK, HP)
        accg += int4_field_dots(tl.zeros_like(accg), qg, zp + g * nw + rn, nm, a, HZ) * sg[None, :]
        accu += int4_field_dots(tl.zeros_like(accu), qu, zp + g * nw + INTER + rn, nm, a, HZ) * su[None, :]
    return accg, accu


@triton.jit
def _fp8_dot_step(acc, a, am, w, sp, rows, nm, k0, K, ACT: tl.constexpr, BKW: tl.constexpr, BNW: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] @ the fp8 weight tile w [BK, BN] (bytes) of the weight rows
    `rows`, K step k0; W8A8 (ACT 1): a holds e4m3 codes of one 128-wide activation slice, am [BM]
    their scales."""
    w = w.to(tl.float8e4nv, bitcast=True)
    sc = tl.load(sp + (rows // BNW) * tl.cdiv(K, BKW) + k0 // BKW, mask=nm, other=0.0)
    if ACT == 1:   # BK = 128: one activation slice per step
        acc += tl.dot(a.to(tl.float8e4nv, bitcast=True), w) * am[:, None] * sc[None, :]
    else:
        acc = tl.dot(a, (w.to(tl.float32) * sc[None, :]).to(a.dtype), acc)
    return acc


@triton.jit
def _dot_fp8_gu(accg, accu, arow, qrow, srow, rm, wp, sp, K, INTER, n0, k_lo, k_hi,
                ACT: tl.constexpr, BKW: tl.constexpr, BNW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """_dot_nk for the gate (rows n0..) and up (INTER + n0..) half of an fp8 gate_up weight
    [2 INTER, K] in one K loop: each activation tile is loaded once for both."""
    rn = n0 + tl.arange(0, BN)
    nm = rn < INTER
    rg = rn.to(tl.int64)
    ru = rg + INTER
    rk = tl.arange(0, BK)
    wp = wp.to(tl.pointer_type(tl.uint8))
    if ACT == 1:
        arow = (qrow + K).to(tl.pointer_type(tl.uint8))   # plane 1: e4m3 codes
    for k0 in range(k_lo, tl.minimum(k_hi, K), BK):
        kk = k0 + rk
        km = kk < K
        a = tl.load(arow[:, None] + kk[None, :], mask=rm[:, None] & km[None, :], other=0)
        wm = km[:, None] & nm[None, :]
        wg = tl.load(wp + rg[None, :] * K + kk[:, None], mask=wm, other=0)
        wu = tl.load(wp + ru[None, :] * K + kk[:, None], mask=wm, other=0)
        am = tl.load(srow + 1 + k0 // 128, mask=rm, other=0.0) if ACT == 1 else 0.0
        accg = _fp8_dot_step(accg, a, am, wg, sp, rg, nm, k0, K, ACT, BKW, BNW)
        accu = _fp8_dot_step(accu, a, am, wu, sp, ru, nm, k0, K, ACT, BKW, BNW)
    return accg, accu


@triton.jit
def _dot_nk(acc, arow, qrow, srow, rm, wp, sp, zp, row0, nw, K, n_lim, n0, k_lo, k_hi,
            LAY: tl.constexpr, ACT: tl.constexpr, HZ: tl.constexpr, BKW: tl.constexpr, BNW: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # arow / qrow / srow [BM]: the rows' activations, W8A8 codes and scales (_act_quant_kernel)
    rn = n0 + tl.arange(0, BN)
    nm = rn < n_lim
    rows = (row0 + rn).to(tl.int64)
    rk = tl.arange(0, BK)
    if LAY == _FP8:
        wp = wp.to(tl.pointer_type(tl.uint8))
        if ACT == 1:
            arow = (qrow + K).to(tl.pointer_type(tl.uint8))   # plane 1: e4m3 codes
    if LAY == _INT8:
        if ACT == 1:
            arow = qrow.to(tl.pointer_type(tl.int8))          # plane 0: int8 codes
            acc_i = tl.zeros([BM, BN], dtype=tl.int32)
        asum = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_hi, K), BK):
        kk = k0 + rk
        km = kk < K
        a = tl.load(arow[:, None] + kk[None, :], mask=rm[:, None] & km[None, :], other=0)
        w = tl.load(wp + rows[None, :] * K + kk[:, None], mask=km[:, None] & nm[None, :], other=0)
        if LAY == _FP8:
            am = tl.load(srow + 1 + k0 // 128, mask=rm, other=0.0) if ACT == 1 else 0.0
            acc = _fp8_dot_step(acc, a, am, w, sp, rows, nm, k0, K, ACT, BKW, BNW)
        elif LAY == _INT8:
            if ACT == 1:
                acc_i = tl.dot(a, w, acc_i, out_dtype=tl.int32)
                if HZ:
                    asum += tl.sum(a.to(tl.float32), axis=1)
            else:
                wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
                acc = tl.dot(a, wf.to(a.dtype), acc)
                if HZ:
                    asum += tl.sum(a.to(tl.float32), axis=1)
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    if LAY == _INT8:
        if ACT == 1:
            acc += acc_i.to(tl.float32)
        if HZ:
            zero = tl.load(zp + rows, mask=nm, other=0.0)
            acc -= asum[:, None] * zero[None, :]
        acc = acc * tl.load(sp + rows, mask=nm, other=0.0)[None, :]
        if ACT == 1:
            acc = acc * tl.load(srow, mask=rm, other=0.0)[:, None]
    return acc


@triton.jit
def _dot_slot(acc, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi,
              w, s, z, pm, mp, rs, C: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
              HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr, BKF: tl.constexpr,
              BKQ: tl.constexpr, BKI: tl.constexpr, MMA: tl.constexpr):
    LAY: tl.constexpr = C % 4
    ACT: tl.constexpr = (C // 4) % 2
    HZ: tl.constexpr = (C // 8) % 2
    HP: tl.constexpr = (C // 16) % 2
    PROJ: tl.constexpr = (C // 32) % 4
    BITS: tl.constexpr = 8 if (C // 128) % 2 == 1 else 4
    if _covers(PROJ, HALF):
        loc32 = _slot_index(mp, e, C)
        if loc32 >= 0:
            loc = loc32.to(tl.int64)
            nw, n_lim, row0 = _slot_rows(PROJ, HALF, INTER, HID)
            if LAY == _INTQ:
                PF: tl.constexpr = 32 // BITS
                qe, se, ze, pe = _intq_expert(w, s, z, pm, loc, rs, nw, G, PF)
                if MMA > 0:     # 8 pairs on gemv_mma's tiles: the two halves of BN rows are lo / hi
                    T: tl.constexpr = BN // 16
                    c0 = row0 + n0
                    acc += gemv_int4_mma(alane, qe, se, ze, c0, c0 + 8 * T, row0 + n_lim, row0 + n_lim, nw, rs,
                                         k_lo, k_hi, G, HZ, MMA, T, False, 8, 0, 8, True)
                elif BITS == 4 and BKQ >= 128 and BM >= 32 and G % BKQ == 0:
                    acc = _dot_intq_t(acc, arow, rm, qe, se, ze, pe, row0, nw, rs, n_lim, n0, k_lo, k_hi,
                                      G, HZ, HP, BN, BKQ)
                else:
                    acc = _dot_intq(acc, arow, rm, qe, se, ze, pe, row0, nw, rs, n_lim, n0, k_lo, k_hi,
                                    BITS, G, HZ, HP, BN, BKQ)
            elif MMA > 0:   # another layout in an 8-pair block: its dot on 16 rows, 8 masked off
                a16, q16, s16, m16 = _rows16(arow, qrow, srow, rm)
                acc += _fold16(_dot_other(tl.zeros([16, BN], dtype=tl.float32), a16, q16, s16, m16, w, s, z, loc,
                                          row0, nw, K, n_lim, n0, k_lo, k_hi, LAY, ACT, HZ, G, B, 16, BN,
                                          BKD, BKF, BKI))
            else:
                acc = _dot_other(acc, arow, qrow, srow, rm, w, s, z, loc, row0, nw, K, n_lim, n0, k_lo, k_hi,
                                 LAY, ACT, HZ, G, B, BM, BN, BKD, BKF, BKI)
        found = tl.maximum(found, (loc32 >= 0).to(tl.int32))
    return acc, found


@triton.jit
def _dot_other(acc, arow, qrow, srow, rm, w, s, z, loc, row0, nw, K, n_lim, n0, k_lo, k_hi,
               LAY: tl.constexpr, ACT: tl.constexpr, HZ: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr, BKF: tl.constexpr, BKI: tl.constexpr):
    # an fp8 / int8 / dense slot's rows of expert slot loc into acc [BM, BN]
    if LAY == _FP8:
        we, se = _fp8_expert(w, s, loc, nw, K, G, B)
        acc = _dot_nk(acc, arow, qrow, srow, rm, we, se, z, row0, nw, K, n_lim, n0, k_lo, k_hi,
                      LAY, ACT, HZ, G, B, BM, BN, BKF)
    elif LAY == _INT8:
        acc = _dot_nk(acc, arow, qrow, srow, rm, w + loc * (nw * K), s + loc * nw, z + loc * nw,
                      row0, nw, K, n_lim, n0, k_lo, k_hi, LAY, ACT, HZ, 1, 1, BM, BN, BKI)
    else:
        acc = _dot_nk(acc, arow, qrow, srow, rm, w + loc * (nw * K), s, z,
                      row0, nw, K, n_lim, n0, k_lo, k_hi, LAY, 0, 0, 1, 1, BM, BN, BKD)
    return acc


@triton.jit
def _rows16(arow, qrow, srow, rm):
    """An 8-pair block's rows (x, W8A8 codes, scales, mask; [8] each) as 16 for tl.dot, which takes
    16 rows at least: the 8 twice, the second copy masked off (its loads give zeros)."""
    first = tl.reshape(tl.broadcast_to((tl.arange(0, 2) == 0)[:, None], (2, 8)), (16,))
    return _twice(arow), _twice(qrow), _twice(srow), _twice(rm) & first


@triton.jit
def _twice(v):
    return tl.reshape(tl.broadcast_to(v[None, :], (2, 8)), (16,))


@triton.jit
def _fold16(acc16):
    # [16, BN] of _rows16's rows (the second 8 zero) -> [8, BN]
    return tl.sum(tl.reshape(acc16, (2, 8, acc16.shape[1])), axis=0)


@triton.jit
def _dot_slot_gu(accg, accu, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi, w, s, z, pm, mp, rs,
                 C: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BN: tl.constexpr, BKF: tl.constexpr,
                 BKQ: tl.constexpr, MMA: tl.constexpr):
    """Gate and up tiles of one gate_up slot (int4 on the per-field or mma tiles, or fp8) in one K loop;
    found: 0/1, some slot holds the expert (then both halves)."""
    LAY: tl.constexpr = C % 4
    ACT: tl.constexpr = (C // 4) % 2
    HZ: tl.constexpr = (C // 8) % 2
    HP: tl.constexpr = (C // 16) % 2
    loc32 = _slot_index(mp, e, C)
    if loc32 >= 0:
        loc = loc32.to(tl.int64)
        nw = 2 * INTER
        if LAY == _INTQ:
            qe, se, ze, pe = _intq_expert(w, s, z, pm, loc, rs, nw, G, 8)
            if MMA > 0:     # 8 pairs on gemv_mma's tiles: lo / hi columns = gate / up rows n0 ..
                y = gemv_int4_mma(alane, qe, se, ze, n0, INTER + n0, INTER, 2 * INTER, nw, rs, k_lo, k_hi,
                                  G, HZ, MMA, BN // 8, False, 8, 0, 8, True)                       # [8, 2 BN]
                g, u = tl.split(tl.permute(tl.reshape(y, (8, 2, BN)), (0, 2, 1)))
                accg += g
                accu += u
            else:
                accg, accu = _dot_intq_gu(accg, accu, arow, rm, qe, se, ze, pe, nw, rs, INTER, n0, k_lo, k_hi,
                                          G, HZ, HP, BN, BKQ)
        else:
            we, se = _fp8_expert(w, s, loc, nw, K, G, B)
            if MMA > 0:     # fp8 in an 8-pair block: its dots on 16 rows, 8 masked off (_rows16)
                a16, q16, s16, m16 = _rows16(arow, qrow, srow, rm)
                g16, u16 = _dot_fp8_gu(tl.zeros([16, BN], dtype=tl.float32), tl.zeros([16, BN], dtype=tl.float32),
                                       a16, q16, s16, m16, we, se, K, INTER, n0, k_lo, k_hi, ACT, G, B, BN, BKF)
                accg += _fold16(g16)
                accu += _fold16(u16)
            else:
                accg, accu = _dot_fp8_gu(accg, accu, arow, qrow, srow, rm, we, se, K, INTER, n0, k_lo, k_hi,
                                         ACT, G, B, BN, BKF)
    return accg, accu, tl.maximum(found, (loc32 >= 0).to(tl.int32))


@triton.jit
def _dot_gate_up(arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi,
                 w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                 C0: tl.constexpr, G0: tl.constexpr, B0: tl.constexpr,
                 C1: tl.constexpr, G1: tl.constexpr, B1: tl.constexpr,
                 C2: tl.constexpr, G2: tl.constexpr, B2: tl.constexpr,
                 C3: tl.constexpr, G3: tl.constexpr, B3: tl.constexpr,
                 NS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKF: tl.constexpr, BKQ: tl.constexpr,
                 MMA: tl.constexpr):
    """(gate, up, found) as _dot_half(HALF 0) and _dot_half(HALF 1) give them, for a launch
    whose slots are all int4 gate_up weights on the per-field tiles, or all fp8 gate_up weights
    (GU, moe._gate_up_fused)."""
    g = tl.zeros([BM, BN], dtype=tl.float32)
    u = tl.zeros([BM, BN], dtype=tl.float32)
    found = e * 0
    g, u, found = _dot_slot_gu(g, u, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi,
                                w0, s0, z0, p0, m0, r0, C0, G0, B0, BN, BKF, BKQ, MMA)
    if NS > 1:
        g, u, found = _dot_slot_gu(g, u, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi,
                                    w1, s1, z1, p1, m1, r1, C1, G1, B1, BN, BKF, BKQ, MMA)
    if NS > 2:
        g, u, found = _dot_slot_gu(g, u, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi,
                                    w2, s2, z2, p2, m2, r2, C2, G2, B2, BN, BKF, BKQ, MMA)
    if NS > 3:
        g, u, found = _dot_slot_gu(g, u, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi,
                                    w3, s3, z3, p3, m3, r3, C3, G3, B3, BN, BKF, BKQ, MMA)
    return g, u, found


@triton.jit
def _dot_half(arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi,
              w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
              C0: tl.constexpr, G0: tl.constexpr, B0: tl.constexpr,
              C1: tl.constexpr, G1: tl.constexpr, B1: tl.constexpr,
              C2: tl.constexpr, G2: tl.constexpr, B2: tl.constexpr,
              C3: tl.constexpr, G3: tl.constexpr, B3: tl.constexpr,
              NS: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr,
              BKF: tl.constexpr, BKQ: tl.constexpr, BKI: tl.constexpr, MMA: tl.constexpr):
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    found = e * 0
    acc, found = _dot_slot(acc, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi, w0, s0, z0, p0, m0, r0, C0, G0, B0,
                           HALF, BM, BN, BKD, BKF, BKQ, BKI, MMA)
    if NS > 1:
        acc, found = _dot_slot(acc, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi, w1, s1, z1, p1, m1, r1, C1, G1, B1,
                               HALF, BM, BN, BKD, BKF, BKQ, BKI, MMA)
    if NS > 2:
        acc, found = _dot_slot(acc, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi, w2, s2, z2, p2, m2, r2, C2, G2, B2,
                               HALF, BM, BN, BKD, BKF, BKQ, BKI, MMA)
    if NS > 3:
        acc, found = _dot_slot(acc, found, arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi, w3, s3, z3, p3, m3, r3, C3, G3, B3,
                               HALF, BM, BN, BKD, BKF, BKQ, BKI, MMA)
    return acc, found


@triton.jit
def _x_rows(x_ptr, p, K, MODE: tl.constexpr, TOPK: tl.constexpr, XPAIR: tl.constexpr):
    """The input row of each pair p: x row p // TOPK on the gate/up side (XPAIR: row p, x
    permuted per pair), act row p on the down side."""
    return x_ptr + (p if XPAIR or MODE == _MODE_DOWN else p // TOPK) * K


@triton.jit
def _moe_dot_kernel(x_ptr, q_ptr, qs_ptr, NQS, sorted_ptr, blk_ptr, rw_ptr, out_ptr, fin_ptr, cnt_ptr, ws_ptr, ucnt_ptr,
                    P, K, INTER, HID, n_cnt, k_per,
                    w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                    C0: tl.constexpr, G0: tl.constexpr, B0: tl.constexpr,
                    C1: tl.constexpr, G1: tl.constexpr, B1: tl.constexpr,
                    C2: tl.constexpr, G2: tl.constexpr, B2: tl.constexpr,
                    C3: tl.constexpr, G3: tl.constexpr, B3: tl.constexpr,
                    NS: tl.constexpr, MODE: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BKD: tl.constexpr, BKF: tl.constexpr, BKQ: tl.constexpr, BKI: tl.constexpr,
                    SUM: tl.constexpr, ZMISS: tl.constexpr, SPLIT: tl.constexpr = 1, GU: tl.constexpr = False,
                    PDL: tl.constexpr = False, XPAIR: tl.constexpr = False, MMA: tl.constexpr = 0):
    """Grid (blocks of BM sorted pairs, N tiles, SPLIT); block b holds pairs of expert blk[b] (-1:
    padding, exits at once). Same outputs as _moe_gemv_kernel. SPLIT > 1 (decode: few pairs per
    expert, so few blocks) splits K into chunks of k_per rows, one program each: UP programs store
    their gate and up partials in ws [P, SPLIT, 2, INTER] fp32 and the last of a tile's SPLIT to
    arrive (counter ucnt, left zero) applies silu * mul; DOWN programs write buf row p * SPLIT + z
    and the token's sum takes TOPK * SPLIT rows, as on the GEMV path. GU: the UP programs run gate
    and up in one K loop (_dot_gate_up). XPAIR: as in _moe_gemv_kernel. MMA (a dot config's "mma",
    BM 8; the kernel's warp count, 0: off): int4 slots (of 128-input groups: moe._mma_dot_fits) run
    gemv_mma's tiles, the block's 8 pairs as the mma's 8 B columns: a lane loads the x row of the
    pair lane_rows names, so the weights are read and dequantized once per block; fp8 / int8 /
    dense slots run their dots on 16 rows, the block's 8 and 8 masked off (_rows16)."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    b = tl.program_id(0)
    t = tl.program_id(1)
    z = tl.program_id(2)
    n0 = t * BN
    rn = n0 + tl.arange(0, BN)
    k_lo = z * k_per
    k_hi = k_lo + k_per
    if MODE == _MODE_UP:
        if t == 0 and z == 0:
            _zero_counters(cnt_ptr, n_cnt, b, tl.num_programs(0), 256)
    e = tl.load(blk_ptr + b)
    if e >= 0:
        pr = tl.load(sorted_ptr + b * BM + tl.arange(0, BM))
        rm = pr < P
        pr = tl.where(rm, pr, 0).to(tl.int64)
        arow = _x_rows(x_ptr, pr, K, MODE, TOPK, XPAIR)
        if MMA > 0:
            tl.static_assert(BM == 8, "the mma tiles take 8 pairs per block")
            pl = tl.load(sorted_ptr + b * BM + lane_rows(MMA))      # each lane's pair; padding: row 0
            alane = _x_rows(x_ptr, tl.where(pl < P, pl, 0).to(tl.int64), K, MODE, TOPK, XPAIR)
        else:
            alane = arow
        if MODE == _MODE_UP:
            xr = pr // TOPK
            qrow = q_ptr + xr * 2 * K     # W8A8 codes / scales of the rows (_act_quant_kernel)
            srow = qs_ptr + xr * NQS
            if GU:
                g, u, fg = _dot_gate_up(arow, alane, qrow, srow, rm, e, n0, K, INTER, k_lo, k_hi,
                                        w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2,
                                        w3, s3, z3, p3, m3, r3, C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3,
                                        NS, BM, BN, BKF, BKQ, MMA)
                fu = fg
            else:
                g, fg = _dot_half(arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi,
                                  w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                  C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 0, BM, BN, BKD, BKF, BKQ, BKI, MMA)
                u, fu = _dot_half(arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi,
                                  w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                                  C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 1, BM, BN, BKD, BKF, BKQ, BKI, MMA)
            keep = fg * fu       # 0/1: this launch holds the expert (else its act row is left alone)
            if SPLIT > 1:
                wsp = ws_ptr + (pr * SPLIT * 2 * INTER)[:, None] + rn[None, :]
                wm = rm[:, None] & (rn < INTER)[None, :]
                tl.store(wsp + (2 * z) * INTER, g, mask=wm)
                tl.store(wsp + (2 * z + 1) * INTER, u, mask=wm)
                tl.debug_barrier()   # all threads' partial stores precede the release below
                ctr = ucnt_ptr + b * tl.num_programs(1) + t
                old = tl.atomic_add(ctr, 1, sem="acq_rel", scope="gpu")
                tl.debug_barrier()
                if old == SPLIT - 1:
                    g, u = _join_gate_up(wsp, INTER, SPLIT, wm)
                    tl.atomic_xchg(ctr, 0)   # ready for the next launch (every program has arrived)
                keep = keep * (old == SPLIT - 1).to(tl.int32)    # the last to arrive writes act
            tl.store(out_ptr + pr[:, None] * INTER + rn[None, :], _silu_mul(g, u).to(out_ptr.dtype.element_ty),
                     mask=rm[:, None] & (rn < INTER * keep)[None, :])
        else:
            qrow = q_ptr + pr * 2 * K
            srow = qs_ptr + pr * NQS
            d, fd = _dot_half(arow, alane, qrow, srow, rm, e, n0, K, INTER, HID, k_lo, k_hi,
                              w0, s0, z0, p0, m0, r0, w1, s1, z1, p1, m1, r1, w2, s2, z2, p2, m2, r2, w3, s3, z3, p3, m3, r3,
                              C0, G0, B0, C1, G1, B1, C2, G2, B2, C3, G3, B3, NS, 2, BM, BN, BKD, BKF, BKQ, BKI, MMA)
            nm = rn < HID
            rwv = tl.load(rw_ptr + pr, mask=rm, other=0.0)
            val = d * rwv[:, None]
            optr = out_ptr + (pr * SPLIT + z)[:, None] * HID + rn[None, :]
            if ZMISS:
                tl.store(optr, val.to(out_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])
            else:
                tl.store(optr, val.to(out_ptr.dtype.element_ty), mask=rm[:, None] & (rn < HID * fd)[None, :])
            if SUM:
                tl.debug_barrier()
                tok = pr // TOPK
                old = tl.atomic_add(cnt_ptr + tok * tl.num_programs(1) + t, tl.full([BM], 1, tl.int32),
                                    mask=rm, sem="acq_rel", scope="gpu")
                tl.debug_barrier()
                last = rm & (old == TOPK * SPLIT - 1)
                tot = tl.zeros([BM, BN], dtype=tl.float32)
                for jj in tl.static_range(TOPK * SPLIT):
                    tot += tl.load(out_ptr + (tok * TOPK * SPLIT + jj)[:, None] * HID + rn[None, :],
                                   mask=last[:, None] & nm[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
                tl.store(fin_ptr + tok[:, None] * HID + rn[None, :], tot.to(fin_ptr.dtype.element_ty),
                         mask=last[:, None] & nm[None, :])


@triton.jit
def _perm_index(idx, e, kk, km, pm, mp, rs, HP: tl.constexpr):
    # kk's input positions in the act-order of expert e's slot (pm, mp, rs), if it has one
    if HP:
        loc = tl.load(mp + e)
        if loc >= 0:
            idx = tl.load(pm + loc.to(tl.int64) * rs + kk, mask=km, other=0)
    return idx


@triton.jit
def _permute_pairs_kernel(src_ptr, dst_ptr, ids_ptr, K, p0, m0, r0, p1, m1, r1, p2, m2, r2, p3, m3, r3,
                          H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, H3: tl.constexpr,
                          DIV: tl.constexpr, BK: tl.constexpr):
    """Grid (P pairs, K tiles): dst[p, k] = src[p // DIV, perm_e[k]] (e = ids[p]; perm_e of the
    slot among 0-3 with Hs that holds e, else the identity), so an act-order launch reads its
    pairs' rows in K order (XPAIR) instead of gathering x through perm in every program."""
    p = tl.program_id(0)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    km = kk < K
    e = tl.load(ids_ptr + p)
    idx = _perm_index(kk, e, kk, km, p0, m0, r0, H0)
    idx = _perm_index(idx, e, kk, km, p1, m1, r1, H1)
    idx = _perm_index(idx, e, kk, km, p2, m2, r2, H2)
    idx = _perm_index(idx, e, kk, km, p3, m3, r3, H3)
    v = tl.load(src_ptr + (p // DIV).to(tl.int64) * K + idx, mask=km, other=0.0)
    tl.store(dst_ptr + p.to(tl.int64) * K + kk, v, mask=km)


# ----------------------------------------------------------------------------------------------
# the pieces around torch._grouped_mm (moe.grouped_moe)

@triton.jit
def _silu_mul_kernel(h_ptr, a_ptr, n_ptr, INTER, BI: tl.constexpr):
    """a[p] = silu(h[p, :INTER]) * h[p, INTER:] in fp32, rounded once (as the fused kernels' act),
    for the n = *n_ptr rows the grouped GEMM wrote (the rest is left alone)."""
    p = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BI + tl.arange(0, BI)
    m = c < tl.where(p < tl.load(n_ptr), INTER, 0)
    g = tl.load(h_ptr + p * 2 * INTER + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + p * 2 * INTER + INTER + c, mask=m, other=0.0).to(tl.float32)
    tl.store(a_ptr + p * INTER + c, _silu_mul(g, u).to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def _intq_stack_kernel(qw_ptr, s_ptr, z_ptr, p_ptr, w_ptr, dst_ptr, N, K, G, stride_qe, stride_se, stride_we, stride_w,
                       BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Expert slot e = program_id(2) of an intq bucket (qweight [E_b, K/pf, N], scales and zeros
    [E_b, ceil(K/G), N], act-order perm [E_b, K]) dequantized, as intq.py's dequant path does, into
    w[dst[e]]: [K, N] in input order, with row stride stride_w (a column slice of a [E, K, *] stack
    that grouped_moe multiplies)."""
    e = tl.program_id(2)
    d = tl.load(dst_ptr + e).to(tl.int64)
    intq_dequant_tile(qw_ptr + e.to(tl.int64) * stride_qe, s_ptr + e.to(tl.int64) * stride_se,
                      z_ptr + e.to(tl.int64) * stride_se, w_ptr + d * stride_we, N, K, G, 0, N, N, N, stride_w,
                      BITS, HAS_ZERO, BLOCK_R, BLOCK_N, p_ptr + e.to(tl.int64) * K, HAS_PERM)


@triton.jit
def _token_sum_kernel(d_ptr, pos_ptr, w_ptr, out_ptr, HID, TOPK: tl.constexpr, BH: tl.constexpr):
    """out[t] = sum_j w[t, j] * d[pos[t * TOPK + j]] in fp32, j in fixed order, rounded once;
    pos -1: the pair's expert is not held here (expert parallel), it adds zero."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    m = c < HID
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        s = tl.load(pos_ptr + t * TOPK + j)
        row = tl.load(d_ptr + tl.maximum(s, 0) * HID + c, mask=c < tl.where(s >= 0, HID, 0), other=0.0)
        acc += tl.load(w_ptr + t * TOPK + j) * row.to(tl.float32)
    tl.store(out_ptr + t * HID + c, acc.to(out_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# routing and alignment

@triton.jit
def _topk_softmax(lg, emask, ev, TOPK: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr,
                  KB: tl.constexpr):
    """lg [BT, EB] fp32 logits -> (weights [BT, KB], ids [BT, KB]): softmax(fp32) over E -> top-k
    (ties: lowest expert id) -> optional renormalisation."""
    lg = tl.where(emask[None, :], lg, float("-inf"))   # rows past M stay finite (no NaN work)
    mx = tl.max(lg, axis=1)
    pr = tl.where(emask[None, :], tl.exp(lg - mx[:, None]), 0.0)
    pr = pr / tl.sum(pr, axis=1)[:, None]
    # a NaN logit makes the row's probabilities NaN (as torch's softmax does): such a row still
    # picks valid experts (NaN -> -1, ties to the lowest id), and gets NaN weights, not ids >= E
    nan_row = tl.max((emask[None, :] & (pr != pr)).to(tl.int32), axis=1) > 0
    pr = tl.where(emask[None, :] & (pr == pr), pr, -1.0)
    # one max per pick (the pick is a chain of TOPK reductions): a key with the probability's bits
    # above the inverted expert id, so the largest key is the largest probability, ties to the
    # lowest id. Bits of a float >= 0 order as the float; the -1 entries become int -1, below them.
    bits = tl.where(pr >= 0, pr.to(tl.int32, bitcast=True), -1)
    key = (bits.to(tl.int64) << 32) | (EB - 1 - ev)[None, :].to(tl.int64)
    kv = tl.arange(0, KB)
    wv = tl.zeros([BT, KB], dtype=tl.float32)
    iv = tl.zeros([BT, KB], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        kmax = tl.max(key, axis=1)
        b = (kmax >> 32).to(tl.int32)
        v = tl.where(b >= 0, b.to(tl.float32, bitcast=True), -1.0)
        i = EB - 1 - (kmax & 0xFFFFFFFF).to(tl.int32)
        wv = tl.where(kv[None, :] == j, v[:, None], wv)
        iv = tl.where(kv[None, :] == j, i[:, None], iv)
        key = tl.where(key == kmax[:, None], -(1 << 62), key)    # picked: below every other key
    if RENORM:
        wv = wv / tl.sum(wv, axis=1)[:, None]
    return tl.where(nan_row[:, None], float("nan"), wv), iv


@triton.jit
def _store_topk(w_ptr, id_ptr, wv, iv, rows, rmask, TOPK: tl.constexpr, KB: tl.constexpr):
    kv = tl.arange(0, KB)
    om = rmask[:, None] & (kv < TOPK)[None, :]
    off = rows[:, None] * TOPK + kv[None, :]
    tl.store(w_ptr + off, wv, mask=om)
    tl.store(id_ptr + off, iv, mask=om)


@triton.jit
def _route_kernel(logit_ptr, w_ptr, id_ptr, M, E, stride_m,
                  TOPK: tl.constexpr, RENORM: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr,
                  KB: tl.constexpr, PDL: tl.constexpr = False):
    """router logits [M, E] -> top-k weights and ids, BT tokens per program."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < M
    ev = tl.arange(0, EB)
    emask = ev < E
    lg = tl.load(logit_ptr + rows[:, None].to(tl.int64) * stride_m + ev[None, :],
                 mask=rmask[:, None] & emask[None, :], other=0.0).to(tl.float32)
    wv, iv = _topk_softmax(lg, emask, ev, TOPK, RENORM, BT, EB, KB)
    _store_topk(w_ptr, id_ptr, wv, iv, rows, rmask, TOPK, KB)


@triton.jit
def _router_route_kernel(x_ptr, g_ptr, lg_ptr, w_ptr, id_ptr, cnt_ptr, r_ptr, nw_ptr, y_ptr, h_ptr,
                         M, E, H, stride_xm, eps,
                         TOPK: tl.constexpr, RENORM: tl.constexpr, MB: tl.constexpr, BE: tl.constexpr,
                         BH: tl.constexpr, EB: tl.constexpr, KB: tl.constexpr, NORM: tl.constexpr,
                         TB: tl.constexpr, PDL: tl.constexpr = False):
    """Decode routing in one launch: program p computes the logits of experts p*BE.. for all M
    (<= MB) tokens, rounded to x's dtype as the router linear's output is, into lg [M, E]; the
    last program to arrive (arrival counter, reset after) runs softmax / top-k over all E.
    NORM: the router input is RMSNorm(x + residual) (kernels/norm.py's rounding), computed by
    every program for itself; program 0 also stores it (y) and the sum (h) for the experts and
    the next layer. Rows are contiguous (stride_xm) in x, residual, y and h alike."""
    rows = tl.arange(0, MB)
    rmask = rows < M
    re = tl.program_id(0) * BE + tl.arange(0, BE)
    rh = tl.arange(0, BH)
    g_rows = g_ptr + re[:, None].to(tl.int64) * H
    g_nxt = tl.load(g_rows + rh[None, :], mask=(re < E)[:, None] & (rh < H)[None, :], other=0.0)
    if NORM:    # and the norm weight's (as a row: x's layout): it would be a memory round trip after the norm's sum
        w_nxt = tl.load(nw_ptr + rh[None, :], mask=(rh < H)[None, :], other=0.0)
    pdl.wait(PDL)     # the first router tile is loaded; x comes from the kernel before
    x_rows = rows[:, None] * stride_xm
    if NORM:
        ss = tl.zeros([MB], dtype=tl.float32)
        for h0 in range(0, H, BH):
            hv = _residual_sum(x_ptr, r_ptr, x_rows + (h0 + rh)[None, :], rmask[:, None] & (h0 + rh < H)[None, :])
            ss += tl.sum(hv * hv, axis=1)
        rs = tl.rsqrt(ss / H + eps)[:, None]
    acc = tl.zeros([MB, BE], dtype=tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + rh
        hm = hh < H
        g = g_nxt
        g_nxt = tl.load(g_rows + (hh + BH)[None, :], mask=(re < E)[:, None] & (hh + BH < H)[None, :], other=0.0)
        xm = rmask[:, None] & hm[None, :]
        if NORM:
            w = w_nxt
            w_nxt = tl.load(nw_ptr + (hh + BH)[None, :], mask=(hh + BH < H)[None, :], other=0.0)
            hv = _residual_sum(x_ptr, r_ptr, x_rows + hh[None, :], xm)
            n = (hv * rs).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (w.to(tl.float32) * n).to(x_ptr.dtype.element_ty)
            if tl.program_id(0) == 0:
                tl.store(h_ptr + x_rows + hh[None, :], hv.to(h_ptr.dtype.element_ty), mask=xm)
                tl.store(y_ptr + x_rows + hh[None, :], x, mask=xm)
        else:
            x = tl.load(x_ptr + x_rows + hh[None, :], mask=xm, other=0.0)
        if BE == 1:     # x and the router row share one layout: no shared-memory shuffle of either
            acc += tl.sum(x.to(tl.float32) * g.to(tl.float32), axis=1)[:, None]
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * g.to(tl.float32)[None, :, :], axis=2)
    acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(lg_ptr + rows[:, None] * E + re[None, :], acc, mask=rmask[:, None] & (re < E)[None, :])
    tl.debug_barrier()  # all threads' logit stores precede the release below
    prev = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if prev == tl.num_programs(0) - 1:
        # TB >= MB rows, at least one per warp (rows past M repeat row M - 1, not stored): each
        # warp then holds whole rows, so the top-k's reductions stay inside a warp (no barriers)
        tr = tl.arange(0, TB)
        ev = tl.arange(0, EB)
        emask = ev < E
        lg = tl.load(lg_ptr + tl.minimum(tr, M - 1)[:, None] * E + ev[None, :], mask=emask[None, :], other=0.0,
                     cache_modifier=".cg")
        wv, iv = _topk_softmax(lg, emask, ev, TOPK, RENORM, TB, EB, KB)
        _store_topk(w_ptr, id_ptr, wv, iv, tr, tr < M, TOPK, KB)
        tl.atomic_xchg(cnt_ptr, 0)  # ready for the next launch / graph replay


@triton.jit
def _residual_sum(x_ptr, r_ptr, offs, mask):
    """(x + residual) at offs, rounded to x's dtype as the torch add is, as fp32."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return (x.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype).to(tl.float32)


@triton.jit
def _expert_onehot(ids_ptr, idx, P, EB: tl.constexpr):
    """[CH, EB] int32: pair idx (< P) is routed to expert e (ids of pairs past P match none)."""
    e = tl.load(ids_ptr + idx, mask=idx < P, other=-1)
    return (e[:, None] == tl.arange(0, EB)[None, :]).to(tl.int32)


@triton.jit
def _expert_runs(counts, E, BM: tl.constexpr):
    """Per-expert pair counts [EB] -> (ends, starts of each expert's run padded to BM slots, total)."""
    counts = tl.where(tl.arange(0, counts.shape[0]) < E, counts, 0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    return ends, ends - padded, tl.sum(padded, axis=0)


@triton.jit
def _fill_slots(sorted_ptr, s_lo, s_hi, P, CH: tl.constexpr):
    # sorted[s_lo:s_hi] = P (padding; the scatter then overwrites the slots that hold pairs)
    ci = tl.arange(0, CH)
    for s0 in range(s_lo, s_hi, CH):
        tl.store(sorted_ptr + s0 + ci, tl.full([CH], 0, tl.int32) + P, mask=s0 + ci < s_hi)


@triton.jit
def _store_blocks(blk_ptr, ends, total, NB_MAX, BM: tl.constexpr, CH: tl.constexpr):
    # blk[b] = the expert whose run holds slot b * BM, -1 past the last run
    ci = tl.arange(0, CH)
    for b0 in range(0, NB_MAX, CH):
        pos = (b0 + ci) * BM
        eid = tl.sum((ends[None, :] <= pos[:, None]).to(tl.int32), axis=1)
        tl.store(blk_ptr + b0 + ci, tl.where(pos < total, eid, -1), mask=b0 + ci < NB_MAX)


@triton.jit
def _align_sort_kernel(ids_ptr, sorted_ptr, blk_ptr, P, E, S_MAX, NB_MAX,
                       BM: tl.constexpr, PB: tl.constexpr, EB: tl.constexpr, CH: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Sort of the P (token, expert) pairs by expert, each expert's run padded to a multiple of BM:
    sorted[s] = pair index (P = padding), blk[b] = expert of block b (-1 = unused); sizes are
    upper bounds from shapes, so no host sync. One program, P <= PB: the keys expert * PB + pair
    sort in registers into expert order, pairs in order inside an expert; a histogram (bin E: the
    padding lanes, EB > E) gives the padded runs, and sorted position i, of expert e, goes to slot
    start[e] + i - (pairs of experts before e)."""
    pdl.wait(PDL)
    i = tl.arange(0, PB)
    ids = tl.load(ids_ptr + i, mask=i < P, other=E)
    key = tl.sort(ids * PB + i)
    se = key // PB                                           # expert of sorted position i
    counts = tl.histogram(ids, EB)
    ends, starts, total = _expert_runs(counts, E, BM)
    shift = starts - (tl.cumsum(counts, axis=0) - counts)    # [EB] slot - sorted position
    _fill_slots(sorted_ptr, 0, S_MAX, P, CH)
    _store_blocks(blk_ptr, ends, total, NB_MAX, BM, CH)
    tl.debug_barrier()
    tl.store(sorted_ptr + tl.gather(shift, se, 0) + i, key % PB, mask=se < E)


# large P: a counting sort spread over one program per CH pairs, count -> scan (one program:
# expert offsets, each chunk's base per expert) -> scatter; the same order as _align_sort_kernel.
# (A one-program counting kernel, walking all pairs twice in [CH, EB] one-hot tiles, took 1.76 ms
# for 4096 tokens x top-8 on an H100 and lost to the sort kernel at every size up to 1024 pairs.)

# the chunked sort serves prefills of any size (eager above the graph buckets): its sizes are not
# specialized on (Triton compiles a kernel per value class of an int argument: 1, multiple of 16,
# other), so a warm-up that ran one size has compiled what every size takes
@triton.jit(do_not_specialize=["P", "S_PER", "S_MAX"])
def _align_count_kernel(ids_ptr, cc_ptr, sorted_ptr, P, S_PER, S_MAX, EB: tl.constexpr, CH: tl.constexpr,
                        PDL: tl.constexpr = False):
    """cc[c, e] = pairs of expert e in chunk c (pairs c*CH .. c*CH+CH-1); sorted[c*S_PER ..
    (c+1)*S_PER) = P (padding)."""
    pdl.wait(PDL)
    c = tl.program_id(0)
    oh = _expert_onehot(ids_ptr, c * CH + tl.arange(0, CH), P, EB)
    tl.store(cc_ptr + c * EB + tl.arange(0, EB), tl.sum(oh, axis=0))
    _fill_slots(sorted_ptr, c * S_PER, tl.minimum(c * S_PER + S_PER, S_MAX), P, CH)


@triton.jit(do_not_specialize=["NCH", "NB_MAX"])
def _align_scan_kernel(cc_ptr, blk_ptr, E, NCH, NB_MAX,
                       BM: tl.constexpr, EB: tl.constexpr, CB: tl.constexpr, CH: tl.constexpr,
                       PDL: tl.constexpr = False):
    """From the chunk counts: blk (as _align_sort_kernel), and cc[c, e] overwritten with the first sorted
    slot of chunk c's pairs of expert e."""
    pdl.wait(PDL)
    ev = tl.arange(0, EB)
    cb = tl.arange(0, CB)
    counts = tl.zeros([EB], dtype=tl.int32)
    for c0 in range(0, NCH, CB):
        counts += tl.sum(tl.load(cc_ptr + (c0 + cb)[:, None] * EB + ev[None, :], mask=(c0 + cb < NCH)[:, None], other=0),
                         axis=0)
    ends, running, total = _expert_runs(counts, E, BM)
    for c0 in range(0, NCH, CB):
        ptr = cc_ptr + (c0 + cb)[:, None] * EB + ev[None, :]
        m = (c0 + cb < NCH)[:, None]
        t = tl.load(ptr, mask=m, other=0)
        tl.store(ptr, tl.cumsum(t, axis=0) - t + running[None, :], mask=m)
        running += tl.sum(t, axis=0)
    _store_blocks(blk_ptr, ends, total, NB_MAX, BM, CH)


@triton.jit(do_not_specialize=["P"])
def _align_scatter_kernel(ids_ptr, cc_ptr, sorted_ptr, P, EB: tl.constexpr, CH: tl.constexpr,
                          PDL: tl.constexpr = False):
    """Chunk c's pairs into their slots: the chunk's base per expert + rank in the chunk."""
    pdl.wait(PDL)
    c = tl.program_id(0)
    base = tl.load(cc_ptr + c * EB + tl.arange(0, EB))
    idx = c * CH + tl.arange(0, CH)
    oh = _expert_onehot(ids_ptr, idx, P, EB)                                # [CH, EB]
    rank = tl.cumsum(oh, axis=0) - oh + base[None, :]
    tl.store(sorted_ptr + tl.sum(rank * oh, axis=1), idx, mask=(idx < P) & (tl.sum(oh, axis=1) > 0))
