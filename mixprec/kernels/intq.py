"""Canonical int4 / int8 weight-only linear (GPTQ, AWQ, compressed-tensors W4A16/W8A16).

Layout (formats/base.py): qweight [K/pf, N] int32, pf = 32/bits, input row r*pf+i in bits
bits*i.. of word r (unsigned codes); scales [ceil(K/G), N] fp16/bf16; zeros [ceil(K/G), N] uint8
or None (symmetric: zero 2^(bits-1)); perm [K] int32 or None (act-order: rows are stored sorted
by group and the kernel computes with x[:, perm]).

Paths (intq_config picks one per call; the Triton ones are one launch, split-K reduced in-kernel,
quant.splitk_store):

* gemv (decode, M = 1-8): programs over (row m, BN columns, K split) running the int4/int8 tile
  loop the fused MoE uses (gemv_tiles.gemv_intq over BN columns; the MoE calls the
  gemv_intq_cols under it with any column set): a [BK/pf, BN] word tile dequantized field by
  field in its own register layout (code -> float by one LOP3 + one FADD: OR-ing an exponent makes
  2^e + q exactly), scale and zero applied once per word row, the rows reduced once at the end,
  the next tile prefetched; many small programs (BN 8-64). Needs qweight / scales / zeros with
  row stride N (every producer's tensors are contiguous). It replaced a wide-tile GEMV (BN 256,
  every thread owning whole columns) in session 6: 30B qkv at M=1 10.3 -> 6.0 µs on an H100.
  int4 with 16-bit activations over >= F16_MIN_K inputs per program: each word in packed fp16
  math instead (quant.int4_word_dot: field pairs (j, j+4) masked into fp16 2^10 + q, one packed
  subtract of the zero, four packed FMAs against the word row's x scaled by a power of two so the
  products stay finite; ~15 instructions per 8 codes against ~33): session 21, 235B qkv M=2 20.8
  -> 16.1 µs. A config's BM of 2 or 4 (int4, 16-bit x) gives each program that many rows
  (gemv_tiles.gemv_int4_rows): every word is loaded and unpacked once for all of them, the packed
  dot repeats per row (SASS per word and row: ~27 instructions at 1 row, ~23 at 2, ~18 at 4):
  session 22, 235B down M=4 7.98 -> 6.07 µs, 30B o_proj M=2 7.52 -> 6.17.
* gemm (tl.dot, M > 1): when a K tile sits in one group the codes enter the dot as exact integers
  (q - z) and the scale multiplies the tile's dot result. 4-bit, BM 16, K tiles >= 128 (M = 2-128,
  and any M with groups smaller than the tile: intq_config): the [BK/8, BN] word tile is loaded
  once and unpacked two fields per instruction (quant.int4_pair); field j of the words is the K
  sub-lattice 8 r + j, one dot each against the matching x columns; with groups smaller than the
  tile each word row is scaled by its group first. Otherwise a [BK, BN] tile of codes in natural K
  order (each word loaded once per input row it holds; the repeats hit L1), one dot per K tile;
  groups smaller than the tile are dequantized row by row before the dot.
* swap (int4, 17-127 rows, one group per K tile): the same per-field dots transposed, out^T =
  W^T x^T, so the dequantized words are the dot's A operand (wgmma reads A from registers, B from
  shared memory: only the x tile is staged) and one program's BM = up to 128 rows share each
  dequantized tile (BM-16 tiles dequantize every weight once per 16 rows).
* dequant (int4 / 8-bit, >= 128 rows: prefill): the weight dequantized into a transient x.dtype buffer
  (column chunks), multiplied by cuBLAS; at these sizes the GEMM is compute-bound and the extra
  pass over the weight costs less than dequantizing inside a tile loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from . import configs, pdl
from .gemv_mma import gemv_int4_mma
from .gemv_tiles import gemv_int4_rows, gemv_intq, row_ptrs4
from .ints import cdiv, next_power_of_2
from .quant import (check_tensor, check_x, gemm_tile, int4_field_dots, int4_field_dots_grouped, int4_swap_tiles,
                    split_plan, split_workspace, splitk_store, x_tile)

MAGIC = 8388608.0  # 2^23: float with bits 0x4B000000
MAGIC_C = tl.constexpr(MAGIC)


# int4 GEMV programs over at least this many inputs take the packed-fp16 word loop (gemv_tiles,
# 16-bit activations only). H100, session 21, bench-kernels, µs, fp32 loop -> fp16 loop, int4 g128
# asym / sym (linear_raw/session21_f16_dense_*): M=2 235B qkv 20.8 -> 16.1 / 19.6 -> 14.6, 30B
# o_proj 9.6 -> 7.8 / 10.7 -> 7.6; M=1 235B qkv 13.3 -> 11.4 / 13.6 -> 10.6, lm_head 71.8 -> 61.5,
# 30B qkv 5.7 -> 5.9 / 5.8 -> 5.4. Shorter programs lost in a first version (30B down, K 768: M=2
# 3.4 -> 3.7)
F16_MIN_K = 2048


@triton.jit(do_not_specialize=["M", "split"])
def _intq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xm, stride_om, qm, k_per_split, split,
                      BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVK: tl.constexpr,
                      USE_SPLIT: tl.constexpr, PDL: tl.constexpr = False, F16: tl.constexpr = False,
                      MR: tl.constexpr = 1, MMA: tl.constexpr = 0):
    # qweight / scales / zeros contiguous (row stride N); qm: the 4-bit code mask at run time.
    # MR > 1 (int4, 16-bit x): program pid_m computes rows pid_m * MR .. (gemv_int4_rows)
    # MMA (the warp count; int4, groups of 128 or a multiple, no perm, 16-bit x, BLOCK_N 32 / 64,
    # MR 1 or 8): on the tensor cores (gemv_mma), columns n0 .. + BLOCK_N / 2 as its "lo" set,
    # the rest as "hi", the MR rows as the mmas' B columns
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo = pid_k * k_per_split
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    if MMA > 0:
        n0 = pid_n * BLOCK_N
        acc = gemv_int4_mma(x_ptr + (pid_m * MR).to(tl.int64) * stride_xm, qw_ptr, s_ptr, z_ptr,
                            n0, n0 + BLOCK_N // 2, N, N, N, K, k_lo, k_lo + k_per_split, G, HAS_ZERO,
                            MMA, BLOCK_N // 16, PDL, MR, stride_xm, M - pid_m * MR)
        if MR == 1:
            acc = acc[None, :]
        offs_m = pid_m * MR + tl.arange(0, MR)
    elif MR > 1:
        offs_m = pid_m * MR + tl.arange(0, MR)
        x0, x1, x2, x3 = row_ptrs4(x_ptr, pid_m * MR, M, stride_xm)
        acc = gemv_int4_rows(x0, x1, x2, x3, qw_ptr, s_ptr, z_ptr, perm_ptr, offs_n, offs_n < N, N, K, k_lo,
                             k_lo + k_per_split, MR, G, HAS_ZERO, HAS_PERM, BLOCK_K, EVK, PDL)
    else:
        acc = gemv_intq(x_ptr + pid_m.to(tl.int64) * stride_xm, qw_ptr, s_ptr, z_ptr, perm_ptr, 0, N, K, N,
                        pid_n * BLOCK_N, qm if BITS == 4 else (qm << 4) | qm, k_lo, k_lo + k_per_split,
                        BITS, G, HAS_ZERO, HAS_PERM, BLOCK_N, BLOCK_K, EVK, PDL, F16)[None, :]
        offs_m = pid_m + tl.arange(0, 1)
    splitk_store(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
                 pid_k, split, USE_SPLIT)


@triton.jit(do_not_specialize=["M", "split"])
def _intq_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, G, stride_xm, stride_om, stride_q, stride_s, stride_z,
                      k_per_split, split,
                      BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
                      SCALE_AFTER: tl.constexpr, FIELD_DOTS: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ZSYM: tl.constexpr = MAGIC_C + (1 << (BITS - 1))
    pid, pid_k, offs_m, m_mask, offs_n, n_mask, offs_k, k_lo, k_hi = gemm_tile(M, N, K, k_per_split, BLOCK_M,
                                                                              BLOCK_N, BLOCK_K)
    shift = ((offs_k % PF) * BITS)[:, None]            # tiles start at multiples of PF
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    R: tl.constexpr = BLOCK_K // PF
    if SWAP:        # int4, tile in one group: out^T [BN, BM] += W^T x^T (quant.int4_swap_tiles)
        acc_t = int4_swap_tiles(tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), qw_ptr, stride_q, s_ptr, stride_s,
                                z_ptr, stride_z, offs_n, n_mask, x_rows, m_mask[:, None], perm_ptr, k_lo, k_hi, K, G,
                                HAS_ZERO, HAS_PERM, BLOCK_K)
        splitk_store(tl.trans(acc_t), out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid, pid_k,
                     split, USE_SPLIT)
        return
    if FIELD_DOTS:
        # int4, tile in one group: the [R, BN] word tile is loaded once and not reshuffled into K
        # order; field j of the words is the K sub-lattice k0 + 8 r + j: one dot per field
        rows = tl.arange(0, R)
        a_nxt = x_tile(x_rows, m_mask[:, None], perm_ptr, k_lo, k_hi, BLOCK_K, HAS_PERM)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rw = k0 // PF + rows
            w = tl.load(qw_ptr + rw[:, None] * stride_q + offs_n[None, :],
                        mask=(rw < K // PF)[:, None] & n_mask[None, :], other=0)      # [R, BN] int32
            a = a_nxt       # the next tile's activations load while this one computes
            a_nxt = x_tile(x_rows, m_mask[:, None], perm_ptr, k0 + BLOCK_K, k_hi, BLOCK_K, HAS_PERM)
            if SCALE_AFTER:
                g = k0 // G
                s_row = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                part = int4_field_dots(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), w,
                                       z_ptr + g * stride_z + offs_n, n_mask, a, HAS_ZERO)
                acc += part * s_row[None, :]
            else:           # groups smaller than the tile: each word row scaled before the dots
                acc = int4_field_dots_grouped(acc, w, s_ptr, stride_s, z_ptr, stride_z, k0, K, G, offs_n, n_mask,
                                              a, HAS_ZERO)
        splitk_store(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid, pid_k, split,
                     USE_SPLIT)
        return
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        # each word is read once per input row it holds (pf times, from L1): one dot per tile
        w = tl.load(qw_ptr + (kk // PF)[:, None] * stride_q + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)          # [BK, BN] int32
        q = ((w >> shift) & MASK) | 0x4B000000
        if SCALE_AFTER:     # the whole tile is in group k0 // G: exact integers (q - z) in the dot
            g = k0 // G
            s_row = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zc = MAGIC_C + tl.load(z_ptr + g * stride_z + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
            else:
                zc = ZSYM
            b = (q.to(tl.float32, bitcast=True) - zc).to(x_ptr.dtype.element_ty)
        else:               # groups smaller than the tile: dequantize each row
            g2 = kk // G
            m2 = k_mask[:, None] & n_mask[None, :]
            s2 = tl.load(s_ptr + g2[:, None] * stride_s + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zc = MAGIC_C + tl.load(z_ptr + g2[:, None] * stride_z + offs_n[None, :], mask=m2, other=0).to(tl.float32)
            else:
                zc = ZSYM
            b = ((q.to(tl.float32, bitcast=True) - zc) * s2).to(x_ptr.dtype.element_ty)
        if HAS_PERM:
            kx = tl.load(perm_ptr + kk, mask=k_mask, other=0)
        else:
            kx = kk
        a = tl.load(x_rows + kx[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if SCALE_AFTER:
            acc += tl.dot(a, b) * s_row[None, :]
        else:
            acc = tl.dot(a, b, acc)
    splitk_store(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid, pid_k, split,
                 USE_SPLIT)


@triton.jit
def _intq_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, n0, stride_q, stride_s, stride_z, stride_w,
                         BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[k, n - n0] = (code(k, n) - z) * s for BLOCK_R word rows and BLOCK_N columns from n0 (the
    stored row order; act-order callers permute x instead), in w's dtype."""
    intq_dequant_tile(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, n0, stride_q, stride_s, stride_z, stride_w,
                      BITS, HAS_ZERO, BLOCK_R, BLOCK_N)


