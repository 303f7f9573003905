"""GEMV tile loops shared by the dense and the MoE kernels (intq.py, moe_triton.py).

A tile function computes y[n0:n0+BN] (fp32) of one activation row (gemv_int4_rows: of 2 or 4
rows) against one weight matrix in its canonical layout (formats/base.py) over the K range
[k_lo, k_hi); the caller owns the grid, the split-K reduction and the epilogue.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import pdl
from .quant import WEIGHT_EVICT, int4_word_codes, int4_word_dot, word_dot16, x_pairs16, zero_pairs16

# intq: qweight [K/pf, N] (K packed along 32-bit words, N contiguous), scales / zeros
# [ceil(K/G), N]; the row stride of all three is nw (the caller's column count)


@triton.jit
def intq_x(xrow, pp, kk, km, HP: tl.constexpr, MASKED: tl.constexpr):
    # activation values at (stored) k positions kk; act-order reads x[perm[k]]
    if MASKED:
        if HP:
            xi = tl.load(pp + kk, mask=km, other=0)
            return tl.load(xrow + xi, mask=km, other=0.0).to(tl.float32)
        return tl.load(xrow + kk, mask=km, other=0.0).to(tl.float32)
    if HP:
        return tl.load(xrow + tl.load(pp + kk)).to(tl.float32)
    return tl.load(xrow + kk).to(tl.float32)


@triton.jit
def intq_sz(sp, zp, k0, K, cols, nm, nw, r, HZ: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
            PF: tl.constexpr, BK: tl.constexpr):
    # -> (s fp32, z int32) broadcastable to [R, BN] (R word rows of the tile starting at input k0)
    if GS % BK == 0:
        g = k0 // GS
        s = tl.load(sp + g * nw + cols, mask=nm, other=0.0).to(tl.float32)[None, :]
        if HZ:
            z = tl.load(zp + g * nw + cols, mask=nm, other=0).to(tl.int32)[None, :]
        else:
            z = tl.full([1, cols.shape[0]], 1 << (BITS - 1), tl.int32)
    else:
        kr = k0 + r * PF
        g = kr // GS
        off = g[:, None] * nw + cols[None, :]
        m2 = (kr < K)[:, None] & nm[None, :]
        s = tl.load(sp + off, mask=m2, other=0.0).to(tl.float32)
        if HZ:
            z = tl.load(zp + off, mask=m2, other=0).to(tl.int32)
        else:
            z = tl.full(s.shape, 1 << (BITS - 1), tl.int32)
    return s, z


@triton.jit
def intq_scale(sp, zp, k0, K, cols, nm, nw, r, HZ: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
               PF: tl.constexpr, BK: tl.constexpr):
    # -> (s, z*s) broadcastable to [R, BN] (R word rows of the tile starting at input k0)
    s, z = intq_sz(sp, zp, k0, K, cols, nm, nw, r, HZ, BITS, GS, PF, BK)
    return s, z.to(tl.float32) * s


@triton.jit
def _x_at(xrow, rows, j: tl.constexpr, km, HP: tl.constexpr, MASKED: tl.constexpr):
    # activation j of each word row: rows [R] points at its first stored k (in x, or in perm for
    # act-order, which then gives the x position)
    if HP:
        xi = tl.load(rows + j, mask=km, other=0) if MASKED else tl.load(rows + j)
        x = tl.load(xrow + xi, mask=km, other=0.0) if MASKED else tl.load(xrow + xi)
    else:
        x = tl.load(rows + j, mask=km, other=0.0) if MASKED else tl.load(rows + j)
    return x.to(tl.float32)


@triton.jit
def _x_row_pairs(xrow, pp, kr, K, HP: tl.constexpr, MASKED: tl.constexpr):
    # quant.x_pairs16 of the 8 activations of each word row starting at input kr [R]
    rows = (pp if HP else xrow) + kr.to(tl.int64)
    return x_pairs16(_x_at(xrow, rows, 0, kr < K, HP, MASKED), _x_at(xrow, rows, 1, kr + 1 < K, HP, MASKED),
                     _x_at(xrow, rows, 2, kr + 2 < K, HP, MASKED), _x_at(xrow, rows, 3, kr + 3 < K, HP, MASKED),
                     _x_at(xrow, rows, 4, kr + 4 < K, HP, MASKED), _x_at(xrow, rows, 5, kr + 5 < K, HP, MASKED),
                     _x_at(xrow, rows, 6, kr + 6 < K, HP, MASKED), _x_at(xrow, rows, 7, kr + 7 < K, HP, MASKED))


@triton.jit
def gemv_intq(xrow, qp, sp, zp, pp, col0, nw, K, n_lim, n0, qm, k_lo, k_hi,
              BITS: tl.constexpr, GS: tl.constexpr, HZ: tl.constexpr, HP: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, EVK: tl.constexpr, PDL: tl.constexpr, F16: tl.constexpr):
    rn = n0 + tl.arange(0, BN)
    return gemv_intq_cols(xrow, qp, sp, zp, pp, col0 + rn, rn < n_lim, nw, K, qm, k_lo, k_hi,
                          BITS, GS, HZ, HP, BK, EVK, PDL, F16)


@triton.jit
def _word_rows(qcol, rr, nw, KP, nm):
    """The int4 / intq words of word rows rr [R] at the columns qcol [1, BN] (row stride nw; mask nm
    [BN]; zeros from word row KP on): one step of the GEMV word tiles' prefetch, weights streamed
    evict-first (quant.WEIGHT_EVICT)."""
    return tl.load(qcol + rr[:, None] * nw, mask=(rr < KP)[:, None] & nm[None, :], other=0,
                   eviction_policy=WEIGHT_EVICT)


@triton.jit
def gemv_intq_cols(xrow, qp, sp, zp, pp, cols, nm, nw, K, qm, k_lo, k_hi,
                   BITS: tl.constexpr, GS: tl.constexpr, HZ: tl.constexpr, HP: tl.constexpr,
                   BK: tl.constexpr, EVK: tl.constexpr, PDL: tl.constexpr, F16: tl.constexpr):
    # y at the columns cols [BN] (mask nm; any set, e.g. the gate and the up half of a gate_up
    # weight side by side). Everything stays 2-D in the layout of the [R, BN] word tile (no
    # shared-memory shuffles); the word rows are reduced once at the end. F16 (4-bit codes, 16-bit
    # activations; the caller's choice, where it measured faster): each word in packed fp16 math;
    # else fp32, field f of every word dequantized in turn.
    PF: tl.constexpr = 32 // BITS
    F: tl.constexpr = PF // 2
    R: tl.constexpr = BK // PF
    BN: tl.constexpr = cols.shape[0]
    r = tl.arange(0, R)
    k_hi = tl.minimum(k_hi, K)
    KP = k_hi // PF                 # word rows of this K range (the prefetch stops there)
    ZI: tl.constexpr = 0 if HZ else 1 << (BITS - 1)  # symmetric: the zero goes into the FADD
    qcol = qp + cols[None, :]
    # one tile of prefetch: the next words are in flight while this tile is dequantized
    rr = k_lo // PF + r
    q_nxt = _word_rows(qcol, rr, nw, KP, nm)
    pdl.wait(PDL)   # (down side) the first tile is loaded; x comes from the kernel before
    acc = tl.zeros([R, BN], dtype=tl.float32)
    if F16 and BITS == 4 and xrow.dtype.element_ty != tl.float32:
        # the word's 8 codes in packed fp16 math (quant.int4_word_dot): ~15 instructions per word
        # where the fp32 loop below takes ~33, plus ~45 per word row for its activations. Not
        # gemv_int4_rows with one row: that schedule measured 5-27% slower on asym rows at M = 2-4
        # (session 23, BENCHMARKS; ptxas issues the scale / zero loads late there)
        for k0 in range(k_lo, k_hi, BK):
            q = q_nxt
            rr = k0 // PF + R + r
            q_nxt = _word_rows(qcol, rr, nw, KP, nm)
            xp0, xp1, xp2, xp3, f_out = _x_row_pairs(xrow, pp, k0 + r * PF, K, HP, not EVK)
            s, z = intq_sz(sp, zp, k0, K, cols, nm, nw, r, HZ, BITS, GS, PF, BK)
            zc1, zc16 = zero_pairs16(z)
            part = int4_word_dot(q, tl.broadcast_to(xp0[:, None], q.shape), tl.broadcast_to(xp1[:, None], q.shape),
                                 tl.broadcast_to(xp2[:, None], q.shape), tl.broadcast_to(xp3[:, None], q.shape),
                                 tl.broadcast_to(zc1, q.shape), tl.broadcast_to(zc16, q.shape))
            acc += part * (s * f_out[:, None])
    else:
        for k0 in range(k_lo, k_hi, BK):
            q = q_nxt
            rr = k0 // PF + R + r
            q_nxt = _word_rows(qcol, rr, nw, KP, nm)
            qh = q >> 16
            kr = k0 + r * PF
            # sum_k s (q - z) x = s * (sum_k q x) - z s * (sum_k x): within a word row s and z are
            # constant, so scale and zero are applied once per 32-bit word instead of once per code
            part = tl.zeros([R, BN], dtype=tl.float32)
            xs = tl.zeros([R], dtype=tl.float32)
            for f in tl.static_range(PF):
                # field j of a 16-bit half sits at bits BITS*j; OR-ing exponent 150-BITS*j makes the
                # float 2^(23-BITS*j) + code exactly: one LOP3 + one FADD per code, no I2F.
                # qm (run-time 2^BITS-1) keeps the masks in registers: LOP3 takes one immediate.
                if f < F:
                    b = (q & (qm << (BITS * f))) | ((150 - BITS * f) << 23)
                    v = b.to(tl.float32, bitcast=True) - ((1 << (23 - BITS * f)) + ZI)
                else:
                    b = (qh & (qm << (BITS * (f - F)))) | ((150 - BITS * (f - F)) << 23)
                    v = b.to(tl.float32, bitcast=True) - ((1 << (23 - BITS * (f - F))) + ZI)
                kf = kr + f
                x = intq_x(xrow, pp, kf, kf < K, HP, not EVK)
                part += v * x[:, None]
                if HZ:
                    xs += x
            s, zs = intq_scale(sp, zp, k0, K, cols, nm, nw, r, HZ, BITS, GS, PF, BK)
            if HZ:
                acc += part * s - zs * xs[:, None]
            else:
                acc += part * s
    return tl.sum(acc, axis=0)


@triton.jit
def _row_words(t0, t1, t2, t3, xrow, pp, kr, K, HP: tl.constexpr, MASKED: tl.constexpr):
    # one activation row's packed dots with the unpacked words t0..t3 [R, BN] of the tile whose
    # word rows start at inputs kr [R]: the products summed per word, each word row's scale back
    xp0, xp1, xp2, xp3, f_out = _x_row_pairs(xrow, pp, kr, K, HP, MASKED)
    part = word_dot16(t0, t1, t2, t3, tl.broadcast_to(xp0[:, None], t0.shape), tl.broadcast_to(xp1[:, None], t0.shape),
                      tl.broadcast_to(xp2[:, None], t0.shape), tl.broadcast_to(xp3[:, None], t0.shape))
    return part * f_out[:, None]


@triton.jit
def gemv_int4_rows(x0, x1, x2, x3, qp, sp, zp, pp, cols, nm, nw, K, k_lo, k_hi,
                   MR: tl.constexpr, GS: tl.constexpr, HZ: tl.constexpr, HP: tl.constexpr,
                   BK: tl.constexpr, EVK: tl.constexpr, PDL: tl.constexpr):
    # y [MR, BN] of MR = 2 or 4 activation rows (row pointers x0..x3, all readable; x2 / x3 unused
    # at MR = 2) at the int4 columns cols [BN]: gemv_intq_cols's fp16 word loop with each word
    # loaded and unpacked once for all rows (quant.int4_word_codes), then one packed dot per row
    # (word_dot16). Rows in separate 2-D accumulators: a 3-D [MR, R, BN] tile made Triton shuffle
    # the activations through shared memory every K step (SASS: 20 barriers per step).
    R: tl.constexpr = BK // 8
    r = tl.arange(0, R)
    k_hi = tl.minimum(k_hi, K)
    KP = k_hi // 8
    qcol = qp + cols[None, :]
    rr = k_lo // 8 + r
    q_nxt = _word_rows(qcol, rr, nw, KP, nm)
    pdl.wait(PDL)   # the first tile is loaded; x comes from the kernel before
    acc0 = tl.zeros([R, cols.shape[0]], dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)
    if MR == 4:
        acc2 = tl.zeros_like(acc0)
        acc3 = tl.zeros_like(acc0)
    for k0 in range(k_lo, k_hi, BK):
        q = q_nxt
        rr = k0 // 8 + R + r
        q_nxt = _word_rows(qcol, rr, nw, KP, nm)
        s, z = intq_sz(sp, zp, k0, K, cols, nm, nw, r, HZ, 4, GS, 8, BK)
        zc1, zc16 = zero_pairs16(z)
        t0, t1, t2, t3 = int4_word_codes(q, tl.broadcast_to(zc1, q.shape), tl.broadcast_to(zc16, q.shape))
        kr = k0 + r * 8
        acc0 += _row_words(t0, t1, t2, t3, x0, pp, kr, K, HP, not EVK) * s
        acc1 += _row_words(t0, t1, t2, t3, x1, pp, kr, K, HP, not EVK) * s
        if MR == 4:
            acc2 += _row_words(t0, t1, t2, t3, x2, pp, kr, K, HP, not EVK) * s
            acc3 += _row_words(t0, t1, t2, t3, x3, pp, kr, K, HP, not EVK) * s
    if MR == 4:
        y = rows4(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0))
    else:
        y = rows2(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0))
    return y


@triton.jit
def row_ptrs4(x_ptr, m0, M, stride_xm):
    """Row pointers of the activation rows m0 .. m0 + 3 of a GEMV program of several rows (rows past
    M point at row M - 1: readable, their results are not stored)."""
    return (x_ptr + tl.minimum(m0, M - 1).to(tl.int64) * stride_xm,
            x_ptr + tl.minimum(m0 + 1, M - 1).to(tl.int64) * stride_xm,
            x_ptr + tl.minimum(m0 + 2, M - 1).to(tl.int64) * stride_xm,
            x_ptr + tl.minimum(m0 + 3, M - 1).to(tl.int64) * stride_xm)


@triton.jit
def rows2(y0, y1):
    """Two rows' results [BN] -> [2, BN]."""
    return tl.permute(tl.join(y0, y1), (1, 0))


@triton.jit
def rows4(y0, y1, y2, y3):
    """Four rows' results [BN] -> [4, BN]."""
    y = tl.join(tl.join(y0, y1), tl.join(y2, y3))                     # [BN, b, a]: row 2 a + b
    return tl.reshape(tl.permute(y, (2, 1, 0)), (4, y0.shape[0]))
