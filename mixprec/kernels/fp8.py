"""FP8 (e4m3) linear: block-scaled (128x128), per-channel (1, K) or per-tensor (N, K) weights.

weight [N, K] float8_e4m3fn, scale [ceil(N/bn), ceil(K/bk)] fp32, W[n, k] = w * scale[n//bn, k//bk].

act "w8a8": activations are quantized per token and per 128-wide K slice (a = max(amax, EPS)/448,
xq = x/a as e4m3, quant.fp8_act_quant_reference): the GEMV (M = 1) does it in registers on its K
range, fused into the matmul loop; so does the GEMM below PRE_QUANT_M rows, from there on it reads
codes quantized once per row by `quant.act_quant` (plus that launch) instead of every N tile
program quantizing its rows again.
y[m, n] = sum_j a[m, j] * scale[n//bn, (128 j)//bk] * (xq[m, slice j] . w[n, slice j]).
act "w8a16": weights are widened in registers (exact in bf16/fp16) and multiplied with x; the
weight scale multiplies each K tile's result (a tile never straddles a scale block).

gemv (M = 1, and where tuned rows take it): programs over (row, N block, K split); [BN, BK] fp8
tiles with 16-byte loads along K; when the BN rows share a scale row (block scales with BN | 128,
per-tensor) the scales fold into x and BK may span several 128-wide slices. Folded scales with bf16
/ fp16 x (K a multiple of 4) multiply in packed fp16 (`_gemv_f16_words`, quant.fp8_words_dot16):
the weight read as int32 words, 4 e4m3 codes each, widened two at a time by cvt.rn.f16x2.e4m3x2 and
multiplied by HFMA2 with the activation codes / 512 (w8a8) or x over a power of two (w8a16), 16
products summed per call in fp16, then in fp32 times the slice's a * s (SASS of the 30B qkv w8a8
tile: 246 instructions per step against 493 for the fp32 loop; session 23, H100: 7.6 -> 6.2 µs).
One program per activation row: the TUNED rows of M = 2-8 that take the GEMV run it M times.
gemm: tl.dot on fp8 operands (w8a8, Hopper fp8 MMA) or bf16/fp16 (w8a16). One launch per call
(w8a8 gemm from PRE_QUANT_M rows: plus the quantization launch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from . import configs, pdl
from .ints import cdiv
from .quant import (EPS_C, FP8_ACT_GROUP, FP8_MAX_C, act_codes, check_tensor, check_x, fp8_act_reference,
                    fp8_tile_dot16, gemm_tile, gemv_tile, int32_words, one_row_gemv, pack16, round_e4m3, split_plan,
                    split_workspace, splitk_store, words_at)

ACT_BLOCK = FP8_ACT_GROUP   # w8a8: one activation scale per token per 128 inputs
# w8a8 GEMM from this many rows: activations quantized once per row by act_quant (one more launch)
# instead of in every N tile program. H100, bench-kernels (benchmarks/linear.md, session 8): with
# re-tuned configs faster at M = 32-64 on 15 of 18 points (235B qkv M=64 46.3 -> 26.0 µs, lm_head
# 269 -> 127) and 1.6-2.5x at M = 256; at M = 2-16 (same call, every GEMM M) 1-3 µs slower
PRE_QUANT_M = 32


@triton.jit(do_not_specialize=["M", "split"])
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K, bn, bk, stride_xm, stride_om, stride_w, stride_s, k_per_split, split,
                     A8: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SUB_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr = False,
                     F16: tl.constexpr = False, EARLY: tl.constexpr = False):
    # FOLD: the BLOCK_N rows share one scale-block row, so a scale depends on k only and is folded
    # (with the activation scale) into x: one multiply per input instead of one per weight, and
    # the K tile can span several 128-wide slices (SUB_K each): more bytes in flight per step.
    # Otherwise the tile is one slice (BLOCK_K == SUB_K) and the scale multiplies each row's sum.
    # F16 (FOLD; w_ptr / stride_w: the weight as int32 words): the weight codes meet the activation
    # codes (w8a8) or x scaled by a power of two (w8a16) in packed fp16 math (_gemv_f16_words).
    if F16:
        _gemv_f16_words(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, bn, bk, stride_xm, stride_om, stride_w,
                        stride_s, k_per_split, split, A8, BLOCK_N, BLOCK_K, SUB_K, USE_SPLIT, PDL, EARLY)
    else:
        _gemv_f32(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, bn, bk, stride_xm, stride_om, stride_w,
                  stride_s, k_per_split, split, A8, FOLD, BLOCK_N, BLOCK_K, SUB_K, USE_SPLIT, PDL, EARLY)


@triton.jit
def _gemv_f32(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, bn, bk, stride_xm, stride_om, stride_w,
              stride_s, k_per_split, split, A8: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr,
              EARLY: tl.constexpr):
    # every weight widened to fp32 and multiplied with the (quantized, FOLD: scaled) activation
    U: tl.constexpr = BLOCK_K // SUB_K
    pid_m, pid_n, pid_k, offs_n, n_mask, offs_k, k_lo, k_hi = gemv_tile(N, K, k_per_split, BLOCK_N, BLOCK_K)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    s_rows = s_ptr + (offs_n // bn) * stride_s
    s_tile = s_ptr + ((pid_n * BLOCK_N) // bn) * stride_s       # FOLD: the tile's scale row
    sub = tl.arange(0, U) * SUB_K
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    kn = k_lo + offs_k
    w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn < k_hi)[None, :], other=0.0)
    pdl.wait(PDL)     # the first weight tile is on its way; x and the counters come from earlier kernels
    if EARLY:
        pdl.launch_dependents(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        w = w_next
        kn = kk + BLOCK_K       # prefetch the next tile: its latency hides behind this one
        w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn < k_hi)[None, :], other=0.0)
        xv = tl.reshape(tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32), (U, SUB_K))
        if A8:
            a = tl.maximum(tl.max(tl.abs(xv), axis=1), EPS_C) / FP8_MAX_C                    # [U]
            xv = round_e4m3(xv / a[:, None]) * a[:, None]     # the dequantized e4m3 activation
        if FOLD:
            ks = k0 + sub
            xv = xv * tl.load(s_tile + ks // bk, mask=ks < K, other=0.0)[:, None]
        part = tl.sum(w.to(tl.float32) * tl.reshape(xv, (BLOCK_K,))[None, :], axis=1)
        if FOLD:
            acc += part
        else:
            acc += part * tl.load(s_rows + k0 // bk, mask=n_mask, other=0.0)
    offs_m = pid_m + tl.arange(0, 1)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    splitk_store(acc[None, :], out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
                 pid_k, split, USE_SPLIT)


@triton.jit
def _gemv_f16_words(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, bn, bk, stride_xm, stride_om, stride_w,
                    stride_s, k_per_split, split, A8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SUB_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    # The BLOCK_N rows sharing one scale row: per SUB_K-wide slice j the activations become fp16
    # pairs (_x_pairs16) and meet the weight codes in packed fp16 (quant.fp8_words_dot16: decode
    # and 16 products per call, each thread's 16-byte load); a_j * s_j scales the fp32 sums.
    # Per-thread partials [BLOCK_N, BLOCK_K / 16] are summed across the threads once, after the K
    # loop. w_ptr: int32 words [N, K / 4] (row stride stride_w words). One activation row per
    # program: programs of 2 / 4 rows (each word decoded once) were the fastest candidate on 1 of
    # 54 tuned (M = 2-8, shape) points, by < 5% (H100, session 25,
    # benchmarks/linear_raw/session25_tune_w8a8_m2_8_h100.log), and are gone.
    pid_m, pid_n, pid_k, offs_n, n_mask, offs_k, k_lo, k_hi = gemv_tile(N, K, k_per_split, BLOCK_N, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 4)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    s_tile = s_ptr + ((pid_n * BLOCK_N) // bn) * stride_s       # the tile's scale row
    acc = tl.zeros([BLOCK_N, BLOCK_K // 16], dtype=tl.float32)
    kw = k_lo // 4 + offs_w
    w_next = words_at(w_rows, kw, n_mask, k_hi)
    pdl.wait(PDL)     # the first weight tile is on its way; x comes from the kernel before
    if EARLY:
        pdl.launch_dependents(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = w_next
        kw = (k0 + BLOCK_K) // 4 + offs_w
        w_next = words_at(w_rows, kw, n_mask, k_hi)
        kk = k0 + offs_k
        ks = k0 + tl.arange(0, BLOCK_K // SUB_K) * SUB_K
        s_j = tl.load(s_tile + ks // bk, mask=ks < K, other=0.0)                        # [U]
        x_lo, x_hi, f = _x_pairs16(x_row, kk, K, s_j, A8, SUB_K)
        acc += fp8_tile_dot16(w, x_lo, x_hi) * f[None, :]                                # [BN, G]
    tile_id = pid_m * tl.num_programs(1) + pid_n
    splitk_store(tl.sum(acc, axis=1)[None, :], out_ptr, ws_ptr, cnt_ptr, pid_m + tl.arange(0, 1), offs_n, M, N,
                 stride_om, tile_id, pid_k, split, USE_SPLIT)


@triton.jit
def _x_pairs16(x_row, kk, K, s_j, A8: tl.constexpr, SUB_K: tl.constexpr):
    """One activation row at inputs kk [BK] -> (x_lo, x_hi [BK / 4] int32: the fp16 pairs (4t, 4t+1)
    and (4t+2, 4t+3) of each word column t, f [BK / 16]: each 16-input group's fp32 factor). Per
    SUB_K-wide slice j: c = the activation codes round_e4m3(x / a_j) / 512 (A8, a_j = amax / 448)
    or x / a_j (w8a16, a_j the power of two just above amax: exact, |c| < 1, so products and 8-term
    sums stay far below fp16's 65504); f = a_j * s_j (* 512 for A8)."""
    BK: tl.constexpr = kk.shape[0]
    U: tl.constexpr = BK // SUB_K
    xv = tl.reshape(tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32), (U, SUB_K))
    amax = tl.max(tl.abs(xv), axis=1)                                                      # [U]
    if A8:
        a = tl.maximum(amax, EPS_C) / FP8_MAX_C
        c = round_e4m3(xv / a[:, None])                             # e4m3 codes, as fp32
        f = a * s_j * 512.0
        c_f: tl.constexpr = 0.001953125                             # the codes / 512
    else:
        eb = tl.minimum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 252)    # biased exponent
        a = ((eb + 1) << 23).to(tl.float32, bitcast=True)                          # 2^(eb - 126)
        c = xv * ((253 - eb) << 23).to(tl.float32, bitcast=True)[:, None]          # x / a
        f = a * s_j
        c_f: tl.constexpr = 1.0
    e, o = tl.split(tl.reshape(c, (BK // 4, 2, 2)))
    x_lo, x_hi = tl.split(pack16(e, o, c_f))
    return x_lo, x_hi, tl.reshape(tl.broadcast_to(f[:, None], (U, SUB_K // 16)), (BK // 16,))


@triton.jit(do_not_specialize=["M", "split"])
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, a_ptr,
                     M, N, K, bn, bk, stride_xm, stride_om, stride_w, stride_s, k_per_split, split, stride_a,
                     A8: tl.constexpr, PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    # A8: a K tile is one 128-wide activation slice. PRE: x_ptr holds the rows' e4m3 codes and
    # a_ptr their slice scales (quant.act_quant); otherwise the tile's rows are quantized here.
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    pid, pid_k, offs_m, m_mask, offs_n, n_mask, offs_k, k_lo, k_hi = gemm_tile(M, N, K, k_per_split, BLOCK_M,
                                                                              BLOCK_N, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    s_rows = s_ptr + (offs_n // bn) * stride_s
    a_rows = a_ptr + offs_m * stride_a
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        s = tl.load(s_rows + k0 // bk, mask=n_mask, other=0.0)
        if PRE:
            a = tl.load(a_rows + k0 // BLOCK_K, mask=m_mask, other=0.0)                # [BM]
            acc += tl.dot(x, tl.trans(w)) * (a[:, None] * s[None, :])
        elif A8:
            xf = x.to(tl.float32)
            a = tl.maximum(tl.max(tl.abs(xf), axis=1), EPS_C) / FP8_MAX_C          # [BM]
            xq = round_e4m3(xf / a[:, None]).to(tl.float8e4nv)
            acc += tl.dot(xq, tl.trans(w)) * (a[:, None] * s[None, :])
        else:
            acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty))) * s[None, :]
    splitk_store(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid, pid_k, split,
                 USE_SPLIT)


def fp8_linear_reference(x: Tensor, weight: Tensor, scale: Tensor, block, act: str) -> Tensor:
    """Readable spec, fp32. x: [M, K] -> [M, N] float32."""
    N, K = weight.shape
    bn, bk = int(block[0]), int(block[1])
    s = scale.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    w = weight.float() * s                                                     # [N, K]
    if act == "w8a16":
        return x.float() @ w.T
    return fp8_act_reference(x, ACT_BLOCK) @ w.T


def fp8_linear(x: Tensor, weight: Tensor, scale: Tensor, block, act: str) -> Tensor:
    """y = x @ W.T. x: [..., K] bf16/fp16 -> [..., N] in x.dtype."""
    return fp8_linear_cfg(x, weight, scale, block, act, None)


def fp8_linear_cfg(x, weight, scale, block, act, cfg: dict | None) -> Tensor:
    """fp8_linear with an explicit launch config (None: configs.get); the benchmark tunes with it."""
    if act not in ("w8a8", "w8a16"):
        raise FormatError(f"fp8_linear: act={act!r}, expected 'w8a8' or 'w8a16'")
    if weight.dim() != 2:
        raise ShapeMismatch(f"fp8_linear: weight has shape {tuple(weight.shape)}, expected [N, K]")
    N, K = weight.shape
    bn, bk = int(block[0]), int(block[1])
    if bn <= 0 or bk <= 0:
        raise FormatError(f"fp8_linear: block={tuple(block)} must be positive")
    dev = weight.device
    check_tensor(weight, "fp8_linear weight", (N, K), (torch.float8_e4m3fn,), dev)
    check_tensor(scale, "fp8_linear scale", (cdiv(N, bn), cdiv(K, bk)), (torch.float32,), dev)
    if weight.stride(1) != 1 or scale.stride(1) != 1:
        raise FormatError(f"fp8_linear: weight/scale rows must be contiguous along K, strides "
                          f"{weight.stride()} / {scale.stride()}")
    if act == "w8a8" and bk < K and bk % ACT_BLOCK:
        raise FormatError(f"fp8_linear: w8a8 quantizes activations per {ACT_BLOCK} inputs; weight block "
                          f"bk={bk} must be a multiple of {ACT_BLOCK} (or cover all K={K})")
    if act == "w8a16" and bk < K and bk % 16:
        raise FormatError(f"fp8_linear: weight block bk={bk} must be a multiple of 16 (or cover all K={K})")
    lead = x.shape[:-1]
    x2 = check_x(x, K, "fp8_linear x")
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    c = cfg if cfg is not None else configs.get(f"fp8_{act}", M, N, K)
    bk_pow2 = 1 << (max(1, c["BK"]).bit_length() - 1)
    if act == "w8a8":
        tile = ACT_BLOCK
    else:   # largest power of two <= BK that keeps tiles inside one scale block
        tile = max(16, bk_pow2)
        while bk < K and bk % tile:
            tile //= 2
    # gemv: when the rows of a tile share a scale row, a K tile may span several slices
    fold = c["path"] == "gemv" and (bn % c["BN"] == 0 or bn >= N)
    tile_k = max(tile, bk_pow2) if fold else tile
    split, per = split_plan(K, tile_k, c["split"])
    if c["path"] == "gemv":
        nb = cdiv(N, c["BN"])
        # folded scales and 16-bit x: the codes meet in packed fp16 (weights read as words)
        words = int32_words(weight) if fold and x2.dtype != torch.float32 else None
        f16 = words is not None
        wk = words if f16 else weight
        one_row_gemv(c, "fp8_linear")
        ws, cnt = split_workspace(split, M, N, M * nb, x2.device)
        _fp8_gemv_kernel[(M, nb, split)](
            x2, wk, scale, out, ws, cnt, M, N, K, bn, bk, x2.stride(0), out.stride(0), wk.stride(0),
            scale.stride(0), per, split, A8=act == "w8a8", FOLD=fold, BLOCK_N=c["BN"],
            BLOCK_K=tile_k, SUB_K=tile, USE_SPLIT=split > 1, num_warps=c["warps"], num_stages=c["stages"],
            F16=f16, EARLY=pdl.early(), **pdl.launch_kw(x2))
    else:
        nt = cdiv(M, c["BM"]) * cdiv(N, c["BN"])
        ws, cnt = split_workspace(split, M, N, nt, x2.device)
        pre = act == "w8a8" and M >= PRE_QUANT_M
        xg, a, s_a = act_codes(x2, "fp8") if pre else (x2, x2, 0)
        _fp8_gemm_kernel[(nt, split)](
            xg, weight, scale, out, ws, cnt, a, M, N, K, bn, bk, xg.stride(0), out.stride(0), weight.stride(0),
            scale.stride(0), per, split, s_a,
            A8=act == "w8a8", PRE=pre, BLOCK_M=c["BM"], BLOCK_N=c["BN"], BLOCK_K=tile, USE_SPLIT=split > 1,
            num_warps=c["warps"], num_stages=c["stages"], **pdl.launch_kw(x2))
    return out.reshape(*lead, N)
