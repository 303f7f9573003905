"""int4 GEMV tiles of 1-8 activation rows on the tensor cores (mma.sync m16n8k16), canonical layout.

The fp16 word loop of gemv_tiles spends ~27 instructions per int4 word at batch 1 (packed FMAs, a
scale per word, the activations' packing). Here the tensor cores take the products: per word 3
shifts and 4 LOP3 make the 8 codes 16-bit floats m + q (the exponent of m = 2^7 or 2^10 OR-ed onto
each code, exact), and half of each of two mmas consumes them. The zero is not subtracted per code:
sum_k (q_k - z) x_k = sum_k (m + q_k) x_k - (m + z) sum_k x_k, and the sums of x (per group and
row) come from two more mmas per 32 inputs with all-ones A, shared by the T tiles; the correction
and the scale are applied once per 128 inputs to the fp32 accumulators. The products are summed in
fp32 (no activation scaling: a prototype measured 134 dB against the fp32 reference where the
fp16 word loop has 55); the m sum_k x_k term cancels in fp32, which costs log2(m / |q - z|) bits
there (~4 in bf16, ~7 in fp16). Measured (session 35, H200, with per-code subtracts): 4% faster on
the 235B gate/up launch at 1-8 tokens, slower on its down launch and on the 30B shapes.

Fragment layout (PTX ISA, mma.m16n8k16 .row.col): lane l = 4 g + c of a warp holds A rows g and
g+8 at k (2c, 2c+1 | 2c+8, 2c+9), B column g at the same k, C rows g / g+8 at columns 2c, 2c+1.
A program owns 8T "lo" and 8T "hi" columns (T = 2 or 4; the caller's: gate and up of 8T
intermediate rows, or 16T consecutive rows): lane (g, c) of every warp loads the words of columns
lo0 + Tg + t and hi0 + Tg + t (t < T, one 8- or 16-byte load each) in word row 4b + c of each
32-input block b, so tile t's A rows g / g+8 are its lo / hi column. The k order inside an mma is free as long as A and
B agree: logical k (2c, 2c+1) and (2c+8, 2c+9) of lane c are the code pairs (j, j+4), j = 0, 1
of its word (the second mma: j = 2, 3), i.e. inputs 32b + 8c + (j, j+4). B column r holds x row r at
those inputs (lanes g = r load it; rows past the last pass zeros), so C column r is row r's
result: lanes (g, c) hold rows 2c and 2c + 1 (c0, c1 lo; c2, c3 hi). One row (the MoE's pairs)
keeps C column 0 only (lanes c = 0, c0 and c2); up to 8 rows (dense decode) cost the same mmas
and word loads, plus their x loads and two more accumulators. The warps split K by 128-input
groups; the sum over warps goes through shared memory once, at the end.

The asm relies on Triton giving the [32 NW, T] tiles the layout of their loads (sizePerThread
[1, T], threadsPerWarp [32, 1]: row i in lane i % 32 of warp i // 32), as the TTGIR of triton 3.6
shows for sm_90; another layout would move the fragments between lanes and fail the GPU tests.

The Triton interpreter runs no PTX: there the two mmas are computed from what each lane loaded
(the same words, columns, groups, scales and x rows) and handed back in the C fragment layout.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import pdl
from .gemv_tiles import rows2
from .quant import _PTX, WEIGHT_EVICT


def _mma_asm(magic: int, kind: str) -> str:
    # $0-$3 C out, $4-$7 C in, $8 lo word, $9 hi word, $10-$13 the x pairs (j, j+4) for j = 0..3.
    # A = magic + code (the zero is taken off per group). Early-clobber outputs: the second mma
    # reads $8-$13.
    lop = f"0x000F000F, {hex(magic * 0x10001)}, 0xea"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32"
    return ("{ .reg .b32 a0, a1, a2, a3, t, u; "
            f"lop3.b32 a0, $8, {lop}; lop3.b32 a1, $9, {lop}; shr.u32 t, $8, 4; shr.u32 u, $9, 4; "
            f"lop3.b32 a2, t, {lop}; lop3.b32 a3, u, {lop}; "
            f"{mma} {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, {{$10, $11}}, {{$4, $5, $6, $7}}; "
            f"shr.u32 t, $8, 8; shr.u32 u, $9, 8; lop3.b32 a0, t, {lop}; lop3.b32 a1, u, {lop}; "
            f"shr.u32 t, $8, 12; shr.u32 u, $9, 12; lop3.b32 a2, t, {lop}; lop3.b32 a3, u, {lop}; "
            f"{mma} {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, {{$12, $13}}, {{$0, $1, $2, $3}}; }}")


def _xsum_asm(one: int, kind: str) -> str:
    # $0 / $1: C columns 2c / 2c + 1 of the all-ones mmas (every A row the same: x row sums over the
    # block's 32 inputs, added to $2 / $3), $4-$7 the x pairs as in _mma_asm
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32"
    o = hex(one * 0x10001)
    return ("{ .reg .b32 a; .reg .f32 d2, d3; "
            f"mov.b32 a, {o}; "
            f"{mma} {{$0, $1, d2, d3}}, {{a, a, a, a}}, {{$4, $5}}, {{$2, $3, $2, $3}}; "
            f"{mma} {{$0, $1, d2, d3}}, {{a, a, a, a}}, {{$6, $7}}, {{$0, $1, d2, d3}}; }}")


# 16-bit float of 2^7 (bf16) / 2^10 (fp16) with a 4-bit code OR-ed into its mantissa = magic + code
MAGIC_BF16 = tl.constexpr(0x4300)
MAGIC_F16 = tl.constexpr(0x6400)
MF_BF16 = tl.constexpr(128.0)      # their values, m
MF_F16 = tl.constexpr(1024.0)
_MMA_BF16 = tl.constexpr(_mma_asm(MAGIC_BF16.value, "bf16"))
_MMA_F16 = tl.constexpr(_mma_asm(MAGIC_F16.value, "f16"))
_XSUM_BF16 = tl.constexpr(_xsum_asm(0x3F80, "bf16"))     # 1.0
_XSUM_F16 = tl.constexpr(_xsum_asm(0x3C00, "f16"))
# x words (x_2m, x_2m+1), m = 0..3, of one lane's 8 inputs -> the pairs (x_j, x_j+4), j = 0..3
_PAIRS = tl.constexpr("{ prmt.b32 $0, $4, $6, 0x5410; prmt.b32 $1, $4, $6, 0x7632; "
                      "prmt.b32 $2, $5, $7, 0x5410; prmt.b32 $3, $5, $7, 0x7632; }")


@triton.jit
def _f16_half(v, shift: tl.constexpr, BF16: tl.constexpr):
    # (interpreter) the 16-bit float in bits shift.. of the int32 v, as fp32
    h = ((v >> shift) & 0xFFFF).to(tl.uint16)
    if BF16:
        return h.to(tl.bfloat16, bitcast=True).to(tl.float32)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _lane_c(cc, NW: tl.constexpr):
    # (interpreter) C [NW, 8 (A row g), 8 (B column r), T] -> the values lane (g, c) holds at
    # columns r = 2c and 2c + 1, each [L, T]
    T: tl.constexpr = cc.shape[3]
    h0, h1 = tl.split(tl.permute(tl.reshape(cc, [NW, 8, 4, 2, T]), (0, 1, 2, 4, 3)))
    return tl.reshape(h0, [32 * NW, T]), tl.reshape(h1, [32 * NW, T])


@triton.jit
def _emulated_mmas(a0, a1, a2, a3, lo, hi, xw0, xw1, xw2, xw3, NW: tl.constexpr, BF16: tl.constexpr):
    """(interpreter) the two mmas of one block, lane by lane: A row g (lo) / g + 8 (hi) is
    magic + the codes of the words the 4 lanes (g, c) loaded, B column r the x the 4 lanes (r, c)
    loaded, each lane c holding 8 inputs; C[i, r] = sum over c of their dots, and lane (g, c) adds
    C[g, 2c], C[g, 2c + 1], C[g + 8, 2c], C[g + 8, 2c + 1] to a0..a3 [L, T]."""
    MF: tl.constexpr = MF_BF16 if BF16 else MF_F16
    T: tl.constexpr = lo.shape[1]
    clo = tl.zeros([NW, 8, 8, T], tl.float32)                                   # [w, g, r, t]
    chi = tl.zeros([NW, 8, 8, T], tl.float32)
    for m in tl.static_range(4):
        xw = xw0 if m == 0 else (xw1 if m == 1 else (xw2 if m == 2 else xw3))
        for h in tl.static_range(2):
            j: tl.constexpr = 2 * m + h
            xv = tl.reshape(_f16_half(xw, 16 * h, BF16), [NW, 1, 8, 4, 1])     # [w, -, r, c, -]
            qlo = ((lo >> (4 * j)) & 15).to(tl.float32) + MF
            qhi = ((hi >> (4 * j)) & 15).to(tl.float32) + MF
            clo += tl.sum(tl.reshape(qlo, [NW, 8, 1, 4, T]) * xv, axis=3)
            chi += tl.sum(tl.reshape(qhi, [NW, 8, 1, 4, T]) * xv, axis=3)
    d0, d1 = _lane_c(clo, NW)
    d2, d3 = _lane_c(chi, NW)
    return a0 + d0, a1 + d1, a2 + d2, a3 + d3


@triton.jit
def _emulated_xsum(s0, s1, xw0, xw1, xw2, xw3, NW: tl.constexpr, BF16: tl.constexpr):
    # (interpreter) the all-ones mmas: lane (g, c) adds the sums of x rows 2c / 2c + 1 over the
    # block (what lanes (r, 0..3) loaded) to s0 / s1 [L]
    xs = tl.zeros([NW, 8, 4], tl.float32)                                       # [w, r, c]
    for m in tl.static_range(4):
        xw = xw0 if m == 0 else (xw1 if m == 1 else (xw2 if m == 2 else xw3))
        xs += tl.reshape(_f16_half(xw, 0, BF16) + _f16_half(xw, 16, BF16), [NW, 8, 4])
    rs = tl.broadcast_to(tl.reshape(tl.sum(xs, axis=2), [NW, 1, 8, 1]), [NW, 8, 8, 1])
    d0, d1 = _lane_c(rs, NW)
    return s0 + tl.reshape(d0, [32 * NW]), s1 + tl.reshape(d1, [32 * NW])


@triton.jit
def _block(a0, a1, a2, a3, s0, s1, lo, hi, xw, NW: tl.constexpr, BF16: tl.constexpr):
    # one 32-input block into the accumulators a0..a3 (C registers per lane and tile) [L, T], and
    # the x row sums of its inputs into s0 / s1 (C columns 2c / 2c + 1) [L]
    L: tl.constexpr = 32 * NW
    T: tl.constexpr = lo.shape[1]
    xw0, xw1, xw2, xw3 = xw
    if _PTX:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(_PAIRS, "=r,=r,=r,=r,r,r,r,r", [xw0, xw1, xw2, xw3],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        s0, s1 = tl.inline_asm_elementwise(_XSUM_BF16 if BF16 else _XSUM_F16, "=&f,=&f,f,f,r,r,r,r",
                                           [s0, s1, p0, p1, p2, p3], dtype=(tl.float32, tl.float32),
                                           is_pure=True, pack=1)
        a0, a1, a2, a3 = tl.inline_asm_elementwise(
            _MMA_BF16 if BF16 else _MMA_F16, "=&f,=&f,=&f,=&f,f,f,f,f,r,r,r,r,r,r",
            [a0, a1, a2, a3, lo, hi, tl.broadcast_to(p0[:, None], [L, T]),
             tl.broadcast_to(p1[:, None], [L, T]), tl.broadcast_to(p2[:, None], [L, T]),
             tl.broadcast_to(p3[:, None], [L, T])],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        a0, a1, a2, a3 = _emulated_mmas(a0, a1, a2, a3, lo, hi, xw0, xw1, xw2, xw3, NW, BF16)
        s0, s1 = _emulated_xsum(s0, s1, xw0, xw1, xw2, xw3, NW, BF16)
    return a0, a1, a2, a3, s0, s1


@triton.jit
def _words(qp, kr, nw, KP, cols, cm):
    # words of word rows kr [L, 1] (those below KP [L, 1]) at the columns cols [L, T] (mask cm).
    # The T columns of a lane are one aligned vector (nw, lo0, hi0 multiples of T): said
    # explicitly, so that the load, and with it the mmas, get the layout the asm needs whatever
    # Triton knows of nw's divisibility (without it a 72-column weight got threadsPerWarp [16, 2])
    T: tl.constexpr = cols.shape[1]
    off = tl.max_contiguous(tl.multiple_of(kr * nw + cols, [1, T]), [1, T])
    return tl.load(qp + off, mask=(kr < KP) & cm, other=0, eviction_policy=WEIGHT_EVICT)


@triton.jit
def _group_words(qp, grp, c, nw, KP, clo, chi, mlo, mhi):
    # the lo / hi words of the 4 blocks of 128-input group grp [L]: word rows 16 grp + 4 j + c,
    # those below KP [L]
    kr = (grp * 16 + c)[:, None]
    KP = KP[:, None]
    return (_words(qp, kr, nw, KP, clo, mlo), _words(qp, kr, nw, KP, chi, mhi),
            _words(qp, kr + 4, nw, KP, clo, mlo), _words(qp, kr + 4, nw, KP, chi, mhi),
            _words(qp, kr + 8, nw, KP, clo, mlo), _words(qp, kr + 8, nw, KP, chi, mhi),
            _words(qp, kr + 12, nw, KP, clo, mlo), _words(qp, kr + 12, nw, KP, chi, mhi))


@triton.jit
def _xwords(xw, kr, xm):
    # the 4 words (2 inputs each) of x at inputs 8 kr .. 8 kr + 7, [L]
    # one 16-byte load per lane where the row's alignment allows (a row's 4 lanes c then read 64
    # contiguous bytes, 2 whole sectors, instead of 4 x 4 bytes each touching both); xw: [L, 1]
    off = (kr * 4)[:, None] + tl.arange(0, 4)[None, :]
    off = tl.max_contiguous(tl.multiple_of(off, [1, 4]), [1, 4])
    v = tl.load(xw + off, mask=xm[:, None], other=0)     # [L, 4]
    a, b = tl.split(tl.reshape(v, [v.shape[0], 2, 2]))     # words (0, 2), (1, 3)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def _group_x(xw, grp, c, KP, xm):
    kr = grp * 16 + c
    return (_xwords(xw, kr, xm & (kr < KP)), _xwords(xw, kr + 4, xm & (kr + 4 < KP)),
            _xwords(xw, kr + 8, xm & (kr + 8 < KP)), _xwords(xw, kr + 12, xm & (kr + 12 < KP)))


@triton.jit
def _group_sz(sp, zp, grp, nw, clo, chi, mlo, mhi, ok, HZ: tl.constexpr, GS: tl.constexpr, MF: tl.constexpr):
    # scales and m + z (fp32; m = MF, the magic's value) of group grp's lo / hi columns [L, T]
    srow = ((grp * 128) // GS)[:, None] * nw
    m = ok[:, None]
    slo = tl.load(sp + srow + clo, mask=m & mlo, other=0.0).to(tl.float32)
    shi = tl.load(sp + srow + chi, mask=m & mhi, other=0.0).to(tl.float32)
    if HZ:
        zlo = tl.load(zp + srow + clo, mask=m & mlo, other=0).to(tl.float32) + MF
        zhi = tl.load(zp + srow + chi, mask=m & mhi, other=0).to(tl.float32) + MF
    else:
        zlo = tl.full(slo.shape, MF + 8.0, tl.float32)
        zhi = zlo
    return slo, shi, zlo, zhi


@triton.jit
def _lane_cols(v, NW: tl.constexpr):
    # [L, T] per lane -> [8 T]: summed over the warps, lanes c = 0 kept, element T g + t
    T: tl.constexpr = v.shape[1]
    # lane c = 0 first (shuffles inside the warp), then the warps' sum: a quarter of the values
    # cross shared memory
    c = tl.arange(0, 4)[None, None, :, None]
    s = tl.sum(tl.where(c == 0, tl.reshape(v, [NW, 8, 4, T]), 0.0), axis=2)   # [w, g, t]
    return tl.reshape(tl.sum(s, axis=0), [8 * T])


@triton.jit
def _lane_rows(v0, v1, NW: tl.constexpr):
    # C columns 2c (v0) and 2c + 1 (v1) per lane, [L, T] -> [8, 8 T] summed over the warps:
    # row r = x row r (lanes c = r // 2), element T g + t
    T: tl.constexpr = v0.shape[1]
    s0 = tl.reshape(tl.permute(tl.sum(tl.reshape(v0, [NW, 8, 4, T]), axis=0), (1, 0, 2)), [4, 8 * T])
    s1 = tl.reshape(tl.permute(tl.sum(tl.reshape(v1, [NW, 8, 4, T]), axis=0), (1, 0, 2)), [4, 8 * T])
    return tl.reshape(tl.permute(tl.join(s0, s1), (0, 2, 1)), [8, 8 * T])


@triton.jit
def lane_rows(NW: tl.constexpr):
    """The x row each lane of an NW-warp tile loads (its B column), [32 NW]: lane (g, c), row g.
    A caller gathering its 8 rows (XL) gives each lane that row's pointer."""
    return (tl.arange(0, 32 * NW) % 32) // 4


