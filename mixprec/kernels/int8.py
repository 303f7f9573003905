"""INT8 linear (compressed-tensors int-quantized / naive-quantized, SmoothQuant-style).

weight [N, K] int8, scale [N, 1] fp32, zero [N, 1] fp32 or None: W[n, k] = scale[n] * (q - zero[n]).

act "w8a8": activations are quantized per token: sx = max(amax, EPS)/127 over the whole row,
xq = x/sx rounded half to even, in [-127, 127] (quant.int8_act_quant_reference; the division exact,
`div_rn`, as torch's: bf16 inputs land on exact .5 ties often). The GEMV (one row per program
group) quantizes its row in registers; the GEMM reads codes quantized once per row by
`quant.act_quant` (the fused MoE's pre-pass: same codes), instead of every program dividing its
rows again. Then int8 x int8 -> int32: y = sx * scale * (sum_k xq q - zero * sum_k xq); the zero
point is exact: sum_k xq is summed alongside the dot. act "w8a16": q is widened (exact in
bf16/fp16) and y = scale * (x.q - zero * sum x).

gemv (M = 1, and the TUNED rows of M = 2-4 that take it): programs over (row, N block, K split),
one activation row each, 16-byte loads along K, int32 (w8a8) or fp32 FMA dot products; a config's
"words" (w8a8; every TUNED GEMV row sets it) runs the same integer sums as dp4a over the weight read
as int32 words (`_gemv_dp4a_words`; offline SASS of the 30B qkv tile 548 -> 421 instructions per
step, most of the rest is the in-register quantization of x; session 24, H100: 5-15% faster on
every 30B / 235B shape at M = 1); gemm: tl.dot int8 (w8a8) or bf16/fp16 (w8a16).
One launch per call (w8a8 gemm: plus the quantization launch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from . import configs, pdl
from .ints import cdiv
from .quant import (EPS_C, INT8_MAX_C, RNE_C, act_codes, check_tensor, check_x, dp4a, gemm_tile, gemv_tile,
                    int32_words, int8_act_quant_reference, one_row_gemv, split_plan, split_workspace, splitk_store,
                    words_at)


@triton.jit(do_not_specialize=["M", "split"])
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xm, stride_om, stride_w, k_per_split, split,
                      A8: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr = False,
                      WORDS: tl.constexpr = False):
    # WORDS (w8a8; w_ptr / stride_w: the weight as int32 words): _gemv_dp4a_words
    if WORDS:
        _gemv_dp4a_words(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om,
                         stride_w, k_per_split, split, HAS_ZERO, BLOCK_N, BLOCK_K, USE_SPLIT, PDL)
    else:
        _gemv_i32(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om, stride_w,
                  k_per_split, split, A8, HAS_ZERO, BLOCK_N, BLOCK_K, USE_SPLIT, PDL)


@triton.jit
def _token_scale(x_row, K, offs_k, BLOCK_K: tl.constexpr):
    # w8a8: the row's scale max(amax, EPS) / 127 over the whole row, identical in every split
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)))
    return tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), EPS_C), INT8_MAX_C)


@triton.jit
def _int8_codes(xv, sx):
    # fp32 x -> its int8 codes (int32): x / sx rounded half to even, clamped to +-127
    return tl.minimum(tl.maximum((tl.math.div_rn(xv, sx) + RNE_C) - RNE_C, -INT8_MAX_C), INT8_MAX_C).to(tl.int32)


@triton.jit
def _gemv_dp4a_words(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om, stride_w,
                     k_per_split, split, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_SPLIT: tl.constexpr, PDL: tl.constexpr):
    # w8a8 as dp4a: a row's codes packed 4 to a word once per tile (shared by the BLOCK_N weight
    # rows), weights read as int32 words, 4 products per instruction into int32 per-thread partials
    # [BLOCK_N, BLOCK_K / 4], summed once after the K loop (the same exact integers as _gemv_i32).
    pid_m, pid_n, pid_k, offs_n, n_mask, offs_k, k_lo, k_hi = gemv_tile(N, K, k_per_split, BLOCK_N, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 4)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    kw = k_lo // 4 + offs_w
    w_next = words_at(w_rows, kw, n_mask, k_hi)
    pdl.wait(PDL)     # the first weight tile is on its way; x comes from the kernel before
    sx = _token_scale(x_row, K, offs_k, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.int32)
    xs = tl.zeros([BLOCK_K // 4], dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = w_next
        kw = (k0 + BLOCK_K) // 4 + offs_w
        w_next = words_at(w_rows, kw, n_mask, k_hi)
        # the row's codes as words (byte i = input 4t + i), shared by the BLOCK_N weight rows
        kk = k0 + offs_k
        q = _int8_codes(tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32), sx) & 255
        q01, q23 = tl.split(tl.reshape(q, (BLOCK_K // 4, 2, 2)))      # [BK/4, 2]: bytes (0, 2), (1, 3)
        q0, q2 = tl.split(q01)
        q1, q3 = tl.split(q23)
        xw = q0 | (q1 << 8) | (q2 << 16) | (q3 << 24)                 # [BK/4] words
        acc = dp4a(w, tl.broadcast_to(xw[None, :], w.shape), acc)
        if HAS_ZERO:    # the codes' running sums
            xs = dp4a(xw, tl.full(xw.shape, 0x01010101, tl.int32), xs)
    # scale * sx * (x.q - zero * sum x)
    y = tl.sum(acc, axis=1).to(tl.float32)
    if HAS_ZERO:
        y -= tl.load(z_ptr + offs_n, mask=n_mask, other=0.0) * tl.sum(xs, axis=0).to(tl.float32)
    y = y * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0) * sx
    tile_id = pid_m * tl.num_programs(1) + pid_n
    splitk_store(y[None, :], out_ptr, ws_ptr, cnt_ptr, pid_m + tl.arange(0, 1), offs_n, M, N, stride_om, tile_id,
                 pid_k, split, USE_SPLIT)


@triton.jit
def _gemv_i32(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om, stride_w,
              k_per_split, split, A8: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    pid_m, pid_n, pid_k, offs_n, n_mask, offs_k, k_lo, k_hi = gemv_tile(N, K, k_per_split, BLOCK_N, BLOCK_K)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    if A8:
        sx = _token_scale(x_row, K, offs_k, BLOCK_K)
        acc = tl.zeros([BLOCK_N], dtype=tl.int32)
        xsum = tl.zeros([BLOCK_K], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    kn = k_lo + offs_k
    w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn < k_hi)[None, :], other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        w = w_next
        kn = kk + BLOCK_K       # prefetch the next tile: its latency hides behind this one
        w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn < k_hi)[None, :], other=0)
        xv = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        if A8:
            xq = _int8_codes(xv, sx)
            acc += tl.sum(w.to(tl.int32) * xq[None, :], axis=1)
            xsum += xq
        else:
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
            xsum += xv
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32)
    if HAS_ZERO:
        y -= tl.load(z_ptr + offs_n, mask=n_mask, other=0.0) * tl.sum(xsum, axis=0).to(tl.float32)
    y = y * s
    if A8:
        y = y * sx
    offs_m = pid_m + tl.arange(0, 1)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    splitk_store(y[None, :], out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
                 pid_k, split, USE_SPLIT)


@triton.jit(do_not_specialize=["M", "split"])
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, sx_ptr,
                      M, N, K, stride_xm, stride_om, stride_w, k_per_split, split, stride_sx,
                      A8: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    # A8: x_ptr holds the rows' int8 codes and sx_ptr their scales (quant.act_quant)
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    pid, pid_k, offs_m, m_mask, offs_n, n_mask, offs_k, k_lo, k_hi = gemm_tile(M, N, K, k_per_split, BLOCK_M,
                                                                              BLOCK_N, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    if A8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        xsum = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        if A8:
            xsum += x.to(tl.int32)
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            xsum += x.to(tl.float32)
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0)
        y -= z[None, :] * tl.sum(xsum, axis=1).to(tl.float32)[:, None]
    y = y * s[None, :]
    if A8:
        y = y * tl.load(sx_ptr + offs_m * stride_sx, mask=m_mask, other=0.0)[:, None]
    splitk_store(y, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid, pid_k, split,
                 USE_SPLIT)


def int8_linear_reference(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor | None, act: str) -> Tensor:
    """Readable spec, fp32. x: [M, K] -> [M, N] float32."""
    w = weight.float()
    if zero is not None:
        w = w - zero.float()
    w = w * scale.float()                                                      # [N, K]
    if act == "w8a16":
        return x.float() @ w.T
    xq, sx = int8_act_quant_reference(x)
    return (xq.float() * sx) @ w.T


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor | None, act: str) -> Tensor:
    """y = x @ W.T. x: [..., K] bf16/fp16 -> [..., N] in x.dtype."""
    return int8_linear_cfg(x, weight, scale, zero, act, None)


def int8_linear_cfg(x, weight, scale, zero, act, cfg: dict | None) -> Tensor:
    """int8_linear with an explicit launch config (None: configs.get); the benchmark tunes with it."""
    if act not in ("w8a8", "w8a16"):
        raise FormatError(f"int8_linear: act={act!r}, expected 'w8a8' or 'w8a16'")
    if weight.dim() != 2:
        raise ShapeMismatch(f"int8_linear: weight has shape {tuple(weight.shape)}, expected [N, K]")
    N, K = weight.shape
    dev = weight.device
    check_tensor(weight, "int8_linear weight", (N, K), (torch.int8,), dev)
    check_tensor(scale, "int8_linear scale", (N, 1), (torch.float32,), dev)
    if zero is not None:
        check_tensor(zero, "int8_linear zero", (N, 1), (torch.float32,), dev)
    if weight.stride(1) != 1:
        raise FormatError(f"int8_linear: weight rows must be contiguous along K, strides {weight.stride()}")
    has_zero = zero is not None
    scale = scale.reshape(N).contiguous()             # [N, 1] -> [N] (a view when already packed)
    zero = zero.reshape(N).contiguous() if has_zero else scale   # dummy pointer when absent
    lead = x.shape[:-1]
    x2 = check_x(x, K, "int8_linear x")
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    c = cfg if cfg is not None else configs.get(f"int8_{act}", M, N, K)
    tile = max(16, 1 << (max(1, c["BK"]).bit_length() - 1))
    split, per = split_plan(K, tile, c["split"])
    args = (M, N, K, x2.stride(0), out.stride(0), weight.stride(0), per, split)
    flags = dict(A8=act == "w8a8", HAS_ZERO=has_zero, BLOCK_N=c["BN"], BLOCK_K=tile,
                 USE_SPLIT=split > 1, num_warps=c["warps"], num_stages=c["stages"], **pdl.launch_kw(x2))
    if c["path"] == "gemv":
        nb = cdiv(N, c["BN"])
        # a config's "words": w8a8 as dp4a over the weight read as int32 words
        wv = int32_words(weight) if c.get("words", False) and act == "w8a8" else None
        words = wv is not None
        wk = wv if words else weight
        one_row_gemv(c, "int8_linear")
        ws, cnt = split_workspace(split, M, N, M * nb, x2.device)
        args = (M, N, K, x2.stride(0), out.stride(0), wk.stride(0), per, split)
        _int8_gemv_kernel[(M, nb, split)](x2, wk, scale, zero, out, ws, cnt, *args, WORDS=words, **flags)
    else:
        nt = cdiv(M, c["BM"]) * cdiv(N, c["BN"])
        ws, cnt = split_workspace(split, M, N, nt, x2.device)
        xg, sx, s_sx = act_codes(x2, "int8") if act == "w8a8" else (x2, x2, 0)
        _int8_gemm_kernel[(nt, split)](xg, weight, scale, zero, out, ws, cnt, sx, M, N, K, xg.stride(0),
                                       out.stride(0), weight.stride(0), per, split, s_sx, BLOCK_M=c["BM"], **flags)
    return out.reshape(*lead, N)
