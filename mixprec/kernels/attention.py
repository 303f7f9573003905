"""Attention kernels for the cached forward: the q/k RMSNorm + RoPE + KV-cache write after the
qkv projection (one launch for all heads; prefill), and FlashDecoding-style attention of one new
token per sequence over the cache (split over the cache length; the last split of a head to
finish merges the partials), which at decode also does the q/k norm + RoPE + cache write itself:
one launch between the qkv and o projections. And causal attention of a prompt's rest over a
cache row named on the device (prefill_attention: the rest-of-prompt CUDA graphs, which serve any
row and prefix length).

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

from ..errors import ShapeMismatch
from . import pdl
from .ints import cdiv, next_power_of_2
from .quant import split_counters


@triton.jit
def _rnd(v, like):
    """Round fp32 v to the dtype of `like` and back (the reference's intermediate rounding)."""
    return v.to(like.dtype).to(tl.float32)


@triton.jit
def _row_halves(ptr, rh, HD: tl.constexpr):
    """ptr[0:HD] and ptr[HD:2*HD] (a norm weight, a cos / sin row) as fp32 rows [1, HD]: loaded
    apart from _norm_rope, so that decode attention reads them before its wait."""
    return tl.load(ptr + rh).to(tl.float32)[None, :], tl.load(ptr + HD + rh).to(tl.float32)[None, :]


@triton.jit
def _cos_sin_halves(cos_ptr, sin_ptr, row, rh, HD: tl.constexpr):
    """(c1, c2, s1, s2): the halves of cos / sin row `row` (rows of 2*HD) as _row_halves gives them."""
    c1, c2 = _row_halves(cos_ptr + row * (2 * HD), rh, HD)
    s1, s2 = _row_halves(sin_ptr + row * (2 * HD), rh, HD)
    return c1, c2, s1, s2


@triton.jit
def _norm_rope(x1, x2, w1, w2, c1, c2, s1, s2, eps, HD: tl.constexpr):
    """RMSNorm then rotate-half RoPE of R heads given as halves x1, x2 [R, HD] (activation dtype),
    with the norm weight's (w), cos' (c) and sin's (s) halves (_row_halves). -> fp32 halves, rounded."""
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    r = tl.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HD) + eps)[:, None]
    n1 = _rnd(w1 * _rnd(a1 * r, x1), x1)
    n2 = _rnd(w2 * _rnd(a2 * r, x1), x1)
    o1 = _rnd(_rnd(n1 * c1, x1) + _rnd(-n2 * s1, x1), x1)
    o2 = _rnd(_rnd(n2 * c2, x1) + _rnd(n1 * s2, x1), x1)
    return o1, o2


@triton.jit
def _halves(o1, o2):
    """Halves [R, HD] -> rows [R, 2*HD] (o1 then o2)."""
    return tl.reshape(tl.permute(tl.join(o1, o2), (0, 2, 1)), (o1.shape[0], 2 * o1.shape[1]))


@triton.jit
def _new_kv(k_ptr, v_ptr, rh, HD: tl.constexpr):
    """The new token's k and v halves of one kv head [1, HD] each, as the projection wrote them."""
    r2 = rh[None, :]
    return tl.load(k_ptr + r2), tl.load(k_ptr + HD + r2), tl.load(v_ptr + r2), tl.load(v_ptr + HD + r2)


