"""Attention kernels for the cached forward: the q/k RMSNorm + RoPE + KV-cache write after the
qkv projection (one launch for all heads), and FlashDecoding-style attention of one new token per
sequence over the cache (split over the cache length, then a small combine launch).

References: layers/attention.py (q_norm/k_norm, apply_rope, KVCache.update, SDPA with
KVCache.mask). The norm + RoPE kernel rounds each step to the activation dtype where the
reference does, so it matches it closely; attention matches SDPA to bf16/fp16 rounding.
No host syncs: lengths come from shapes, positions and starts are read on the device.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl


@triton.jit
def _rnd(v, like):
    """Round fp32 v to the dtype of `like` and back (the reference's intermediate rounding)."""
    return v.to(like.dtype).to(tl.float32)


@triton.jit
def _norm_rope(x1, x2, w_ptr, cos_ptr, sin_ptr, rh, eps, HD: tl.constexpr):
    """RMSNorm then rotate-half RoPE of one head given as halves x1, x2 [HD] (activation dtype)."""
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    r = tl.rsqrt((tl.sum(a1 * a1, axis=0) + tl.sum(a2 * a2, axis=0)) / (2 * HD) + eps)
    n1 = _rnd(tl.load(w_ptr + rh).to(tl.float32) * _rnd(a1 * r, x1), x1)
    n2 = _rnd(tl.load(w_ptr + HD + rh).to(tl.float32) * _rnd(a2 * r, x1), x1)
    c1, c2 = tl.load(cos_ptr + rh).to(tl.float32), tl.load(cos_ptr + HD + rh).to(tl.float32)
    s1, s2 = tl.load(sin_ptr + rh).to(tl.float32), tl.load(sin_ptr + HD + rh).to(tl.float32)
    o1 = _rnd(_rnd(n1 * c1, x1) + _rnd(-n2 * s1, x1), x1)
    o2 = _rnd(_rnd(n2 * c2, x1) + _rnd(n1 * s2, x1), x1)
    return o1, o2


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
                         qo_ptr, kc_ptr, vc_ptr,
                         s_q, s_k, s_v, s_cb, s_ch, s_cs, T, eps,
                         HQ: tl.constexpr, HK: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (tokens N = B*T, HQ + HK). Program (n, j): q head j -> qo[n, j]; or kv head j - HQ:
    normed+roped k and plain v -> cache[b, j - HQ, slot[n]]."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rh = tl.arange(0, HD)
    cs = cos_ptr + n * (2 * HD)
    sn = sin_ptr + n * (2 * HD)
    if j < HQ:
        src = q_ptr + n * s_q + j * (2 * HD)
        o1, o2 = _norm_rope(tl.load(src + rh), tl.load(src + HD + rh), qw_ptr, cs, sn, rh, eps, HD)
        dst = qo_ptr + (n * HQ + j) * (2 * HD)
        tl.store(dst + rh, o1.to(qo_ptr.dtype.element_ty))
        tl.store(dst + HD + rh, o2.to(qo_ptr.dtype.element_ty))
    else:
        h = j - HQ
        src = k_ptr + n * s_k + h * (2 * HD)
        o1, o2 = _norm_rope(tl.load(src + rh), tl.load(src + HD + rh), kw_ptr, cs, sn, rh, eps, HD)
        b = n // T
        off = b * s_cb + h * s_ch + tl.load(slot_ptr + n) * s_cs
        tl.store(kc_ptr + off + rh, o1.to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + off + HD + rh, o2.to(kc_ptr.dtype.element_ty))
        vs = v_ptr + n * s_v + h * (2 * HD)
        tl.store(vc_ptr + off + rh, tl.load(vs + rh).to(vc_ptr.dtype.element_ty))
        tl.store(vc_ptr + off + HD + rh, tl.load(vs + HD + rh).to(vc_ptr.dtype.element_ty))


def qk_norm_rope_store(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, q_w: Tensor, k_w: Tensor,
                       eps: float, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> Tensor:
    """q [B, T, HQ*D], k/v [B, T, HK*D] (rows may be strided views of one qkv output);
    cos/sin [B, T, D]; k_cache/v_cache [B', HK, S, D] (one layer, B' >= B, any strides with a
    contiguous last dim); slots [B, T] int64 cache slots (< S, not checked).
    Writes k (normed, roped) and v at the slots; returns q normed and roped [B, T, HQ, D]."""
    B, T, _ = q.shape
    D = k_cache.shape[-1]
    HQ, HK = q.shape[-1] // D, k.shape[-1] // D
    N = B * T
    q2, k2, v2 = (t.reshape(N, t.shape[-1]) for t in (q, k, v))
    for t in (q2, k2, v2):
        assert t.stride(-1) == 1
    qo = torch.empty(B, T, HQ, D, dtype=q.dtype, device=q.device)
    if N:
        _qk_norm_rope_kernel[(N, HQ + HK)](
            q2, k2, v2, cos.reshape(N, D).contiguous(), sin.reshape(N, D).contiguous(), q_w, k_w,
            slots.reshape(N).contiguous(), qo, k_cache, v_cache,
            q2.stride(0), k2.stride(0), v2.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            T, eps, HQ=HQ, HK=HK, HD=D // 2, num_warps=1, **pdl.launch_kw(q2))
    return qo


# ----------------------------------------------------------------------------------------------
# decode attention

@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, start_ptr, pos_ptr, o_ptr, part_ptr, ml_ptr,
                        s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, CHUNK, scale_log2,
                        HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BN: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (B, HK, splits); SPLIT: stride of the partials (1: unsplit, write o). The program reads cache slots [sp*CHUNK, (sp+1)*CHUNK) of kv head kh
    for the G query heads sharing it (padded to GP rows for tl.dot); visible slots are
    start[b]..pos[b], or only pos[b] when start > pos (a row of padding)."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    pos = tl.load(pos_ptr + b)
    lo = tl.maximum(tl.minimum(tl.load(start_ptr + b), pos), sp * CHUNK)
    hi = tl.minimum(pos + 1, (sp + 1) * CHUNK)
    rg = tl.arange(0, GP)
    gm = rg < G
    rd = tl.arange(0, D)
    heads = kh * G + rg
    q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + rd[None, :], mask=gm[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    kb = k_ptr + b * s_kb + kh * s_kh
    vb = v_ptr + b * s_vb + kh * s_vh
    for j0 in range(lo - lo % BN, hi, BN):
        j = j0 + tl.arange(0, BN)
        jm = (j >= lo) & (j < hi)
        k = tl.load(kb + j[:, None] * s_ks + rd[None, :], mask=jm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2                          # [GP, BN], log2 units
        s = tl.where(jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(vb + j[:, None] * s_vs + rd[None, :], mask=jm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    if SPLIT == 1:
        o = acc / l_i[:, None]
        tl.store(o_ptr + (b * HQ + heads)[:, None] * D + rd[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=gm[:, None])
    else:
        row = (b * HQ + heads) * SPLIT + sp                                # [GP]
        tl.store(part_ptr + row[:, None] * D + rd[None, :], acc, mask=gm[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=gm)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=gm)


@triton.jit
def _decode_combine_kernel(part_ptr, ml_ptr, o_ptr, NS, SPLIT: tl.constexpr, D: tl.constexpr,
                           PDL: tl.constexpr = False):
    """Grid (B * HQ): merge the NS <= SPLIT partial softmax sums of one (sequence, head)."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    r = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, SPLIT)
    sm = rs < NS
    m = tl.load(ml_ptr + (r * SPLIT + rs) * 2, mask=sm, other=float("-inf"))
    l = tl.load(ml_ptr + (r * SPLIT + rs) * 2 + 1, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - mx), 0.0)                # empty splits weigh 0
    acc = tl.load(part_ptr + (r * SPLIT + rs)[:, None] * D + tl.arange(0, D)[None, :], mask=sm[:, None],
                  other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + r * D + tl.arange(0, D), o.to(o_ptr.dtype.element_ty))


BLOCK_N = 64
TARGET_PROGRAMS = 264  # ~2 per SM on an H100: more splits only add combine work


def decode_splits(batch: int, kv_heads: int, length: int) -> tuple[int, int]:
    """(splits, chunk): split the cache length so B * HK * splits programs fill the GPU."""
    blocks = triton.cdiv(length, BLOCK_N)
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    split = min(triton.next_power_of_2(want), triton.next_power_of_2(blocks))
    split = min(split, 64)
    chunk = triton.cdiv(blocks, split) * BLOCK_N
    return triton.cdiv(length, chunk), chunk


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, pos: Tensor,
                     scale: float | None = None) -> Tensor:
    """One query per sequence over its cached keys. q [B, HQ, D] contiguous; k_cache/v_cache
    [B, HK, S, D] (contiguous last dim); start [B], pos [B] int64: visible slots start..pos
    (only pos when start > pos). Returns o [B, HQ, D] in q's dtype. scale: 1/sqrt(D) default."""
    B, HQ, D = q.shape
    HK, S = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HK
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    split, chunk = decode_splits(B, HK, S)
    q = q.contiguous()
    o = torch.empty_like(q)
    p2 = triton.next_power_of_2(split) if split > 1 else 1    # partials' stride, a power of two
    if split > 1:
        part = torch.empty(B * HQ * p2, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(B * HQ * p2, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = o
    _decode_attn_kernel[(B, HK, split)](
        q, k_cache, v_cache, start, pos, o, part, ml,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), chunk, scale * 1.4426950408889634,
        HQ=HQ, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BN=BLOCK_N, SPLIT=p2,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no TF32 rounding
        num_warps=4, num_stages=2, **pdl.launch_kw(q))
    if split > 1:
        _decode_combine_kernel[(B * HQ,)](part, ml, o, split, SPLIT=p2, D=D, num_warps=4, **pdl.launch_kw(q))
    return o
