"""Pieces shared by the linear kernels (intq.py, fp8.py, int8.py).

* Dynamic activation quantization, as the kernels do it in registers (fused, per K tile),
  written once in torch as the readable spec: `fp8_act_quant_reference`, `int8_act_quant_reference`;
  `act_quant`, one launch that quantizes each row once for kernels that read it many times
  (the fused MoE: every N tile of every expert reads its token's row; the dense INT8 W8A8 GEMM).
* The split-K finish: every K split stores its fp32 partial [M, N] into a workspace sized from
  shapes only (`torch.empty`, no memset); the last split to arrive at an output tile (atomic
  counter) sums the partials in fixed order (deterministic) and writes x.dtype. The counters are
  reset by that last program, so one zeroed int32 buffer per (device, stream) serves every call
  and CUDA-graph replay without a memset node.
* `int4_pair` / `int4_field_dots` / `x_tile`: two int4 fields of a word to 16-bit floats with one
  LOP3 + one packed subtract, the per-field dots of a one-group K tile (also transposed, with the
  codes as the dot's A operand), and the activation tile they take, for the dot paths of the int4
  kernels (intq.py, moe_triton.py); `int4_swap_tiles`: the transposed tile loop both run.
* The fp8 GEMVs' packed-fp16 word math: `fp8_words_dot16` (16 e4m3 weight codes, as 4 words,
  against 8 fp16 activation pairs), `fp8_tile_dot16` (a word tile's groups of 16), `e4m3_f16x2`
  (4 codes of a word -> 2 fp16 pairs, / 512 for activation codes), each with a plain-Triton twin
  for the interpreter; `dp4a` (4 int8 products per instruction) for the int8 W8A8 word loops.
* The int4 GEMVs' packed-fp16 word math: `int4_word_codes` (a word's 8 codes minus the zero as 4
  fp16 pairs), `word_dot16` (their dot with 4 activation pairs from `x_pairs16`), `int4_word_dot`
  (both), each with a plain-Triton twin for the interpreter.
* `check` helpers that raise the typed errors of mixprec/errors.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from . import pdl
from .ints import cdiv, next_power_of_2

EPS = 1e-10          # amax clamp: an all-zero slice would otherwise give 0/0
FP8_MAX = 448.0      # float8_e4m3fn
INT8_MAX = 127.0     # symmetric int8 activations use [-127, 127]
FP8_ACT_GROUP = 128  # W8A8 fp8: one activation scale per token per 128 inputs
EPS_C = tl.constexpr(EPS)
FP8_MAX_C = tl.constexpr(FP8_MAX)
INT8_MAX_C = tl.constexpr(INT8_MAX)
RNE_C = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + c) - c rounds fp32 v to the nearest even integer
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------
# activation quantization spec (pure torch)

def fp8_act_quant_reference(x: Tensor, block: int = FP8_ACT_GROUP) -> tuple[Tensor, Tensor]:
    """x: [..., K] -> xq [..., K] float8_e4m3fn, a [..., ceil(K/block)] fp32; per token, per K slice:
    a = max(amax, EPS) / 448, xq = x / a rounded to the nearest e4m3 (ties to even), both divisions
    exact, as act_quant does (the codes the MoE and the dense GEMM from fp8.PRE_QUANT_M rows read).
    The fp8 GEMV and the GEMM below that quantize in registers with the GPU's fast fp32 division,
    which can differ in a scale's last bit (and so flip a rare code)."""
    *lead, K = x.shape
    kb = cdiv(K, block)
    xf = torch.nn.functional.pad(x.float(), (0, kb * block - K)).view(*lead, kb, block)
    a = div_exact(xf.abs().amax(dim=-1).clamp_min(EPS), FP8_MAX)
    xq = (xf / a[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq.view(*lead, kb * block)[..., :K], a


def fp8_act_reference(x: Tensor, block: int = FP8_ACT_GROUP) -> Tensor:
    """x [..., K] as the W8A8 fp8 kernels multiply it: quantized per token per slice, then
    dequantized (fp32)."""
    xq, a = fp8_act_quant_reference(x, block)
    return xq.float() * a.repeat_interleave(block, dim=-1)[..., :x.shape[-1]]


def int8_act_quant_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: [..., K] -> xq [..., K] int8 in [-127, 127], sx [..., 1] fp32; per token:
    sx = max(amax, EPS) / 127, xq = x / sx rounded half to even (as the kernels, act_quant and the
    fused MoE's reference do; exact divisions)."""
    xf = x.float()
    sx = div_exact(xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS), INT8_MAX)
    xq = torch.round(xf / sx).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return xq, sx


def div_exact(t: Tensor, c: float) -> Tensor:
    """Correctly rounded t / c, as the kernels divide (div_rn): PyTorch's CUDA tensor / scalar
    multiplies by the reciprocal, which can differ in the last bit."""
    return t / torch.full_like(t, c)


@triton.jit
def round_e4m3(v):
    """v: fp32 with |v| <= 448 -> v rounded to the e4m3 grid (nearest, ties to even), still fp32,
    so the cast to float8e4nv that follows is exact. Adding 1.5 * 2^(e+20) makes the fp32 ulp
    equal the e4m3 step 2^(e-3) at v's exponent e (>= -6: subnormal step 2^-9). Doing this
    in fp32 also sidesteps the Triton CPU interpreter's cast, which drops mantissa carries."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    c = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (v + c) - c


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, NS,
                      I8: tl.constexpr, F8: tl.constexpr, KB: tl.constexpr, PDL: tl.constexpr = False):
    """W8A8 activations, quantized once per row here instead of in every program that reads the
    row (a GEMV reads it once per N tile). Row r of x [R, K] ->
    q [R, 2, K] bytes: plane 0 int8 codes (I8), plane 1 e4m3 codes (F8);
    s [R, NS] fp32: s[r, 0] the int8 scale max(amax, EPS) / 127 (per token), s[r, 1 + j] the
    e4m3 scale max(amax_j, EPS) / 448 of the 128 inputs of slice j. Divisions are exact
    (div_rn) and round half to even, as the references (int8_act_quant_reference,
    fp8_act_quant_reference) do."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    r = tl.program_id(0).to(tl.int64)
    G: tl.constexpr = KB // 128
    k = tl.arange(0, G)[:, None] * 128 + tl.arange(0, 128)[None, :]
    km = k < K
    x = tl.load(x_ptr + r * K + k, mask=km, other=0.0).to(tl.float32)      # [G, 128]: the whole row
    amax = tl.max(tl.abs(x), axis=1)                                        # [G]
    qrow = q_ptr + r * 2 * K
    srow = s_ptr + r * NS
    if I8:
        a = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), EPS_C), INT8_MAX_C)
        c = tl.minimum(tl.maximum((tl.math.div_rn(x, a) + RNE_C) - RNE_C, -INT8_MAX_C), INT8_MAX_C)
        tl.store(qrow + k, c.to(tl.int8).to(tl.uint8, bitcast=True), mask=km)
        tl.store(srow, a)
    if F8:
        a8 = tl.math.div_rn(tl.maximum(amax, EPS_C), FP8_MAX_C)      # [G]
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, a8[:, None]), -FP8_MAX_C), FP8_MAX_C)
        c8 = round_e4m3(v).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(qrow + K + k, c8, mask=km)
        g = tl.arange(0, G)
        tl.store(srow + 1 + g, a8, mask=g * 128 < K)