@triton.jit
def _store_new_kv(kx1, kx2, vx1, vx2, kc_ptr, vc_ptr, off, w1, w2, c1, c2, s1, s2, rh, eps, HD: tl.constexpr):
    """The new token's kv head (_new_kv's halves): k (normed with k_norm's weight and roped:
    _row_halves' rows) and v [2*HD] to the cache slot at kc_ptr + off / vc_ptr + off. -> (k, v)
    as stored, rows [1, 2*HD]."""
    r2 = rh[None, :]
    o1, o2 = _norm_rope(kx1, kx2, w1, w2, c1, c2, s1, s2, eps, HD)
    k1, k2 = o1.to(kc_ptr.dtype.element_ty), o2.to(kc_ptr.dtype.element_ty)
    v1, v2 = vx1.to(vc_ptr.dtype.element_ty), vx2.to(vc_ptr.dtype.element_ty)
    tl.store(kc_ptr + off + r2, k1)
    tl.store(kc_ptr + off + HD + r2, k2)
    tl.store(vc_ptr + off + r2, v1)
    tl.store(vc_ptr + off + HD + r2, v2)
    return _halves(k1, k2), _halves(v1, v2)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, row_ptr,
                         qo_ptr, kc_ptr, vc_ptr,
                         s_q, s_k, s_v, s_cb, s_ch, s_cs, T, eps,
                         HQ: tl.constexpr, HK: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr = False,
                         ROPE_POS: tl.constexpr = False, ROWS: tl.constexpr = False):
    """Grid (tokens N = B*T, HQ + HK). Program (n, j): q head j -> qo[n, j]; or kv head j - HQ:
    normed+roped k and plain v -> cache[b, j - HQ, slot[n]] for token n's sequence b = n // T,
    or (ROWS) cache[rows[b], ...]. cos / sin rows: token n's, or (ROPE_POS) row slot[n] of a
    table by position."""
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rh = tl.arange(0, HD)
    crow = tl.load(slot_ptr + n) if ROPE_POS else n
    r2 = tl.arange(0, HD)[None, :]
    c1, c2, s1, s2 = _cos_sin_halves(cos_ptr, sin_ptr, crow, rh, HD)
    if j < HQ:
        src = q_ptr + n * s_q + j * (2 * HD)
        w1, w2 = _row_halves(qw_ptr, rh, HD)
        o1, o2 = _norm_rope(tl.load(src + r2), tl.load(src + HD + r2), w1, w2, c1, c2, s1, s2, eps, HD)
        dst = qo_ptr + (n * HQ + j) * (2 * HD)
        tl.store(dst + r2, o1.to(qo_ptr.dtype.element_ty))
        tl.store(dst + HD + r2, o2.to(qo_ptr.dtype.element_ty))
    else:
        h = j - HQ
        cb = tl.load(row_ptr + n // T) if ROWS else n // T
        off = cb * s_cb + h * s_ch + tl.load(slot_ptr + n) * s_cs
        w1, w2 = _row_halves(kw_ptr, rh, HD)
        kx1, kx2, vx1, vx2 = _new_kv(k_ptr + n * s_k + h * (2 * HD), v_ptr + n * s_v + h * (2 * HD), rh, HD)
        _store_new_kv(kx1, kx2, vx1, vx2, kc_ptr, vc_ptr, off, w1, w2, c1, c2, s1, s2, rh, eps, HD)


def _check_rows(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ShapeMismatch(f"attention kernels: {name} {tuple(t.shape)} needs a contiguous last dim, "
                                f"strides {t.stride()}")


def qk_norm_rope_store(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, q_w: Tensor, k_w: Tensor,
                       eps: float, k_cache: Tensor, v_cache: Tensor, slots: Tensor, rope_table: bool = False,
                       rows: Tensor | None = None) -> Tensor:
    """q [B, T, HQ*D], k/v [B, T, HK*D] (rows may be strided views of one qkv output);
    cos/sin [B, T, D], or (rope_table) [P, D] by position (P > every slot); k_cache/v_cache
    [B', HK, S, D] (one layer, any strides with a contiguous last dim); slots [B, T] int64
    cache slots = positions (< S, not checked); rows [B] int64: sequence b's cache row (default b).
    Writes k (normed, roped) and v at the slots; returns q normed and roped [B, T, HQ, D]."""
    B, T, _ = q.shape
    D = k_cache.shape[-1]
    HQ, HK = q.shape[-1] // D, k.shape[-1] // D
    N = B * T
    q2, k2, v2 = (t.reshape(N, t.shape[-1]) for t in (q, k, v))
    _check_rows(q2, k2, v2)
    qo = torch.empty(B, T, HQ, D, dtype=q.dtype, device=q.device)
    if N:
        _qk_norm_rope_kernel[(N, HQ + HK)](
            q2, k2, v2, *_rope_rows(cos, sin, N, D, rope_table), q_w, k_w,
            slots.reshape(N).contiguous(), slots if rows is None else rows, qo, k_cache, v_cache,
            q2.stride(0), k2.stride(0), v2.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            T, eps, HQ=HQ, HK=HK, HD=D // 2, ROPE_POS=rope_table, ROWS=rows is not None, num_warps=1,
            **pdl.launch_kw(q2))
    return qo


def _rope_rows(cos: Tensor, sin: Tensor, N: int, D: int, table: bool) -> tuple[Tensor, Tensor]:
    # the kernels read row n (or, from a table, row position) at offset row * D
    if table:
        if (cos.dim() != 2 or cos.shape[1] != D or cos.stride() != (D, 1) or sin.shape != cos.shape
                or sin.stride() != (D, 1)):
            raise ShapeMismatch(f"attention kernels: a RoPE table must be contiguous [P, {D}], got cos "
                                f"{tuple(cos.shape)} / sin {tuple(sin.shape)}")
        return cos, sin
    return cos.reshape(N, D).contiguous(), sin.reshape(N, D).contiguous()


# ----------------------------------------------------------------------------------------------
# decode attention

@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, start_ptr, pos_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr,
                        kn_ptr, vn_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                        s_q, s_kn, s_vn, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, CHUNK, scale_log2, eps,
                        HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BN: tl.constexpr, SPLIT: tl.constexpr, SC: tl.constexpr, NEW: tl.constexpr,
                        PREC: tl.constexpr, PDL: tl.constexpr = False, ROPE_POS: tl.constexpr = False,
                        ONE_TILE: tl.constexpr = False):
    """Grid (B, HK, splits). Program (b, kh, sp) reads cache slots [sp*CHUNK, (sp+1)*CHUNK) of kv
    head kh for the G query heads sharing it (padded to GP rows for tl.dot); visible slots are
    start[b]..pos[b], or only pos[b] when start > pos (a row of padding).
    NEW: q rows are the raw projection (row stride s_q): q/k RMSNorm + RoPE here, and the split
    holding slot pos[b] first writes the new token's k, v there (what _qk_norm_rope_kernel does).
    ONE_TILE (CHUNK == BN: batch-1 decode up to 4096 slots): a split is one K / V tile, loaded
    first; with NEW before the wait for the qkv projection (slots < pos are older than it; the row
    at pos is replaced by the new k, v in registers), so the tile's memory latency overlaps that
    wait and the q norm / RoPE instead of following them.
    SPLIT > 1 (the partials' stride): each split stores its partial softmax sums; the last of a
    (b, kh)'s splits to arrive (counter, reset after) merges them into o. cos / sin rows (NEW):
    row b, or (ROPE_POS) row pos[b] of a table by position."""
    pdl.launch_dependents(PDL)   # o_proj may start now: it prefetches weights while this runs
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    kb = k_ptr + b * s_kb + kh * s_kh
    vb = v_ptr + b * s_vb + kh * s_vh
    rd = tl.arange(0, D)
    EARLY: tl.constexpr = ONE_TILE and NEW   # pos / start and the cached slots are older than the qkv projection
    HD: tl.constexpr = D // 2
    rh = tl.arange(0, HD)
    if NEW:     # weights: off the path from the projection's output to the scores
        qw1, qw2 = _row_halves(qw_ptr, rh, HD)
        kw1, kw2 = _row_halves(kw_ptr, rh, HD)
    if EARLY:
        pos, lo, hi = _visible(pos_ptr, start_ptr, b, sp, CHUNK)
        k, v, j, jm = _kv_tile(kb, vb, sp * CHUNK, lo, hi, s_ks, s_vs, rd, BN)
        if ROPE_POS:    # a RoPE table is as old as the weights
            c1, c2, s1, s2 = _cos_sin_halves(cos_ptr, sin_ptr, pos, rh, HD)
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    if not EARLY:
        pos, lo, hi = _visible(pos_ptr, start_ptr, b, sp, CHUNK)
        if ONE_TILE:
            k, v, j, jm = _kv_tile(kb, vb, sp * CHUNK, lo, hi, s_ks, s_vs, rd, BN)
    LATE_ROPE: tl.constexpr = NEW and not (EARLY and ROPE_POS)
    if LATE_ROPE:     # cos / sin rows per token may come from the kernel just before
        c1, c2, s1, s2 = _cos_sin_halves(cos_ptr, sin_ptr, pos if ROPE_POS else b, rh, HD)
    rg = tl.arange(0, GP)
    gm = rg < G
    heads = kh * G + rg
    q_rows = q_ptr + b * s_q + heads[:, None] * D
    if NEW:
        q1 = tl.load(q_rows + rh[None, :], mask=gm[:, None], other=0.0)
        q2 = tl.load(q_rows + HD + rh[None, :], mask=gm[:, None], other=0.0)
        # every split loads the new k / v with q (4 rows of 64): for the split that stores them
        # they are then in registers when q's norm / RoPE is done
        kx1, kx2, vx1, vx2 = _new_kv(kn_ptr + b * s_kn + kh * D, vn_ptr + b * s_vn + kh * D, rh, HD)
        o1, o2 = _norm_rope(q1, q2, qw1, qw2, c1, c2, s1, s2, eps, HD)
        q = _halves(o1, o2).to(q1.dtype)
        if sp == pos // CHUNK:      # this split reads slot pos: put the new token there first
            k_new, v_new = _store_new_kv(kx1, kx2, vx1, vx2, kb, vb, pos * s_ks, kw1, kw2, c1, c2, s1, s2, rh, eps, HD)
            if ONE_TILE:            # the tile was loaded before the store: its row pos from registers
                k = tl.where((j == pos)[:, None], k_new, k)
                v = tl.where((j == pos)[:, None], v_new, v)
            else:
                tl.debug_barrier()  # every thread's k / v stores precede the loads below
    else:
        q = tl.load(q_rows + rd[None, :], mask=gm[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    if ONE_TILE:
        if lo < hi:     # an empty split keeps m = -inf, l = 0 (a masked tile would make NaNs)
            p, alpha, m_i = _scores(q, k, jm, m_i, scale_log2, PREC)
            acc, l_i = _accumulate(acc, l_i, p, alpha, v, PREC)
    else:
        for j0 in range(lo - lo % BN, hi, BN):
            j, jm = _slots(j0, lo, hi, BN)
            p, alpha, m_i = _scores(q, _cache_rows(kb, j, jm, s_ks, rd), jm, m_i, scale_log2, PREC)
            acc, l_i = _accumulate(acc, l_i, p, alpha, _cache_rows(vb, j, jm, s_vs, rd), PREC)
    o_rows = o_ptr + (b * HQ + heads)[:, None] * D + rd[None, :]
    if SPLIT == 1:
        tl.store(o_rows, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        base = (b * HQ + heads) * SPLIT                                    # [GP] first partial row
        tl.store(part_ptr + (base + sp)[:, None] * D + rd[None, :], acc, mask=gm[:, None])
        tl.store(ml_ptr + (base + sp) * 2, m_i, mask=gm)
        tl.store(ml_ptr + (base + sp) * 2 + 1, l_i, mask=gm)
        tl.debug_barrier()  # all threads' partial stores precede the release below
        cnt = cnt_ptr + b * tl.num_programs(1) + kh
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == tl.num_programs(2) - 1:
            _merge_splits(part_ptr, ml_ptr, o_rows, base, gm, rd, tl.num_programs(2), GP, D, SPLIT, SC)
            tl.atomic_xchg(cnt, 0)  # ready for the next launch / graph replay


@triton.jit
def _visible(pos_ptr, start_ptr, b, sp, CHUNK):
    """(pos, lo, hi): the new token's slot and split sp's visible slots lo .. hi-1 of row b."""
    pos = tl.load(pos_ptr + b)
    return pos, tl.maximum(tl.minimum(tl.load(start_ptr + b), pos), sp * CHUNK), tl.minimum(pos + 1, (sp + 1) * CHUNK)


@triton.jit
def _slots(j0, lo, hi, BN: tl.constexpr):
    """Cache slots j0 .. j0+BN-1 [BN] and which of them are visible (lo .. hi-1)."""
    j = j0 + tl.arange(0, BN)
    return j, (j >= lo) & (j < hi)


@triton.jit
def _cache_rows(base, j, jm, stride, rd):
    """Rows j [BN] of one head's K or V cache [BN, D], zeros where jm is off."""
    return tl.load(base + j[:, None] * stride + rd[None, :], mask=jm[:, None], other=0.0)


@triton.jit
def _kv_tile(kb, vb, j0, lo, hi, s_ks, s_vs, rd, BN: tl.constexpr):
    """K and V of cache slots j0 .. j0+BN-1 [BN, D] (zeros outside lo..hi-1), the slots and the mask."""
    j, jm = _slots(j0, lo, hi, BN)
    return _cache_rows(kb, j, jm, s_ks, rd), _cache_rows(vb, j, jm, s_vs, rd), j, jm


@triton.jit
def _scores(q, k, jm, m_i, scale_log2, PREC: tl.constexpr):
    """Online softmax over one tile: q [GP, D] against k [BN, D] (mask jm [BN], at least one set)
    -> (p [GP, BN], the old sums' factor alpha [GP], the new row max [GP])."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2                          # [GP, BN], log2 units
    s = tl.where(jm[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    return tl.exp2(s - m_new[:, None]), tl.exp2(m_i - m_new), m_new


@triton.jit
def _accumulate(acc, l_i, p, alpha, v, PREC: tl.constexpr):
    """The running sums after one tile: acc [GP, D] += p V, l_i [GP] += row sums of p (both scaled by alpha)."""
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC), l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _merge_splits(part_ptr, ml_ptr, o_rows, base, gm, rd, NS, GP: tl.constexpr, D: tl.constexpr,
                  SPLIT: tl.constexpr, SC: tl.constexpr):
    """o = the NS partial softmax sums of each head row merged (empty splits weigh 0); SC splits'
    partials [GP, SC, D] per step. Reads bypass L1: other programs wrote them."""
    rs = tl.arange(0, SPLIT)
    mm = gm[:, None] & (rs[None, :] < NS)
    m = tl.load(ml_ptr + (base[:, None] + rs[None, :]) * 2, mask=mm, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(ml_ptr + (base[:, None] + rs[None, :]) * 2 + 1, mask=mm, other=0.0, cache_modifier=".cg")
    mx = tl.max(m, axis=1)
    mx = tl.where(mx > float("-inf"), mx, 0.0)                           # padding rows: no NaN
    den = tl.sum(l * tl.exp2(m - mx[:, None]), axis=1)
    o = tl.zeros([GP, D], tl.float32)
    rc = tl.arange(0, SC)
    for s0 in range(0, NS, SC):
        r = base[:, None] + s0 + rc[None, :]                               # [GP, SC] partial rows
        cm = gm[:, None] & (s0 + rc < NS)[None, :]
        w = tl.exp2(tl.load(ml_ptr + r * 2, mask=cm, other=float("-inf"), cache_modifier=".cg") - mx[:, None])
        a = tl.load(part_ptr + r[:, :, None] * D + rd[None, None, :], mask=cm[:, :, None], other=0.0,
                    cache_modifier=".cg")
        o += tl.sum(a * w[:, :, None], axis=1)
    o = o / tl.where(gm, den, 1.0)[:, None]
    tl.store(o_rows, o.to(o_rows.dtype.element_ty), mask=gm[:, None])


TARGET_PROGRAMS = 264  # ~2 per SM on an H100: more splits only add merge work
# the last split of a head merges them all, a few partials per step: fewer, longer splits at batch
# 1 on long caches (H100, scripts/bench_attention.py, session 17, µs, at most 64 -> 32 splits: 8192
# slots 17.5 -> 15.5, 32768 35.3 -> 34.1; 16 or 8 splits slower; with 4 kv heads only batch 1-2
# ask for more than 32)
MAX_SPLITS = 32
# partial-sum values the merge loads per step ([GP, SC, D] fp32; SC <= the splits, so only launches
# of more than 4 splits change with it). 8192 -> 32768 (H100, bench_attention.py, session 17, µs):
# batch 1 at 8192 slots 15.5 -> 14.3 (SDPA 14.4), 32768 34.2 -> 33.5; batch 2 at 8192 20.9 -> 18.8;
# batch 8 at 2048 18.3 -> 17.8. ptxas: 198 registers at 16 partials per step (152 at 4), no spills
MERGE_ELEMS = 32768
# 8 warps measured slower in decode (session 25, 16-layer 30B int4 experts: batch 8 -2.2%, 32 / 64
# -0.7 / -0.8%; the kernel alone +-4% either way; runtime/session25_attention_8warps_ab_h100.log)
DECODE_WARPS = 4
# ... but faster where few programs each carry 16 query heads (decode_warps)
WIDE_WARPS = 8
# a split of one tile loads it first (the kernel's ONE_TILE); False: the tile loop for every split
ONE_TILE = True


def block_n(length: int) -> int:
    """Cache slots per tile step for a cache of `length` slots. 128 from 2048 slots: at batch 1 a
    split of the cache is then one or a few longer steps instead of many short ones (H100,
    scripts/bench_attention.py, session 17, 30B shapes, µs, 64 -> 128: batch 1 at 2048 / 8192 /
    32768 slots 13.7 -> 8.8 / 25.3 -> 17.6 / 42.7 -> 35.0, batch 8-64 within +-1%); 64 from 512
    (batch 1 at 256 slots 5.5 vs 5.8, batch 32 11.5 vs 12.2); 32 below (session 24: batch 1 at 256
    slots 5.3 -> 4.4 µs, 512 equal, batch 8 equal, H100, runtime/session24_attention_splits_h100.log;
    16-layer 30B decode at 256 slots, H200, two runs each: int4 batch 1 1193.1 / 1191.7 -> 1212.3 /
    1212.5 tok/s, int8 974.8 / 974.6 -> 988.5 / 989.1, batch 8 +0.3-0.8%;
    runtime/session24_attention_bn32_ab_h200.log). 1024 slots take 64 (session 25, H100: batch 1
    6.4 -> 5.6 µs, batch 8 12.5 -> 11.5; runtime/session25_attention_variants_h100.log)."""
    return 128 if length >= 2048 else 64 if length >= 512 else 32


def decode_splits(batch: int, kv_heads: int, length: int) -> tuple[int, int]:
    """(splits, chunk): split the cache length so B * HK * splits programs fill the GPU."""
    bn = block_n(length)
    blocks = cdiv(length, bn)
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    split = min(next_power_of_2(want), next_power_of_2(blocks))
    split = min(split, MAX_SPLITS)
    chunk = cdiv(blocks, split) * bn
    return cdiv(length, chunk), chunk


def decode_warps(batch: int, kv_heads: int, group: int, length: int) -> int:
    """Warps per program: WIDE_WARPS when at most one program per SM (TARGET_PROGRAMS / 2) carries
    16 or more query heads, on caches of 1024 slots or more. H200, scripts/bench_attention.py --new
    --variants "ours,8 warps" (session 40, runtime/session40_attention_warps_h200.log), µs, 4 -> 8
    warps: 64 query / 4 kv heads (235B) at batch 1 (64-128 programs), 1024 / 4096 / 32768 slots
    7.5 -> 6.4 / 14.0 -> 10.1 / 38.0 -> 31.9, batch 2 at 2048 (128 programs) 12.3 -> 8.7; slower
    from 256 programs (batch 2 at 4096 15.3 -> 15.9, batch 4 at 1024 10.1 -> 11.6) and at 256 slots
    (batch 1 5.1 -> 6.2); with 8 query heads per kv head (30B) -4% to +6% of the time."""
    split, _ = decode_splits(batch, kv_heads, length)
    if group >= 16 and length >= 1024 and batch * kv_heads * split <= TARGET_PROGRAMS // 2:
        return WIDE_WARPS
    return DECODE_WARPS


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, pos: Tensor,
                     scale: float | None = None) -> Tensor:
    """One query per sequence over its cached keys. q [B, HQ, D] contiguous; k_cache/v_cache
    [B, HK, S, D] (contiguous last dim); start [B], pos [B] int64: visible slots start..pos
    (only pos when start > pos). Returns o [B, HQ, D] in q's dtype. scale: 1/sqrt(D) default."""
    q = q.contiguous()
    return _decode(q, q.shape[1], q.stride(0), k_cache, v_cache, start, pos, scale, None)


def decode_attention_new(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, q_w: Tensor, k_w: Tensor,
                         eps: float, k_cache: Tensor, v_cache: Tensor, start: Tensor, pos: Tensor,
                         scale: float | None = None, rope_table: bool = False) -> Tensor:
    """qk_norm_rope_store then decode_attention, in one launch, for one new token per sequence:
    q [B, HQ*D], k/v [B, HK*D] the raw projections (rows may be strided views of one qkv output);
    cos/sin [B, D], or (rope_table) [P, D] by position (P > every pos); q_w/k_w [D] the q/k norm
    weights; k_cache/v_cache [B, HK, S, D]; start, pos [B] int64 (pos = the new token's position
    and slot, < S, not checked).
    Writes the new k (normed, roped) and v at slot pos; returns o [B, HQ, D] in q's dtype."""
    B, D = q.shape[0], k_cache.shape[-1]
    _check_rows(q, k, v)
    new = (k, v, *_rope_rows(cos, sin, B, D, rope_table), q_w, k_w, eps)
    return _decode(q, q.shape[1] // D, q.stride(0), k_cache, v_cache, start, pos, scale, new, rope_table)


def _decode(q, HQ, s_q, k_cache, v_cache, start, pos, scale, new, rope_table=False) -> Tensor:
    B, D = q.shape[0], k_cache.shape[-1]
    HK, S = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    split, chunk = decode_splits(B, HK, S)
    bn = block_n(S)
    o = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    p2 = next_power_of_2(split) if split > 1 else 1    # partials' stride, a power of two
    if split > 1:
        part = torch.empty(B * HQ * p2, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(B * HQ * p2, 2, dtype=torch.float32, device=q.device)
        cnt = split_counters(q.device, B * HK)
    else:
        part = ml = cnt = o
    k, v, cos, sin, q_w, k_w, eps = new if new is not None else (o, o, o, o, o, o, 0.0)
    # the kernel reads start[b] / pos[b] at offset b: an expanded view (stride 0) must become real
    start, pos = start.contiguous(), pos.contiguous()
    GP = max(16, next_power_of_2(HQ // HK))
    _decode_attn_kernel[(B, HK, split)](
        q, k_cache, v_cache, start, pos, o, part, ml, cnt, k, v, cos, sin, q_w, k_w,
        s_q, k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), chunk, scale * 1.4426950408889634, eps,
        HQ=HQ, G=HQ // HK, GP=GP, D=D, BN=bn, SPLIT=p2, SC=max(1, min(p2, MERGE_ELEMS // (GP * D))),
        NEW=new is not None, ROPE_POS=rope_table, ONE_TILE=ONE_TILE and chunk == bn,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no TF32 rounding
        num_warps=decode_warps(B, HK, HQ // HK, S), num_stages=2, **pdl.launch_kw(q))
    return o


# ----------------------------------------------------------------------------------------------
# prefill attention over cache rows chosen on the device

PREFILL_ROWS = 128     # query rows (tokens x heads of one kv head) per program
PREFILL_BN = 64        # cache slots per tile
PREFILL_MAX_SPLITS = 32
PREFILL_MIN_SPLIT = 256    # cache slots a split covers at least (of the whole cache: the used part is not known)


@triton.jit
def _prefill_attn_kernel(q_ptr, k_ptr, v_ptr, row_ptr, pos_ptr, o_ptr, part_ptr, ml_ptr,
                         s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, T, scale_log2,
                         HQ: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr,
                         D: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(T, BT), HK, B * NS). Program (tb, kh, b * NS + sp): tokens tb*BT .. tb*BT+BT-1 of
    sequence b with the G query heads of kv head kh, as RP >= BT*G rows (row r: token r // G,
    head kh*G + r % G), so a K / V tile loaded once serves them all; over split sp of the slots
    its rows see (0 .. the largest pos, in NS parts: a few tokens over a long prefix still fill
    the GPU). Query (b, t) sees slots 0 .. pos[b, t] of cache row rows[b]. NS == 1: o directly;
    else each split's partial sums (acc, row max m, row sum l) for _prefill_merge_kernel. A row
    with nothing visible in a split keeps m = -inf, l = 0 (its max is taken as 0 there, no NaN)."""
    tb = tl.program_id(0)
    kh = tl.program_id(1)
    b = (tl.program_id(2) // NS).to(tl.int64)
    sp = tl.program_id(2) % NS
    r = tl.arange(0, RP)
    t = tb * BT + r // G
    rm = (r < BT * G) & (t < T)
    head = kh * G + r % G
    rd = tl.arange(0, D)
    pos = tl.load(pos_ptr + b * T + t, mask=rm, other=0)                                   # [RP]
    q_rows = (b * T + t) * HQ + head
    q = tl.load(q_ptr + q_rows[:, None] * D + rd[None, :], mask=rm[:, None], other=0.0)    # [RP, D]
    row = tl.load(row_ptr + b)
    kb = k_ptr + row * s_kb + kh * s_kh
    vb = v_ptr + row * s_vb + kh * s_vh
    hi = tl.max(pos, axis=0) + 1
    chunk = tl.cdiv(tl.cdiv(hi, NS), BN) * BN
    lo = sp * chunk
    hi = tl.minimum(hi, lo + chunk)
    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    for j0 in range(lo, hi, BN):
        j, jm = _slots(j0, lo, hi, BN)
        s = tl.dot(q, tl.trans(_cache_rows(kb, j, jm, s_ks, rd)), input_precision=PREC) * scale_log2   # [RP, BN]
        s = tl.where((j[None, :] <= pos[:, None]) & jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), _cache_rows(vb, j, jm, s_vs, rd), input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    if NS == 1:
        tl.store(o_ptr + q_rows[:, None] * D + rd[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=rm[:, None])
    else:
        part = q_rows * NS + sp
        tl.store(part_ptr + part[:, None] * D + rd[None, :], acc, mask=rm[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=rm)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=rm)


@triton.jit
def _prefill_merge_kernel(part_ptr, ml_ptr, o_ptr, N, NS: tl.constexpr, BR: tl.constexpr, D: tl.constexpr):
    """Grid (cdiv(N, BR)): rows n (of B*T*HQ) -> o[n] = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s."""
    n = tl.program_id(0) * BR + tl.arange(0, BR)
    nm = n < N
    rd = tl.arange(0, D)
    m = tl.full([BR], float("-inf"), tl.float32)
    for sp in range(NS):
        m = tl.maximum(m, tl.load(ml_ptr + (n * NS + sp) * 2, mask=nm, other=0.0))
    acc = tl.zeros([BR, D], tl.float32)
    l = tl.zeros([BR], tl.float32)
    for sp in range(NS):
        w = tl.exp2(tl.load(ml_ptr + (n * NS + sp) * 2, mask=nm, other=0.0) - m)       # 0 for an empty split
        l += w * tl.load(ml_ptr + (n * NS + sp) * 2 + 1, mask=nm, other=0.0)
        acc += w[:, None] * tl.load(part_ptr + (n * NS + sp)[:, None] * D + rd[None, :], mask=nm[:, None], other=0.0)
    l = tl.where(nm, l, 1.0)        # rows past N: no 0 / 0
    tl.store(o_ptr + n[:, None] * D + rd[None, :], (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=nm[:, None])


def prefill_splits(programs: int, slots: int) -> int:
    """Splits of the visible slots per program: enough for ~TARGET_PROGRAMS programs, each split
    at least PREFILL_MIN_SPLIT of the cache's slots."""
    return max(1, min(PREFILL_MAX_SPLITS, TARGET_PROGRAMS // programs, slots // PREFILL_MIN_SPLIT))


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor,
                      scale: float | None = None) -> Tensor:
    """Causal attention of T queries per sequence over its cache row, the row and the positions
    read on the device (so one CUDA graph serves any row and any prefix length): q [B, T, HQ, D]
    contiguous (qk_norm_rope_store's output); k_cache/v_cache [B', HK, S, D] (one layer, any
    strides with a contiguous last dim); rows [B] int64: sequence b's cache row; pos [B, T] int64:
    query (b, t) sees slots 0 .. pos[b, t] (< S, not checked), its own K / V already written.
    Returns o [B, T, HQ, D] in q's dtype. scale: 1/sqrt(D) default.
    Reference: SDPA of q over the rows' K / V with KVCache.mask (layers/attention.py)."""
    B, T, HQ, D = q.shape
    HK, S = k_cache.shape[1], k_cache.shape[2]
    if not q.is_contiguous() or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ShapeMismatch(f"prefill_attention: q {tuple(q.shape)} must be contiguous and the caches' last "
                            f"dim too (strides {k_cache.stride()}, {v_cache.stride()})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = HQ // HK
    bt = max(1, PREFILL_ROWS // G)
    o = torch.empty_like(q)
    if not o.numel():
        return o
    ns = prefill_splits(cdiv(T, bt) * HK * B, S)
    N = B * T * HQ
    part = torch.empty(N * ns, D, dtype=torch.float32, device=q.device) if ns > 1 else o
    ml = torch.empty(N * ns, 2, dtype=torch.float32, device=q.device) if ns > 1 else o
    _prefill_attn_kernel[(cdiv(T, bt), HK, B * ns)](
        q, k_cache, v_cache, rows.contiguous(), pos.contiguous(), o, part, ml,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), T, scale * 1.4426950408889634,
        HQ=HQ, G=G, BT=bt, RP=max(16, next_power_of_2(bt * G)), D=D, BN=PREFILL_BN, NS=ns,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8)   # 4: 255 registers and spills (sm_90)
    if ns > 1:
        _prefill_merge_kernel[(cdiv(N, 16),)](part, ml, o, N, NS=ns, BR=16, D=D, num_warps=4)
    return o