@triton.jit
def intq_dequant_tile(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, n0, stride_q, stride_s, stride_z, stride_w,
                      BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                      perm_ptr=None, HAS_PERM: tl.constexpr = False):
    # program (i, j): word rows i*BLOCK_R.., columns n0 + j*BLOCK_N..; HAS_PERM: stored row k is
    # written to row perm[k] (act-order back to input order; perm a bijection of the K rows)
    PF: tl.constexpr = 32 // BITS
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = n0 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m2 = (r < K // PF)[:, None] & (cols < N)[None, :]
    q = tl.load(qw_ptr + r[:, None] * stride_q + cols[None, :], mask=m2, other=0)
    for j in tl.static_range(PF):
        kk = r * PF + j
        g = (kk // G)[:, None]
        sc = tl.load(s_ptr + g * stride_s + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * stride_z + cols[None, :], mask=m2, other=0).to(tl.float32)
        else:
            z = 2.0 ** (BITS - 1)
        v = (((q >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.float32) - z) * sc
        if HAS_PERM:
            kk = tl.load(perm_ptr + kk, mask=r < K // PF, other=0)
        tl.store(w_ptr + kk[:, None].to(tl.int64) * stride_w + (cols - n0)[None, :], v.to(w_ptr.dtype.element_ty),
                 mask=m2)


def _dequant_matmul(x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, G: int,
                    out: Tensor) -> None:
    """Many rows: out = x @ W (act-order: x already in the stored row order), W dequantized into
    x.dtype chunk by chunk of columns (a transient buffer of at most DEQUANT_CHUNK elements) and
    multiplied by cuBLAS; the weights stay packed in memory. Same rounding as the unfused path:
    each weight rounded once to x.dtype."""
    K, N = x2.shape[1], out.shape[1]
    nc = min(N, max(128, DEQUANT_CHUNK // K // 128 * 128))
    w = torch.empty(K, nc, dtype=x2.dtype, device=x2.device)
    zp = zeros if zeros is not None else scales
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        wc = w[:, : n1 - n0]
        _intq_dequant_kernel[(cdiv(K // (32 // bits), 16), cdiv(n1 - n0, 128))](
            qweight, scales, zp, wc, n1, K, G, n0, qweight.stride(0), scales.stride(0),
            zeros.stride(0) if zeros is not None else 0, wc.stride(0),
            BITS=bits, HAS_ZERO=zeros is not None, BLOCK_R=16, BLOCK_N=128, num_warps=4)
        torch.mm(x2, wc, out=out[:, n0:n1])


def intq_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                          perm: Tensor | None, bits: int, group_size: int) -> Tensor:
    """Readable spec, fp32: dequantize the stored rows, then y = x[:, perm] @ W_stored.
    x: [M, K] -> [M, N] float32."""
    pf = 32 // bits
    KP, N = qweight.shape
    K = KP * pf
    G = K if group_size in (-1, None) else group_size
    shifts = torch.arange(pf, device=qweight.device, dtype=torch.int32) * bits
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(K, N).float()
    g = torch.arange(K, device=qweight.device) // G
    z = zeros[g].float() if zeros is not None else float(1 << (bits - 1))
    w_stored = (q - z) * scales[g].float()                      # [K, N], row k = input perm[k]
    xf = x.float()
    if perm is not None:
        xf = xf[:, perm.long()]
    return xf @ w_stored


def intq_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                perm: Tensor | None, bits: int, group_size: int) -> Tensor:
    """y = x @ dequant(W).T. x: [..., K] bf16/fp16 (fp32 accepted) -> [..., N] in x.dtype."""
    return intq_linear_cfg(x, qweight, scales, zeros, perm, bits, group_size, None)


def intq_linear_cfg(x, qweight, scales, zeros, perm, bits, group_size, cfg: dict | None) -> Tensor:
    """intq_linear with an explicit launch config (None: configs.get); the benchmark tunes with it."""
    if bits not in (4, 8):
        raise FormatError(f"intq_linear: unsupported bits={bits}, expected 4 or 8")
    pf = 32 // bits
    K = x.shape[-1]
    if K % pf:
        raise ShapeMismatch(f"intq_linear: K={K} is not a multiple of {pf} ({bits}-bit codes per int32)")
    if qweight.dim() != 2:
        raise ShapeMismatch(f"intq_linear: qweight has shape {tuple(qweight.shape)}, expected [K/{pf}, N]")
    N = qweight.shape[1]
    if qweight.shape[0] * pf != K:
        raise ShapeMismatch(f"intq_linear: activation has K={K} input features, qweight "
                            f"{tuple(qweight.shape)} holds K={qweight.shape[0] * pf}")
    G = K if group_size in (-1, None) else int(group_size)
    if G <= 0 or (G < K and G % pf):
        raise FormatError(f"intq_linear: group_size={group_size} must be -1 or a positive multiple of {pf}")
    ng = cdiv(K, G)
    dev = qweight.device
    check_tensor(qweight, "intq_linear qweight", (K // pf, N), (torch.int32,), dev)
    check_tensor(scales, "intq_linear scales", (ng, N), (torch.float16, torch.bfloat16, torch.float32), dev)
    if zeros is not None:
        check_tensor(zeros, "intq_linear zeros", (ng, N), (torch.uint8,), dev)
    if perm is not None:
        check_tensor(perm, "intq_linear perm", (K,), (torch.int32,), dev)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.stride(1) != 1:
            raise FormatError(f"intq_linear {name}: columns (N) must be contiguous, strides {t.stride()}")
    if perm is not None and perm.stride(0) != 1:
        perm = perm.contiguous()
    lead = x.shape[:-1]
    x2 = check_x(x, K, "intq_linear x")
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    c = cfg if cfg is not None else intq_config(bits, M, N, K, G, x2.dtype, act_order=perm is not None)
    if c.get("mma") and not mma_fits(bits, G, perm, x2, qweight, c["BN"]):
        # the row the tiles replaced (TUNED), else the word loops of the same shape
        c = c.get("alt") or dict(c, mma=False, BM=min(c["BM"], 4))
    if perm is not None and (c["path"] in ("dequant", "swap")
                             or (c["path"] == "gemm" and M * N * K >= PERMUTE_X_MIN_MNK)):
        # act-order: the activations in the weight's row order once per call, instead of every N
        # tile program gathering its x tile through perm (the GEMV keeps its gather)
        x2, perm = x2.index_select(1, perm), None
    zp = zeros if zeros is not None else scales      # dummy pointers, never read
    pp = perm if perm is not None else qweight
    if c["path"] == "dequant":
        _dequant_matmul(x2, qweight, scales, zeros, bits, G, out)
    elif c["path"] == "gemv":
        for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
            if t is not None and t.stride(0) != N:
                raise FormatError(f"intq_linear {name}: the gemv kernel needs rows of stride N={N}, got "
                                  f"strides {t.stride()} (pass a contiguous tensor)")
        tile = max(_pow2_floor(c["BK"]), 16 * pf)      # >= 16 word rows per tile
        mma = c.get("mma", False)
        if mma:
            # K splits of whole 128-input groups; 1 row per program at M = 1, else 8 (B columns)
            tile, mr = 128, (1 if M == 1 else 8)
        split, per = split_plan(K, tile, c["split"])
        nb = cdiv(N, c["BN"])
        if not mma:
            # BM (1, 2 or 4) rows per program: int4 with 16-bit activations only (gemv_int4_rows)
            mr = min(c["BM"], next_power_of_2(M)) if bits == 4 and x2.dtype != torch.float32 else 1
            if mr not in (1, 2, 4):
                raise FormatError(f"intq_linear: gemv config BM={c['BM']}; its programs take 1, 2 or 4 rows")
        nm = cdiv(M, mr)
        ws, cnt = split_workspace(split, M, N, nm * nb, x2.device)
        # 15: the 4-bit code mask as a run-time value (it stays in a register; see gemv_intq)
        _intq_gemv_kernel[(nm, nb, split)](
            x2, qweight, scales, zp, pp, out, ws, cnt, M, N, K, x2.stride(0), out.stride(0), 15, per, split,
            BITS=bits, G=G, HAS_ZERO=zeros is not None, HAS_PERM=perm is not None, BLOCK_N=c["BN"],
            BLOCK_K=tile, EVK=K % tile == 0, USE_SPLIT=split > 1, F16=per >= F16_MIN_K, MR=mr,
            MMA=c["warps"] if mma else 0, num_warps=c["warps"], num_stages=c["stages"], **pdl.launch_kw(x2))
    else:
        tile = _gemm_tile(c, pf)
        scale_after = _scale_after(G, K, tile)
        field_dots = _field_dots(bits, c, pf, x2.dtype)
        swap = c["path"] == "swap"
        if swap and not (tile == 128 and _swap_tiles_take(bits, G, K, x2.dtype)):
            raise FormatError(f"intq_linear: the swap tiles take int4, K tiles of 128 inside one group and "
                              f"16-bit activations; got bits={bits}, tile {tile}, group {G}, {x2.dtype}")
        split, per = split_plan(K, tile, c["split"])
        stride_z = zeros.stride(0) if zeros is not None else 0
        common = (M, N, K, G, x2.stride(0), out.stride(0), qweight.stride(0), scales.stride(0), stride_z)
        nt = cdiv(M, c["BM"]) * cdiv(N, c["BN"])
        ws, cnt = split_workspace(split, M, N, nt, x2.device)
        _intq_gemm_kernel[(nt, split)](
            x2, qweight, scales, zp, pp, out, ws, cnt, *common, per, split,
            BITS=bits, HAS_ZERO=zeros is not None, HAS_PERM=perm is not None, SCALE_AFTER=scale_after,
            FIELD_DOTS=field_dots, SWAP=swap, BLOCK_M=c["BM"], BLOCK_N=c["BN"], BLOCK_K=tile, USE_SPLIT=split > 1,
            num_warps=c["warps"], num_stages=c["stages"], **pdl.launch_kw(x2))
    return out.reshape(*lead, N)


# int4 GEMMs up to this many rows take BM-16 per-field tiles (intq_config). H100, session 12,
# group 128, this vs the tuned rows (BM 32-64), bench-kernels shapes: M = 17-128 faster on 31 of
# 34 points (235B qkv M=32 36.0 vs 75.8 µs, 30B qkv 14.6 vs 20.4; slower: 235B o_proj M=64 55.9 vs
# 50.2, 235B down M=64 14.7 vs 14.5, lm_head M=128 701.8 vs 672.2), M=256 slower on 4 of 8 (30B
# o_proj 52.6 vs 40.7); benchmarks/moe_diag/session12_int4_gemm_field_vs_tuned_h100.log
FIELD_MAX_M = 128


def intq_config(bits: int, M: int, N: int, K: int, G: int, dtype: torch.dtype, act_order: bool = False) -> dict:
    """The launch config intq_linear takes: configs.get (tuned with group 128), except the
    "dequant" path (dequantize + cuBLAS) where dequant_fits, and for int4 from 17 rows the "swap" tiles
    where swap_fits, else BM-16 per-field tiles (to FIELD_MAX_M rows, and at any
    M for groups smaller than a tuned row's K tile, which would otherwise stage [BK, BN] scales
    and zeros too: 2-4x slower, and past the 227 KB of shared memory with the tuned rows; session
    12, group 32, 235B qkv M=32 138.0 -> 36.3 µs). fp32 activations have no per-field dots: small
    groups take the defaults, sized for staged scales. A row on the tensor-core GEMV ("mma") that
    this call cannot take (mma_takes: act-order, groups under 128, fp32 x) goes back to the row it
    replaced ("alt"), or to the default."""
    if dequant_fits(bits, M, N, K):
        return configs.cfg("dequant", M, 128, 128, 1, 4, 1)
    pf = 32 // bits
    c = configs.get(f"intq{bits}", M, N, K)
    if c.get("mma") and not mma_takes(bits, G, act_order, dtype, N, c["BN"]):
        c = dict(c["alt"]) if "alt" in c else configs.default(f"intq{bits}", M, N, K)
    if c["path"] != "gemm" or (M <= 16 and _field_dots(bits, c, pf, dtype)):
        return c
    if swap_fits(bits, M, N, K, G, dtype):
        BM = min(128, next_power_of_2(M))
        BN, warps = (128, 8) if N >= SWAP_WIDE_MIN_N else (64, 4)
        return configs.cfg("swap", BM, BN, 128, configs.auto_split(M, N, K, BM, BN, 128), warps, 3)
    small = not _scale_after(G, K, _gemm_tile(c, pf))
    field = field_tiles_config(M, N, K)
    if _field_dots(bits, field, pf, dtype) and (M <= FIELD_MAX_M or small):
        return field
    return configs.default(f"intq{bits}", M, N, K) if small else c


def field_tiles_config(M: int, N: int, K: int) -> dict:
    """The BM-16 per-field tile row: BN 128, K tiles of 128, auto split, 4 warps, 3 stages."""
    return configs.cfg("gemm", 16, 128, 128, configs.auto_split(M, N, K, 16, 128, 128), 4, 3)


# int4 GEMMs of 17..DEQUANT_MIN_M-1 rows on weights of at least SWAP_MIN_NK elements take the swap
# tiles (BM = rows rounded up to a power of two up to 128, BN 64, auto split); from DEQUANT_MIN_M
# rows int4 weights are dequantized (chunks of DEQUANT_CHUNK elements) for cuBLAS (dequant_fits).
# H100, session 13, group 128, bench-kernels shapes, against what the library took before (BM-16
# per-field tiles to 128 rows, the tuned rows above): swap 1.24-1.93x faster at M = 17-64 (235B
# o_proj M=64 55.3 -> 29.0 µs, 30B qkv 20.1 -> 15.4, lm_head 367.4 -> 190.8); dequantize + cuBLAS
# 1.21-5.5x at M = 128-2048 (235B qkv M=2048 1289.4 -> 252.1, bf16 F.linear 199.3; M=128 107.8 ->
# 70.5, where the swap tiles took 81.6); group 32 alike from 128 rows (benchmarks/linear_raw/
# session13_int4_lib_ab_g*_h100.log, session13_int4_swap_vs_before_deqmm_h100.log). Weights under
# SWAP_MIN_NK (30B expert shapes) measured no faster with swap tiles at 64-128 rows.
SWAP_MIN_M = 17
SWAP_MIN_NK = 1 << 22
# Swap tiles of BN 128 / 8 warps (one program per SM at ~178 registers) instead of BN 64 / 4 for
# outputs this wide (a vocabulary head). H100, session 30, `scripts/bench_int4_gemm.py --swap-tiles
# --ms 32,64,96 --groups 128`, µs BN 64 / 128: 30B lm_head M=32 142.3 / 117.9, M=64 184.2 / 145.0,
# M=96 329.4 / 281.1; the attention / expert shapes (N <= 9216) mostly lost (235B o_proj M=64 28.8 /
# 31.5, 30B qkv M=96 21.2 / 28.7; won only 235B o_proj M=32 21.0 / 19.1, qkv M=96 65.3 / 61.2).
# The library then (same script, next call): lm_head M=32 143.7 -> 117.7, M=64 190.5 -> 145.5, M=96
# 342.2 -> 280.9. linear_raw/session30_int4_swap_tiles_h100.log, session30_int4_swap_tiles_wide_lib_h100.log.
SWAP_WIDE_MIN_N = 1 << 16
DEQUANT_MIN_M = 128
DEQUANT_CHUNK = 1 << 25      # elements of the transient dequantized weight (64 MB in bf16)
# act-order GEMMs (not the GEMVs) permute x once per call (x.index_select, one more launch of ~3-5
# µs) on the dequantize path, the swap tiles and from this many M * N * K on the other tiles, else
# gather x through perm in every program.
# H100, session 29, `scripts/bench_int4_gemm.py --act-order --ms 2,4,8,16,17,32,64,96 --groups 128`,
# gather -> permuted once, µs, two runs each (linear_raw/session29_int4_act_order_permute_x_ab_h100.log):
# swap tiles 235B qkv M=64 309.8 -> 42.6, M=96 547.4 -> 69.2, 30B qkv M=17 28.0 -> 16.9, lm_head M=64
# 2260 -> 194, 235B down M=17 16.3 -> 13.6 (faster at every swap point); BM-16 tiles 235B qkv M=4
# 29.0 -> 24.9 (1.5e8), 30B qkv M=16 17.5 -> 15.4 (1.7e8), lm_head M=4 137 -> 101; below the bound
# slower: 30B qkv M=4 10.4 -> 15.8 (4e7), 235B o_proj M=4 20.3 -> 22.6 (1.3e8), 30B down M=16 7.1 ->
# 10.5; above it one loss, 30B gate_up M=64 15.5 -> 17.7 (2e8)
PERMUTE_X_MIN_MNK = 150_000_000


def mma_takes(bits: int, G: int, act_order: bool, dtype: torch.dtype, N: int, BN: int) -> bool:
    """Whether a gemv config's "mma" can run on the tensor cores (gemv_mma) for such a linear: int4
    codes in K order (no act-order perm), groups of 128 inputs or a multiple, 16-bit activations,
    32 or 64 columns per program, N a multiple of 4 (each lane's 2-4 words one aligned vector:
    gemv_mma._words)."""
    return (bits == 4 and not act_order and G % 128 == 0 and dtype != torch.float32 and BN in (32, 64)
            and N % 4 == 0)


def mma_fits(bits: int, G: int, perm: Tensor | None, x2: Tensor, qweight: Tensor, BN: int) -> bool:
    """mma_takes for these tensors, with the alignments the tiles assume: activation rows 4-byte
    aligned, qweight 16-byte aligned."""
    return (mma_takes(bits, G, perm is not None, x2.dtype, qweight.shape[1], BN)
            and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0 and qweight.data_ptr() % 16 == 0)


def swap_fits(bits: int, M: int, N: int, K: int, G: int, dtype: torch.dtype) -> bool:
    """Whether intq_linear takes the swap tiles (intq_config): int4, 16-bit activations, K tiles of
    128 inside one group, from SWAP_MIN_M rows until the dequant path takes over, N * K >=
    SWAP_MIN_NK."""
    return (_swap_tiles_take(bits, G, K, dtype) and M >= SWAP_MIN_M and not dequant_fits(bits, M, N, K)
            and N * K >= SWAP_MIN_NK)


def _swap_tiles_take(bits: int, G: int, K: int, dtype: torch.dtype) -> bool:
    """Whether the swap tiles can compute this linear at all (K tiles of 128): int4 codes, every K
    tile inside one group, 16-bit activations (the dot operands)."""
    return bits == 4 and dtype != torch.float32 and _scale_after(G, K, 128)


def dequant_fits(bits: int, M: int, N: int, K: int) -> bool:
    """Whether intq_linear dequantizes for cuBLAS (intq_config): from DEQUANT_MIN_M rows; int4
    weights of more than one DEQUANT_CHUNK only from twice that many rows (at 128 rows the
    transient write of the 151936 x 2048 head cost more than the swap tiles: 528.4 vs 321.4 µs).
    8-bit (H100, session 13, group 128, against the tuned rows): 30B qkv M=128 35.5 -> 18.5 µs,
    235B qkv 122.2 -> 76.5, M=2048 1218.8 -> 238.9, lm_head M=128 628.7 -> 575.3; at 64 rows
    mixed (235B o_proj 40.4 vs 64.0), so 128 as for int4 (linear_raw/session13_intq8_dequant_h100.log)."""
    if M < DEQUANT_MIN_M:
        return False
    return bits == 8 or (bits == 4 and (N * K <= DEQUANT_CHUNK or M >= 2 * DEQUANT_MIN_M))


def _field_dots(bits: int, c: dict, pf: int, dtype: torch.dtype) -> bool:
    """Whether the GEMM takes per-field dots (int4, K tiles of >= 16 words, BM 16, bf16/fp16):
    the activations come as one prefetched tile (quant.x_tile), the codes are never reshuffled
    into K order; groups smaller than the tile scale each word row before the dots (a word lies
    in one group). BM >= 32 tiles would go to wgmma, whose B operand round-trips shared memory
    per dot (session 4)."""
    return (c["path"] == "gemm" and bits == 4 and _gemm_tile(c, pf) // pf >= 16 and c["BM"] == 16
            and dtype != torch.float32)


def _gemm_tile(c: dict, pf: int) -> int:
    """The GEMM's K tile for config c (pf codes per word)."""
    return max(_pow2_floor(c["BK"]), 16, pf)


def _scale_after(G: int, K: int, tile: int) -> bool:
    """Whether every K tile lies in one group: exact integer dots, scaled after (else the tile
    stages its scales and zeros)."""
    return G >= K or G % tile == 0


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)