def act_quant(v: Tensor, i8: bool, f8: bool) -> tuple[Tensor, Tensor, int]:
    """W8A8 activation codes of v [R, K] (one launch), for kernels that read a row many times:
    -> (codes [R, 2, K] uint8: int8 plane, e4m3 plane; scales [R, 1 + ceil(K/128)] fp32: the
    int8 scale of the row, then the e4m3 scale of each 128-input slice; the scales' row stride).
    i8 / f8: which planes to fill. With neither, nothing is launched and v stands in for both."""
    if not (i8 or f8):
        return v, v, 0
    v = v.contiguous()
    R, K = v.shape
    ns = 1 + cdiv(K, FP8_ACT_GROUP)
    q = torch.empty(R, 2, K, dtype=torch.uint8, device=v.device)
    qs = torch.empty(R, ns, dtype=torch.float32, device=v.device)
    if R:
        kb = next_power_of_2(cdiv(K, FP8_ACT_GROUP)) * FP8_ACT_GROUP
        _act_quant_kernel[(R,)](v, q, qs, K, ns, I8=i8, F8=f8, KB=kb, num_warps=4 if kb <= 2048 else 8,
                                **pdl.launch_kw(v))
    return q, qs, ns


def act_codes(v: Tensor, fmt: str) -> tuple[Tensor, Tensor, int]:
    """One plane of act_quant for the dense W8A8 GEMMs: v [R, K] -> (codes [R, K] (row stride 2K),
    scales, the scales' row stride): fmt "int8": int8 codes, scales [R] (per token); "fp8": e4m3
    codes, scales [R, ceil(K/128)] (per 128-input slice)."""
    q, qs, ns = act_quant(v, fmt == "int8", fmt == "fp8")
    if fmt == "int8":
        return q.view(torch.int8)[:, 0], qs[:, 0], ns
    return q.view(torch.float8_e4m3fn)[:, 1], qs[:, 1:], ns


# the GPU unpacks int4 pairs with one LOP3 and one packed subtract (inline PTX, sm_90 bf16x2);
# the CPU interpreter, which cannot run PTX, takes the same arithmetic in plain Triton ops
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
# L2 policy of the GEMVs' weight streams (words_at, the int4 word tiles): a decode step streams each
# layer's weights through L2 once; "evict_first" keeps the kernels' code and small tensors there
# (H100, 16-layer 30B decode, two runs each: int4 experts + fp8 attention batch 1 / 2 / 8 +0.8 /
# +0.6 / +1.0%, fp8 batch 1 +0.5%; runtime/session25_weight_evict_first_ab_h100.log).
# MIXPREC_WEIGHT_EVICT= (empty) turns it off.
WEIGHT_EVICT = tl.constexpr(os.environ.get("MIXPREC_WEIGHT_EVICT", "evict_first"))