@triton.jit
def gemv_int4_mma(xrow, qp, sp, zp, lo0, hi0, lo_lim, hi_lim, nw, K, k_lo, k_hi,
                  GS: tl.constexpr, HZ: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, PDL: tl.constexpr,
                  XR: tl.constexpr, x_stride, x_rows, XL: tl.constexpr = False):
    """y (fp32) of XR = 1 or 8 activation rows (xrow: the first, K contiguous bf16 / fp16, rows
    x_stride elements apart, the first min(x_rows, 8) of them valid; XR 1 reads one row; XL, with
    XR 8: xrow is one pointer per lane [32 NW], the row lane_rows(NW) names) at the int4 columns lo0 .. lo0 + 8T - 1 and
    hi0 .. hi0 + 8T - 1 (T = 2 or 4 tiles per lane; valid below lo_lim / hi_lim) over the inputs
    [k_lo, k_hi), k_lo a multiple of 128. Weights: qweight qp [K/8, nw], scales sp / zeros zp
    [K/GS, nw] (GS a multiple of 128). The kernel runs NW warps. PDL: wait for the kernel before
    (which writes x) after the first weights are requested. Row r of x is B column r of the mmas
    (lanes g = r load it): 8 rows cost what one does but for their x loads and accumulators.
    -> XR 1: y [16T], XR 8: y [8, 16T]; columns: the 8T lo ones, then the 8T hi ones."""
    BF16: tl.constexpr = xrow.dtype.element_ty == tl.bfloat16
    MF: tl.constexpr = MF_BF16 if BF16 else MF_F16
    L: tl.constexpr = 32 * NW
    i = tl.arange(0, L)
    w = i // 32
    g = (i % 32) // 4
    c = i % 4
    t = tl.arange(0, T)[None, :]
    clo = (lo0 + T * g)[:, None] + t                     # [L, T]
    chi = (hi0 + T * g)[:, None] + t
    mlo = clo < lo_lim
    mhi = chi < hi_lim
    k_hi = tl.minimum(k_hi, K)
    KP = k_hi // 8                                       # word rows of the range
    # lane (g, c) loads x row g (B column g); x_stride (or K, XL) is even, rows stay 4-byte aligned
    xw = xrow.to(tl.pointer_type(tl.int32), bitcast=True)
    if XR > 1 and not XL:
        xw += g * (x_stride // 2)
    xm = g < (x_rows if XR > 1 else 1)
    xw = (xw + 0 * i)[:, None]          # [L, 1] (per lane: its x row)
    ng = tl.cdiv(k_hi - k_lo, 128)
    gpw = tl.cdiv(ng, NW)                                # groups per warp
    grp0 = k_lo // 128 + w * gpw
    gend = k_lo // 128 + tl.minimum((w + 1) * gpw, ng)   # [L]: this warp's groups [grp0, gend)
    # the first group's words and scales before the wait (down side: x comes from the kernel before)
    q = _group_words(qp, grp0, c, nw, tl.where(grp0 < gend, KP, 0), clo, chi, mlo, mhi)
    sz = _group_sz(sp, zp, grp0, nw, clo, chi, mlo, mhi, grp0 < gend, HZ, GS, MF)
    pdl.wait(PDL)
    tot0 = tl.zeros([L, T], tl.float32)                  # C column 2c of the lo rows
    tot1 = tl.zeros([L, T], tl.float32)                  # 2c + 1 (XR 8 only)
    tot2 = tl.zeros([L, T], tl.float32)                  # hi rows
    tot3 = tl.zeros([L, T], tl.float32)
    for gi in range(0, gpw):
        cq, csz = q, sz
        # x of this group (few bytes, in L2; not prefetched: registers), then the next group's
        # weights and scales in flight while this one is multiplied
        cx = _group_x(xw, grp0 + gi, c, KP, xm)
        grp = grp0 + gi + 1
        nxt = grp < gend
        q = _group_words(qp, grp, c, nw, tl.where(nxt, KP, 0), clo, chi, mlo, mhi)
        sz = _group_sz(sp, zp, grp, nw, clo, chi, mlo, mhi, nxt, HZ, GS, MF)
        slo, shi, zlo, zhi = csz
        a0 = tl.zeros([L, T], tl.float32)
        a1 = tl.zeros([L, T], tl.float32)
        a2 = tl.zeros([L, T], tl.float32)
        a3 = tl.zeros([L, T], tl.float32)
        s0 = tl.zeros([L], tl.float32)                   # sums of x rows 2c / 2c + 1 over the group
        s1 = tl.zeros([L], tl.float32)
        a0, a1, a2, a3, s0, s1 = _block(a0, a1, a2, a3, s0, s1, cq[0], cq[1], cx[0], NW, BF16)
        a0, a1, a2, a3, s0, s1 = _block(a0, a1, a2, a3, s0, s1, cq[2], cq[3], cx[1], NW, BF16)
        a0, a1, a2, a3, s0, s1 = _block(a0, a1, a2, a3, s0, s1, cq[4], cq[5], cx[2], NW, BF16)
        a0, a1, a2, a3, s0, s1 = _block(a0, a1, a2, a3, s0, s1, cq[6], cq[7], cx[3], NW, BF16)
        # (m + q) x summed -> (q - z) x: minus (m + z) sum x, per row and group
        tot0 += (a0 - zlo * s0[:, None]) * slo
        tot2 += (a2 - zhi * s0[:, None]) * shi
        if XR > 1:
            tot1 += (a1 - zlo * s1[:, None]) * slo
            tot3 += (a3 - zhi * s1[:, None]) * shi
    if XR > 1:     # [8, 8T] each -> [8, 16T]
        y = tl.reshape(tl.permute(tl.join(_lane_rows(tot0, tot1, NW), _lane_rows(tot2, tot3, NW)), (0, 2, 1)),
                       (8, 16 * T))
    else:
        y = tl.reshape(rows2(_lane_cols(tot0, NW), _lane_cols(tot2, NW)), (16 * T,))
    return y