@triton.jit
def int4_pair(qs, zb):
    """qs: [R, BN] int32 words shifted right by 4j; zb: [1, BN] (or scalar) 16-bit float 2^m + z,
    with m = 7 (bf16) / 10 (fp16), the dtype of the result -> (code j - z, code j+4 - z) [R, BN]:
    OR-ing the exponent of 2^m onto a 4-bit field gives the 16-bit float 2^m + q exactly, for the
    two 16-bit halves of the word at once (fields j and j+4); one packed subtract removes 2^m + z."""
    if _PTX:
        if zb.dtype == tl.bfloat16:
            asm: tl.constexpr = ("{ .reg .b32 t, c; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xea; "
                                 "mov.b32 c, {$3, $3}; sub.rn.bf16x2 t, t, c; mov.b32 {$0, $1}, t; }")
        else:
            asm: tl.constexpr = ("{ .reg .b32 t, c; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xea; "
                                 "mov.b32 c, {$3, $3}; sub.rn.f16x2 t, t, c; mov.b32 {$0, $1}, t; }")
        zz = tl.broadcast_to(zb, qs.shape)
        return tl.inline_asm_elementwise(asm, "=h,=h,r,h", [qs, zz], dtype=(zb.dtype, zb.dtype),
                                         is_pure=True, pack=1)
    else:
        zf = zb.to(tl.float32) - (128.0 if zb.dtype == tl.bfloat16 else 1024.0)
        lo = ((qs & 15).to(tl.float32) - zf).to(zb.dtype)
        hi = (((qs >> 16) & 15).to(tl.float32) - zf).to(zb.dtype)
        return lo, hi


# int4_word_dot: the 8 codes of a 32-bit word against 8 activations in packed fp16 arithmetic.
# Field pairs (j, j+4) share one 32-bit register once masked: fields 0 / 4 and 2 / 6 (after >> 8)
# become 2^10 + q, fields 1 / 5 and 3 / 7 (at bit 4 of their half) 2^10 + 16 q, so the x of those
# two pairs come divided by 16 (exact). Per word: 1 SHF, 4 LOP3, 4 HSUB2 (code - zero, exact:
# int4_word_codes), then 4 HFMA2 (4 products per half in fp16), one HADD2 of the halves and one
# convert to fp32 (word_dot16): 15 instructions for 8 codes where the fp32 loop takes ~33; with
# several activation rows the codes are unpacked once and only word_dot16 repeats per row. No
# overflow: x_pairs16 scales x to |x| < 512 and |q - z| <= 15, so the 8 products sum to at most
# 8 * 15 * 512 = 61440 < 65504.
_WORD_CODES_F16 = tl.constexpr(
    "{ .reg .b32 q8; shr.u32 q8, $4, 8; "
    "lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xea; lop3.b32 $1, $4, 0x00F000F0, 0x64006400, 0xea; "
    "lop3.b32 $2, q8, 0x000F000F, 0x64006400, 0xea; lop3.b32 $3, q8, 0x00F000F0, 0x64006400, 0xea; "
    "sub.rn.f16x2 $0, $0, $5; sub.rn.f16x2 $1, $1, $6; sub.rn.f16x2 $2, $2, $5; sub.rn.f16x2 $3, $3, $6; }")
_WORD_DOT_F16 = tl.constexpr(
    "{ .reg .b32 a; .reg .b16 lo, hi; "
    "mul.rn.f16x2 a, $1, $5; fma.rn.f16x2 a, $2, $6, a; fma.rn.f16x2 a, $3, $7, a; fma.rn.f16x2 a, $4, $8, a; "
    "mov.b32 {lo, hi}, a; add.rn.f16 lo, lo, hi; cvt.f32.f16 $0, lo; }")


@triton.jit
def _f16_lo(p):
    return (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_hi(p):
    return ((p >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def int4_word_codes(q, zc1, zc16):
    """q [..] int32 words (code j at bits 4j); zc1 / zc16 (same shape): fp16 pairs of 2^10 + z and
    2^10 + 16 z (zero_pairs16) -> 4 int32 fp16 pairs (q_j - z, q_j+4 - z) for j = 0..3, those of
    j = 1, 3 times 16 (all exact)."""
    if _PTX:
        return tl.inline_asm_elementwise(_WORD_CODES_F16, "=r,=r,=r,=r,r,r,r", [q, zc1, zc16],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:   # the interpreter: the same values, packed by pack16's plain-Triton branch
        z = ((zc1 & 0xFFFF) - 0x6400).to(tl.float32)
        t0 = pack16((q & 15).to(tl.float32) - z, ((q >> 16) & 15).to(tl.float32) - z, 1.0)
        t1 = pack16(((q >> 4) & 15).to(tl.float32) - z, ((q >> 20) & 15).to(tl.float32) - z, 16.0)
        t2 = pack16(((q >> 8) & 15).to(tl.float32) - z, ((q >> 24) & 15).to(tl.float32) - z, 1.0)
        t3 = pack16(((q >> 12) & 15).to(tl.float32) - z, ((q >> 28) & 15).to(tl.float32) - z, 16.0)
        return t0, t1, t2, t3


@triton.jit
def word_dot16(t0, t1, t2, t3, x0, x1, x2, x3):
    """sum over the 8 fp16 products of int4_word_codes' pairs t0..t3 and the activation pairs
    x0..x3 (x_pairs16), as fp32 (the products and their sum in fp16 on the GPU)."""
    if _PTX:
        return tl.inline_asm_elementwise(_WORD_DOT_F16, "=f,r,r,r,r,r,r,r,r", [t0, t1, t2, t3, x0, x1, x2, x3],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:   # the interpreter: the same sum in fp32
        part = _f16_lo(t0) * _f16_lo(x0) + _f16_hi(t0) * _f16_hi(x0) + _f16_lo(t1) * _f16_lo(x1)
        part += _f16_hi(t1) * _f16_hi(x1) + _f16_lo(t2) * _f16_lo(x2) + _f16_hi(t2) * _f16_hi(x2)
        return part + _f16_lo(t3) * _f16_lo(x3) + _f16_hi(t3) * _f16_hi(x3)


@triton.jit
def int4_word_dot(q, x0, x1, x2, x3, zc1, zc16):
    """q [R, BN] int32 words (code j at bits 4j); x0..x3 [R, BN] int32, fp16 pairs (x_j, x_j+4)
    for j = 0..3, x1 / x3 divided by 16 (x_pairs16); zc1 / zc16: fp16 pairs of 2^10 + z and
    2^10 + 16 z (zero_pairs16) -> fp32 [R, BN] sum_j (q_j - z) x_j."""
    t0, t1, t2, t3 = int4_word_codes(q, zc1, zc16)
    return word_dot16(t0, t1, t2, t3, x0, x1, x2, x3)


# fp8_words_dot16: 16 e4m3 weight codes (4 words: one 16-byte load, K order within) against 8 fp16
# pairs of activation codes divided by 512, in packed fp16 math: per word 2 converts
# (cvt.rn.f16x2.e4m3x2, exact) and 2 HFMA2, then one convert of the two halves to fp32, ~19
# instructions for 16 products where the fp32 loop takes ~7 per product. No overflow: |code| <=
# 448, so |w x / 512| <= 392 and each half sums 8 of them (< 3136 < 65504). Codes / 512 stay exact
# in fp16 (e4m3's 2^-9 step -> 2^-18, above fp16's 2^-24); the products are exact down to 2^-24
# (below it, only products of two near-zero codes, they flush), the sums round to fp16.
_FP8_WORDS_DOT16 = tl.constexpr(
    "{ .reg .b16 w0, w1, w2, w3, w4, w5, w6, w7; .reg .b32 q0, q1, q2, q3, q4, q5, q6, q7, a; "
    ".reg .b16 lo, hi; .reg .f32 fl, fh; "
    "mov.b32 {w0, w1}, $1; mov.b32 {w2, w3}, $2; mov.b32 {w4, w5}, $3; mov.b32 {w6, w7}, $4; "
    "cvt.rn.f16x2.e4m3x2 q0, w0; cvt.rn.f16x2.e4m3x2 q1, w1; cvt.rn.f16x2.e4m3x2 q2, w2; "
    "cvt.rn.f16x2.e4m3x2 q3, w3; cvt.rn.f16x2.e4m3x2 q4, w4; cvt.rn.f16x2.e4m3x2 q5, w5; "
    "cvt.rn.f16x2.e4m3x2 q6, w6; cvt.rn.f16x2.e4m3x2 q7, w7; "
    "mul.rn.f16x2 a, q0, $5; fma.rn.f16x2 a, q1, $6, a; fma.rn.f16x2 a, q2, $7, a; fma.rn.f16x2 a, q3, $8, a; "
    "fma.rn.f16x2 a, q4, $9, a; fma.rn.f16x2 a, q5, $10, a; fma.rn.f16x2 a, q6, $11, a; fma.rn.f16x2 a, q7, $12, a; "
    "mov.b32 {lo, hi}, a; cvt.f32.f16 fl, lo; cvt.f32.f16 fh, hi; add.f32 $0, fl, fh; }")


@triton.jit
def _e4m3_f32(b):
    # the e4m3 code in the low byte of b (int32) as fp32 (the interpreter's decode; no NaN codes)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (m + 8.0) * ((e + 117) << 23).to(tl.float32, bitcast=True))
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def fp8_words_dot16(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7):
    """w0..w3 int32: 4 words of 4 e4m3 codes each (code i of word j is input 4 j + i); x0..x7
    int32: fp16 pairs (x_2i, x_2i+1) / 512 (pack16 with f = 1/512) -> fp32 sum_k w_k x_k / 512
    (the products and their sums in fp16 on the GPU, exact fp32 in the interpreter)."""
    if _PTX:
        return tl.inline_asm_elementwise(_FP8_WORDS_DOT16, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                                         [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        part = _fp8_word_f32(w0, x0, x1) + _fp8_word_f32(w1, x2, x3)
        return part + _fp8_word_f32(w2, x4, x5) + _fp8_word_f32(w3, x6, x7)


@triton.jit
def fp8_tile_dot16(w, x_lo, x_hi):
    """w [R, 4G] int32: e4m3 weight codes as words, K order; x_lo / x_hi [4G] int32: the fp16
    activation pairs (inputs 4t, 4t+1) / 512 and (4t+2, 4t+3) / 512 of word column t (e4m3_f16x2)
    -> [R, G] fp32: each 16-input group's sum w x / 512 (fp8_words_dot16 per group)."""
    G: tl.constexpr = w.shape[1] // 4
    la, lb = tl.split(tl.reshape(x_lo, (G, 2, 2)))      # word j = 2 j1 + j0 of a group; j0 = 0 / 1
    x0, x4 = tl.split(la)                               # pairs 2j (x_lo) and 2j + 1 (x_hi) of word j
    x2, x6 = tl.split(lb)
    ha, hb = tl.split(tl.reshape(x_hi, (G, 2, 2)))
    x1, x5 = tl.split(ha)
    x3, x7 = tl.split(hb)
    wa, wb = tl.split(tl.reshape(w, (w.shape[0], G, 2, 2)))
    w0, w2 = tl.split(wa)
    w1, w3 = tl.split(wb)
    return fp8_words_dot16(w0, w1, w2, w3, x0[None, :], x1[None, :], x2[None, :], x3[None, :],
                           x4[None, :], x5[None, :], x6[None, :], x7[None, :])


_E4M3_F16X2 = tl.constexpr(
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }")
_E4M3_F16X2_DIV512 = tl.constexpr(
    "{ .reg .b16 lo, hi; .reg .b32 m; mov.b32 {lo, hi}, $2; mov.b32 m, 0x18001800; "
    "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; mul.rn.f16x2 $0, $0, m; mul.rn.f16x2 $1, $1, m; }")


@triton.jit
def e4m3_f16x2(q, DIV512: tl.constexpr = False):
    """q int32: 4 e4m3 codes (code i = input i) -> the fp16 pairs (c0, c1) and (c2, c3), exact; DIV512:
    both divided by 512, the activation pairs fp8_words_dot16 takes (a code's step 2^-9 becomes
    2^-18, still exact)."""
    if _PTX:
        if DIV512:
            return tl.inline_asm_elementwise(_E4M3_F16X2_DIV512, "=r,=r,r", [q], dtype=(tl.int32, tl.int32),
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_E4M3_F16X2, "=r,=r,r", [q], dtype=(tl.int32, tl.int32),
                                             is_pure=True, pack=1)
    else:
        f: tl.constexpr = 0.001953125 if DIV512 else 1.0
        return (pack16(_e4m3_f32(q & 255), _e4m3_f32((q >> 8) & 255), f),
                pack16(_e4m3_f32((q >> 16) & 255), _e4m3_f32((q >> 24) & 255), f))


@triton.jit
def words_at(wrow, kw, nm, k_hi):
    """The int32 weight words at word columns kw [BK/4] of the rows wrow [R, 1] (mask nm [R]; zeros
    from input k_hi on): one step of the word loops' prefetch (fp8 / int8 GEMVs, dense and MoE)."""
    return tl.load(wrow + kw[None, :], mask=nm[:, None] & (kw < k_hi // 4)[None, :], other=0,
                   eviction_policy=WEIGHT_EVICT)


def int32_words(weight: Tensor) -> Tensor | None:
    """weight [N, K] of 1-byte codes as int32 words [N, K/4] (a view), or None where the rows do not
    split into aligned words (K, row stride or storage offset not a multiple of 4)."""
    if weight.shape[-1] % 4 or weight.stride(0) % 4 or weight.storage_offset() % 4:
        return None
    return weight.view(torch.int32)


@triton.jit
def dp4a(a, b, c):
    """c + the dot of the 4 signed bytes of int32 words a and b (int32, exact): one IDP4A."""
    if _PTX:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return (c + ((a << 24) >> 24) * ((b << 24) >> 24) + ((a << 16) >> 24) * ((b << 16) >> 24)
                + ((a << 8) >> 24) * ((b << 8) >> 24) + (a >> 24) * (b >> 24))


@triton.jit
def _fp8_word_f32(w, xa, xb):
    # interpreter: the 4 codes of word w against the pairs xa (inputs 0, 1) and xb (2, 3)
    part = _e4m3_f32(w & 255) * _f16_lo(xa) + _e4m3_f32((w >> 8) & 255) * _f16_hi(xa)
    return part + _e4m3_f32((w >> 16) & 255) * _f16_lo(xb) + _e4m3_f32((w >> 24) & 255) * _f16_hi(xb)


@triton.jit
def pack16(a, b, f):
    # two fp32 times f -> one int32 holding (fp16(a f), fp16(b f)) as (low, high) halves
    if _PTX:    # 2 FMUL + one converting pack (F2FP) instead of 2 F2F + shift / PRMT
        return tl.inline_asm_elementwise("{ .reg .f32 a, b; mul.f32 a, $1, $3; mul.f32 b, $2, $3; "
                                         "cvt.rn.f16x2.f32 $0, b, a; }", "=r,f,f,f", [a, b, f],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        lo = (a * f).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
        hi = (b * f).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
        return lo | (hi << 16)


@triton.jit
def x_pairs16(x0, x1, x2, x3, x4, x5, x6, x7):
    """The 8 activations of a word row (fp32 [R]) -> (4 fp16 pairs for int4_word_dot, f_out [R]):
    each row is scaled by the power of two 2^t that puts its largest |x| in [256, 512) (exact; the
    products then stay far from fp16's 65504), and f_out = 2^-t undoes it on the fp32 sum."""
    m = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                   tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
    eb = tl.maximum((m.to(tl.int32, bitcast=True) >> 23) & 0xFF, 9)   # biased exponent; tiny rows as 2^-118
    f_in = ((262 - eb) << 23).to(tl.float32, bitcast=True)           # 2^(135 - eb)
    f_out = ((eb - 8) << 23).to(tl.float32, bitcast=True)            # 2^(eb - 135)
    f16 = f_in * 0.0625
    return pack16(x0, x4, f_in), pack16(x1, x5, f16), pack16(x2, x6, f_in), pack16(x3, x7, f16), f_out


@triton.jit
def zero_pairs16(z):
    """int4 zero points (int32, any shape) -> the fp16 pairs (2^10 + z, 2^10 + 16 z) int4_word_dot
    subtracts (fp16 2^10 + v has the bits 0x6400 + v for integers 0 <= v < 1024)."""
    return (z + 0x6400) * 0x10001, (z * 16 + 0x6400) * 0x10001


@triton.jit
def x_tile(a_ptrs, a_mask, perm_ptr, k0, K, BK: tl.constexpr, HAS_PERM: tl.constexpr):
    """x[:, k0:k0+BK] [BM, BK] in K order (zeros past K); a_ptrs / a_mask: [BM, 1] x rows;
    HAS_PERM: the stored rows are act-order sorted, column k of the tile is x[:, perm[k]]."""
    kk = k0 + tl.arange(0, BK)
    km = kk < K
    if HAS_PERM:
        kk = tl.load(perm_ptr + kk, mask=km, other=0)
    return tl.load(a_ptrs + kk[None, :], mask=a_mask & km[None, :], other=0.0)


# the transposed int4 tiles (swap tiles) of at least this many rows take _field_dots_t. H100, session
# 29, scripts/bench_int4_gemm.py (dense swap tiles, BM = rows rounded up to a power of two), µs,
# per-field -> paired, same call, alternated twice: M=96 (BM 128) 235B qkv 90.3 / 90.4 -> 64.4 /
# 64.5, o_proj 48.5 / 49.0 -> 42.1 / 42.1, gate_up 26.7 / 26.8 -> 22.3 / 22.3, down 16.9 / 16.9 ->
# 14.6 / 14.7, 30B qkv 23.8 / 23.5 -> 21.1 / 20.8, o_proj 21.9 / 21.9 -> 18.8 / 18.9, lm_head 325.4
# / 324.7 -> 330.8 / 331.1 (M = 65 and 127 alike: the head 0-2.5% slower, the rest 10-29% faster;
# linear_raw/session29_int4_swap_paired_bm128_ab_h100.log). At BM 64 the paired tile lost (235B qkv
# M=64 35.6 -> 43.1, 30B lm_head 188.9 -> 205.1: ptxas 153 -> 176 registers, 3 -> 2 programs per
# SM), at BM 32 it was within 3% but for the head (141 -> 125), and the fused MoE's BM-64 prefill
# row lost too (bench-moe 30B int4 at 512 / 1024 tokens 398.9 / 583.8 -> 413.5 / 620.2;
# linear_raw/session29_int4_swap_paired_all_bm_*, moe_diag/session29_moe_prefill_paired_bm64_*).
# Act-order tiles (HAS_PERM) keep the per-field dots: their x tile is a gather either way, and
# gathered in the paired order it took more instructions (sm_90 SASS, BM 128: 1122 -> 1325 per K
# step; the register permute of a gathered tile crashed Triton 3.6's TritonGPUOptimizeDotOperands).
PAIRED_MIN_BM = tl.constexpr(128)


@triton.jit
def _field_pair_dots(part, q, zb, s2, xlo, xhi, J: tl.constexpr, ROW_SCALE: tl.constexpr, TRANS: tl.constexpr):
    lo, hi = int4_pair(q >> (4 * J), zb)
    if ROW_SCALE:   # fp32 product, one rounding to the 16-bit dot operand
        lo = (lo.to(tl.float32) * s2).to(zb.dtype)
        hi = (hi.to(tl.float32) * s2).to(zb.dtype)
    if TRANS:       # part^T += W^T x^T: the codes are the dot's A operand
        part = tl.dot(hi, tl.trans(xhi), tl.dot(lo, tl.trans(xlo), part))
    else:
        part = tl.dot(xhi, hi, tl.dot(xlo, lo, part))
    return part


@triton.jit
def _field_dots(part, q, zb, s2, a, ROW_SCALE: tl.constexpr, TRANS: tl.constexpr = False):
    # a5[m, r, j2, j1, j0] = a[m, 8 r + 4 j2 + 2 j1 + j0]; each split takes the last axis apart
    a5 = tl.reshape(a, (a.shape[0], q.shape[1] if TRANS else q.shape[0], 2, 2, 2))
    e, o = tl.split(a5)                    # j0 = 0 / 1
    e0, e1 = tl.split(e)                   # j1
    o0, o1 = tl.split(o)
    x0, x4 = tl.split(e0)                  # j2: fields j and j + 4, [BM, R] each
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    part = _field_pair_dots(part, q, zb, s2, x0, x4, 0, ROW_SCALE, TRANS)
    part = _field_pair_dots(part, q, zb, s2, x1, x5, 1, ROW_SCALE, TRANS)
    part = _field_pair_dots(part, q, zb, s2, x2, x6, 2, ROW_SCALE, TRANS)
    return _field_pair_dots(part, q, zb, s2, x3, x7, 3, ROW_SCALE, TRANS)


@triton.jit
def _field_dots_t(part_t, q, zb, a):
    """part_t [BN, BM] += (codes - z)^T a^T for q [BN, R] words, a [BM, 8R] in K order, as one dot
    whose A operand (the codes, from registers on wgmma) takes the K order k' = 2 (R J + r) + h,
    h = 0 / 1 for field J / J + 4 of word row r: int4_pair's LOP3 leaves fields J and J + 4 of a
    word in the two halves of one 32-bit register, and as (k', k' + 1) they are the pair an MMA
    operand holds in one register, so no byte permutes repack the codes (the per-field dots above
    pair rows r, r + 1 of one field instead). The activation tile takes the same order by a
    reshape / permute, once per tile. Taken by int4_swap_tiles (see PAIRED_MIN_BM)."""
    R: tl.constexpr = q.shape[1]
    f0, f4 = int4_pair(q, zb)
    f1, f5 = int4_pair(q >> 4, zb)
    f2, f6 = int4_pair(q >> 8, zb)
    f3, f7 = int4_pair(q >> 12, zb)
    w = tl.join(tl.join(tl.join(f0, f4), tl.join(f1, f5)), tl.join(tl.join(f2, f6), tl.join(f3, f7)))
    # w[n, r, h, j0, j1] = field 2 j1 + j0 + 4 h of word (r, n); a5[m, r, h, j1, j0] = a[m, 8 r + 4 h + 2 j1 + j0]
    wt = tl.reshape(tl.permute(w, (0, 4, 3, 1, 2)), (q.shape[0], 8 * R))                          # [BN, k']
    x = tl.reshape(tl.permute(tl.reshape(a, (a.shape[0], R, 2, 2, 2)), (0, 3, 4, 1, 2)), (a.shape[0], 8 * R))
    return tl.dot(wt, tl.trans(x), part_t)


@triton.jit
def _zero_base(z, dt, HAS_ZERO: tl.constexpr):
    """16-bit float 2^m + z (m = 7 bf16, 10 fp16) of the zeros z (uint8; symmetric: z = 8)."""
    base = 128.0 if dt == tl.bfloat16 else 1024.0
    if HAS_ZERO:
        return (base + z.to(tl.float32)).to(dt)
    return tl.full(z.shape, base + 8.0, dt)


@triton.jit
def int4_field_dots(part, q, z_row, n_mask, a, HAS_ZERO: tl.constexpr, TRANS: tl.constexpr = False,
                    PAIRED: tl.constexpr = False):
    """part [BM, BN] fp32 += a @ (codes - z) for one K tile of 8R inputs in one group: q [R, BN]
    int4 words, a [BM, 8R] the activations of the tile in K order (x_tile). Field j of the R words
    is the K sub-lattice 8 r + j: one dot per field against the matching columns of a, which a
    reshape and three splits take apart in registers (one contiguous load of a per tile, instead
    of one strided gather per field), so the codes are never reshuffled into K order.
    z_row: [BN] pointers to the group's uint8 zeros (HAS_ZERO).
    TRANS: the transposed problem, part [BN, BM] += (codes - z)^T a^T with q [BN, R]; with PAIRED
    as one dot over a K order that pairs fields j and j + 4 (_field_dots_t)."""
    if HAS_ZERO:
        z = tl.load(z_row, mask=n_mask, other=0)
        z = z[:, None] if TRANS else z[None, :]
    else:
        z = tl.zeros([q.shape[0], 1] if TRANS else [1, q.shape[1]], tl.uint8)
    if TRANS and PAIRED:
        part = _field_dots_t(part, q, _zero_base(z, a.dtype, HAS_ZERO), a)
    else:
        part = _field_dots(part, q, _zero_base(z, a.dtype, HAS_ZERO), part, a, False, TRANS)
    return part


@triton.jit
def int4_swap_tiles(acc_t, qw_ptr, stride_q, s_ptr, stride_s, z_ptr, stride_z, cols, n_mask, x_rows, x_mask, perm_ptr,
                    k_lo, k_end, K, G, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, BK: tl.constexpr):
    """The swap tiles of the int4 kernels (intq.py's dense GEMM, the fused MoE's prefill row):
    acc_t [BN, BM] += W^T x^T over the K tiles k_lo, k_lo + BK, .. < k_end, each inside one group,
    as per-field dots transposed (int4_field_dots, TRANS), so the dequantized words are the dot's
    A operand (wgmma reads it from registers; only the x tile goes through shared memory) and BM up
    to 128 rows share one dequantization. qw_ptr: words [K/8, *] (row stride stride_q); s_ptr /
    z_ptr: scales / uint8 zeros [ceil(K/G), *]; cols [BN] the columns; x_rows [BM, 1] row pointers
    of x [*, K] with x_mask [BM, 1] (HAS_PERM: x columns gathered through perm_ptr, x_tile)."""
    rows = tl.arange(0, BK // 8)
    PAIRED: tl.constexpr = acc_t.shape[1] >= PAIRED_MIN_BM and not HAS_PERM
    for k0 in range(k_lo, k_end, BK):
        rw = k0 // 8 + rows
        w = tl.load(qw_ptr + rw[None, :] * stride_q + cols[:, None],
                    mask=(rw < K // 8)[None, :] & n_mask[:, None], other=0)          # [BN, BK/8] int32
        g = k0 // G
        s_row = tl.load(s_ptr + g * stride_s + cols, mask=n_mask, other=0.0).to(tl.float32)
        a = x_tile(x_rows, x_mask, perm_ptr, k0, K, BK, HAS_PERM)
        part = int4_field_dots(tl.zeros_like(acc_t), w, z_ptr + g * stride_z + cols, n_mask, a, HAS_ZERO, True, PAIRED)
        acc_t += part * s_row[:, None]
    return acc_t


@triton.jit
def int4_field_dots_grouped(part, q, s_ptr, s_stride, z_ptr, z_stride, k0, K, GS, cols, n_mask, a,
                            HAS_ZERO: tl.constexpr):
    """int4_field_dots for a K tile spanning several groups (GS < 8R, GS a multiple of 8: a word
    row lies in one group): each word row's codes are scaled by its group's scale before the dots
    (fp32 product, rounded once to the activation dtype, as the unfused path rounds its weights),
    so part += a @ W. s_ptr / z_ptr: scales / uint8 zeros [ceil(K/GS), *] (row strides s_stride /
    z_stride) at columns cols."""
    R: tl.constexpr = q.shape[0]
    kr = k0 + tl.arange(0, R) * 8
    g = (kr // GS)[:, None]
    m2 = (kr < K)[:, None] & n_mask[None, :]
    s2 = tl.load(s_ptr + g * s_stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)   # [R, BN]
    if HAS_ZERO:
        z = tl.load(z_ptr + g * z_stride + cols[None, :], mask=m2, other=0)
    else:
        z = tl.zeros([R, q.shape[1]], tl.uint8)
    return _field_dots(part, q, _zero_base(z, a.dtype, HAS_ZERO), s2, a, True)


# ----------------------------------------------------------------------------------------------
# split-K workspace

_COUNTERS: dict[tuple, Tensor] = {}
_RETIRED: list[Tensor] = []
_DUMMIES: dict[tuple, tuple[Tensor, Tensor]] = {}   # grown-out counter buffers stay alive: a captured graph may use them


def split_counters(device: torch.device, n: int) -> Tensor:
    """Zeroed int32 tile counters (>= n) for this device and current stream. Kernels leave them
    zero again, so the buffer is allocated once (sized from shapes only, never from values)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def split_workspace(split: int, M: int, N: int, n_tiles: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(partials [split, M, N] fp32, counters for n_tiles output tiles) for a split-K launch;
    one-element dummies when split == 1 (the kernels then never touch them)."""
    if split == 1:
        key = (device.type, device.index)
        if key not in _DUMMIES:
            _DUMMIES[key] = (torch.empty(1, dtype=torch.float32, device=device),
                             torch.empty(1, dtype=torch.int32, device=device))
        return _DUMMIES[key]
    return (torch.empty(split, M, N, dtype=torch.float32, device=device),
            split_counters(device, n_tiles))


@triton.jit
def gemv_tile(N, K, k_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMV program (grid rows x N blocks x K splits) -> (pid_m, pid_n, pid_k, offs_n, n_mask,
    offs_k, k_lo, k_hi) of the dense fp8 / int8 GEMVs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_per_split
    return (pid_m, pid_n, pid_k, offs_n, offs_n < N, tl.arange(0, BLOCK_K), k_lo,
            tl.minimum(k_lo + k_per_split, K))


@triton.jit
def gemm_tile(M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program -> its output tile and K range, for grid (M blocks * N blocks, K splits). The M
    blocks of one N block are neighbours, so they read the same weight tile while it is in L2.
    Returns (tile id, pid_k, offs_m, m_mask, offs_n, n_mask, offs_k, k_lo, k_hi)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m_blocks = tl.cdiv(M, BLOCK_M)
    offs_m = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid // m_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_per_split
    return (pid, pid_k, offs_m, offs_m < M, offs_n, offs_n < N, tl.arange(0, BLOCK_K), k_lo,
            tl.minimum(k_lo + k_per_split, K))


@triton.jit
def splitk_store(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, tile_id, pid_k,
                 split, USE_SPLIT: tl.constexpr):
    """acc: [BM, BN] fp32 partial of K split pid_k. Without split: cast and store. With split:
    store the partial, count arrivals; the last one sums all partials in order 0..split-1."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m[:, None].to(tl.int64)   # M * N passes 2**31 (a 151936-wide lm_head from 14k rows)
    out_ptrs = out_ptr + rows * stride_om + offs_n[None, :]
    if USE_SPLIT:
        mn = (tl.zeros([], dtype=tl.int64) + M) * N     # workspace [split, M, N] fp32
        ws_ptrs = ws_ptr + rows * N + offs_n[None, :]
        tl.store(ws_ptrs + pid_k * mn, acc, mask=mask)
        tl.debug_barrier()  # all threads' partial stores precede the release below
        prev = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if prev == split - 1:
            tot = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, split):
                ws_ptrs += mn
                tot += tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, tot.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)  # ready for the next launch / graph replay
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def one_row_gemv(c: dict, name: str) -> None:
    """fp8 / int8 GEMV programs take one activation row each (config BM 1): programs of 2 / 4 rows
    won 1 of 54 tuned M = 2-8 points, by < 5% (H100, session 25), and are gone."""
    if c["BM"] != 1:
        raise FormatError(f"{name}: gemv config BM={c['BM']}; its programs take one row (BM=1)")


def split_plan(K: int, tile_k: int, split: int) -> tuple[int, int]:
    """-> (effective split, K elements per split, a multiple of tile_k), no empty split."""
    k_tiles = cdiv(K, tile_k)
    split = max(1, min(int(split), k_tiles))
    per = cdiv(k_tiles, split) * tile_k
    return cdiv(K, per), per


# ----------------------------------------------------------------------------------------------
# input checks (shapes/dtypes only: no host sync)

def check_x(x: Tensor, K: int, name: str) -> Tensor:
    """x: [..., K] bf16/fp16/fp32 -> [M, K] with unit stride along K."""
    if x.dtype not in ACT_DTYPES:
        raise FormatError(f"{name}: activation dtype {x.dtype}, expected bfloat16, float16 or float32")
    if x.shape[-1] != K:
        raise ShapeMismatch(f"{name}: activation has {x.shape[-1]} input features, weight expects K={K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def check_tensor(t: Tensor, name: str, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatch(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise FormatError(f"{name}: dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if t.device != device:
        raise FormatError(f"{name}: on {t.device}, activations on {device}")
