"""A decode step's last part: each row's next token, greedy (argmax of its logits) or sampled
(the exponential race of runtime/sampling.py: argmax of logits / t - log E, E the row's
counter-hash Exp(1) draws, runtime/generate.counter_noise), among all tokens in one launch or
among those top-k / top-p keep in three (below), written into the caller's token buffer, and the
row's position / step counters advanced.

The torch version is a chain of small kernels after the lm_head (greedy: logits cast to fp32,
argmax, the token copy, two adds: 13 µs at 1 row, 63 µs at 64 rows of Qwen3's 151936 logits,
H100, scripts/bench_greedy.py; sampled: ~15 more passes over [B, V] 64-bit hash values; filtered:
a sort of the vocabulary, 211 µs at 1 row, 2.8 ms at 64). Here each row is cut into `splits`
chunks, one program each; the last program of a row to finish (an arrival counter) merges the
chunks' maxima in chunk order, so ties go to the lowest index, as torch.argmax breaks them, and
the result does not depend on timing. References: the torch paths of runtime/generate.next_token
(`logits.argmax(-1)`, runtime/sampling.sample)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ints import cdiv
from .quant import split_counters

# (MIN_CHUNK, BLOCK): elements per program at least, and per loop step; programs per row: about 2
# per SM in all. H100, scripts/bench_greedy.py, µs per call at 1 / 8 / 64 rows
# (benchmarks/runtime/session26_bench_greedy_h100.log, session26_bench_next_token_h100.log):
# greedy, torch chain 13.3 / 18.7 / 62.8: (2048, 1024) 2.0 / 3.6 / 20.8, (4096, 4096) 2.2 / 3.5 /
# 13.7, (4096, 2048) 4.1 / 3.7 / 20.7; sampled (the hash makes it arithmetic-bound), torch chain
# 120.1 / 204.4 / 1438.9: (2048, 1024) 6.3 / 13.4 / 84.5, (4096, 4096) 20.0 / 24.2 / 91.3
SMALL_TILES, LARGE_TILES, LARGE_FROM = (2048, 1024), (4096, 4096), 16


@triton.jit
def _exp_noise(seed, step, k):
    """Exp(1) draw of token ids k for (seed, step): splitmix64 of seed * C1 + step * C2 + k, as
    runtime/generate.counter_noise computes it (uint64 wraps as its int64 does; fp64 log)."""
    z = seed.to(tl.uint64) * 0xD1B54A32D192ED03 + step.to(tl.uint64) * 0x8CB92BA72F3D8DD7 + k.to(tl.uint64)
    z = z + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    u = ((z >> 11).to(tl.float64) + 0.5) * (1.0 / 9007199254740992.0)
    return (-tl.log(u)).to(tl.float32)


@triton.jit
def _first_max(ws_ptr, wi_ptr, b, SPLITS: tl.constexpr):
    """(max, index) of the row's token from its chunks' maxima and first indices: the first
    maximum (chunks in order), as torch.argmax has it."""
    c = tl.arange(0, SPLITS)
    ms = tl.load(ws_ptr + b * SPLITS + c, cache_modifier=".cg")
    ids = tl.load(wi_ptr + b * SPLITS + c, cache_modifier=".cg")
    top = tl.max(ms, axis=0)
    return top, tl.min(tl.where(ms == top, ids, 2147483647), axis=0)


@triton.jit
def _store_advance(tok_ptr, s_tok, pos_ptr, step_ptr, live_ptr, cnt_ptr, b, nxt, LIVE: tl.constexpr):
    """The row's last program: its token, pos / step += live (or 1), its arrival counter zeroed
    for the next launch."""
    tl.store(tok_ptr + b * s_tok, nxt.to(tok_ptr.dtype.element_ty))
    inc = tl.load(live_ptr + b).to(tl.int64) if LIVE else 1
    tl.store(pos_ptr + b, tl.load(pos_ptr + b) + inc)
    tl.store(step_ptr + b, tl.load(step_ptr + b) + inc)
    tl.atomic_xchg(cnt_ptr + b, 0)


@triton.jit
def _next_token_kernel(lg_ptr, tok_ptr, pos_ptr, step_ptr, live_ptr, t_ptr, seed_ptr, ws_ptr, wi_ptr, cnt_ptr,
                       V, s_lg, s_tok, CHUNK, min_t, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                       LIVE: tl.constexpr, SAMPLE: tl.constexpr):
    """Grid (B, SPLITS). Program (b, sp): max and its first index over the scores of tokens
    sp*CHUNK .. (sp+1)*CHUNK into ws / wi [B, SPLITS]; the row's last program writes tok[b] and
    advances pos[b], step[b] by live[b] (LIVE) or 1. Score: the logit; with SAMPLE and t[b] > 0,
    logit / max(t[b], min_t) - log E (E: _exp_noise of seed[b], step[b]). NaN counts as the
    largest value (as in torch.argmax)."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    row = lg_ptr + b * s_lg
    lo = sp * CHUNK
    if SAMPLE:
        t = tl.load(t_ptr + b)
        tt = tl.maximum(t, min_t)
        seed = tl.load(seed_ptr + b)
        stp = tl.load(step_ptr + b)     # the row's last program advances it after every program read it
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 2147483647, tl.int32)
    for k0 in range(lo, tl.minimum(lo + CHUNK, V), BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        km = (k < V) & (k < lo + CHUNK)
        v = tl.load(row + k, mask=km, other=float("-inf")).to(tl.float32)
        if SAMPLE:
            # the race's argmax(softmax(l / t) / E) as argmax(l / t - log E): the same order
            # (lanes past V stay -inf: E is finite)
            v = tl.where(t > 0, tl.math.div_rn(v, tt) - tl.log(_exp_noise(seed, stp, k)), v)
        v = tl.where(v != v, float("inf"), v)
        take = v > best      # strict: a lane keeps its first (lowest) index on ties
        best = tl.where(take, v, best)
        best_i = tl.where(take, k, best_i)
    m = tl.max(best, axis=0)
    # lowest index among the lanes holding the maximum (a chunk of all -inf keeps index lo)
    i = tl.where(m == float("-inf"), lo, tl.min(tl.where(best == m, best_i, 2147483647), axis=0))
    tl.store(ws_ptr + b * SPLITS + sp, m)
    tl.store(wi_ptr + b * SPLITS + sp, i)
    tl.debug_barrier()
    old = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel", scope="gpu")
    if old == SPLITS - 1:
        _store_advance(tok_ptr, s_tok, pos_ptr, step_ptr, live_ptr, cnt_ptr, b, _first_max(ws_ptr, wi_ptr, b, SPLITS)[1],
                       LIVE)


# -- top-k / top-p: the race among a row's kept tokens -------------------------------------------
# Kept tokens: the first N of the order (s descending, index ascending), s = logit / t, where N is
# the smaller of top-k and the count of tokens whose mass before them (softmax of s) is < top-p
# (runtime/sampling.sample, the reference). The vocabulary is never sorted: two thresholds a < b
# cut each row, every token above b surely kept ("sure"), none at or below a, and only the band
# (a, b] is put in order. Launch 1: each chunk program histograms its tokens by "level", LEVEL_W
# nats below the chunk's own max; the row's last program turns the chunks' count and mass bounds
# per level into a and b. Launch 2, rows whose band may hold more than CAP tokens (near-flat
# logits with top-p near 1, a large top-k): the chunks histogram their band tokens in FINE bins
# and sum their sure ones exactly; the last program narrows the band to a few bins. Launch 3:
# the chunks race among their sure tokens (count, mass and best score kept) and append their band
# tokens to a buffer; the row's last program races among the kept of them (rank and mass counted
# after the sure tokens): sorted up to MID, binned and narrowed again up to CAP, by bisection up to
# BIG, or, beyond (ties at the cut wider than BIG: no bin splits equal values), by bisection over
# the row's logit keys in one program (exact, but ~0.7 ms a step on an H100).
LEVELS, LEVEL_W, FINE, CAP, BIG = 64, 0.25, 256, 4096, 16384
SMALL, MID = 64, 512    # sort sizes below CAP (a sort's cost grows with its size)
SCAN = 4096         # elements per loop step of the passes over a row in the last launch (bytes in flight)
SLACK = 1e-4        # relative margin of the mass bounds against top-p * Z (float rounding of the sums)


@triton.jit
def _scaled(row, k, km, tt):
    """s = logit / tt of tokens k (masked lanes and NaN: -inf, never kept)."""
    s = tl.math.div_rn(tl.load(row + k, mask=km, other=float("-inf")).to(tl.float32), tt)
    return tl.where(s != s, float("-inf"), s)


@triton.jit
def _ord(x):
    """fp32 -> int32 with the same order (negative floats: the low 31 bits flipped); its own inverse
    on the bits."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _unord(o):
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _cand_key(s, k):
    """A candidate's sort key: s descending, then token id k ascending, as one int64."""
    return (_ord(s).to(tl.int64) << 32) | (2147483647 - k).to(tl.int64)


@triton.jit
def _uncand(key):
    """(s, token id) of candidate keys."""
    return _unord((key >> 32).to(tl.int32)), 2147483647 - (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _load_cands(buf, r, n):
    """The keys of candidate slots r; slots >= n: the lowest key."""
    return tl.load(buf + r, mask=r < n, other=-9223372036854775807, cache_modifier=".cg")


@triton.jit
def _better(sa, ia, sb, ib):
    """The winner of two race entries (score, token): the higher score, on ties the lower token id
    (as argmax over the vocabulary has it)."""
    take = (sa > sb) | ((sa == sb) & (ia < ib))
    return tl.where(take, sa, sb), tl.where(take, ia, ib)


@triton.jit
def _key(row, k, km, LOW: tl.constexpr):
    """(logit as fp32, its order key ord >> LOW): LOW drops the bits a bf16 (16) / fp16 (13)
    logit never has, so a bisection over keys takes a pass per bit of the logit type only. NaN:
    the lowest key (never kept)."""
    v = tl.load(row + k, mask=km, other=float("-inf")).to(tl.float32)
    return v, tl.where(v == v, _ord(v) >> LOW, -2147483648 >> LOW)


@triton.jit
def _above(row, u, m, tt, V, BLOCK: tl.constexpr, LOW: tl.constexpr):
    """(count, sum of exp(s - m)) of the row's tokens of key >= u. One program streams the row,
    loads pipelined (waiting on each chunk's max to skip it took ~130 µs a pass for Qwen3's
    vocabulary on an H100); s as logit * (1 / t), not the exact division: the masses differ in
    rounding only."""
    cnt = tl.zeros([BLOCK], tl.int32)
    mass = tl.zeros([BLOCK], tl.float32)
    inv_t = 1.0 / tt
    for k0 in tl.range(0, V, BLOCK, num_stages=3):
        k = k0 + tl.arange(0, BLOCK)
        v, key = _key(row, k, k < V, LOW)
        sel = key >= u
        cnt += sel.to(tl.int32)
        mass += tl.where(sel, tl.exp(v * inv_t - m), 0.0)
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _bisect_race(row, thr, m, Z, tt, k_eff, pp, seed, stp, V, BLOCK: tl.constexpr, LOW: tl.constexpr):
    """The exact kept set of a row with many candidates, and its race: u = the largest logit key
    whose tokens (key >= u) cover the kept set (count >= k_eff or mass >= top-p * Z), by bisection
    between a key below every token of s >= thr (they cover) and one above the row max m (logit
    order = s order: distinct bf16 / fp16 logits stay distinct divided by t in fp32); the tokens
    above u are kept, and of those at u the first ones by index while they fit top-k / top-p."""
    lt = thr * tt
    lo = tl.where(thr > float("-inf"), (_ord(lt - tl.abs(lt) * 1e-5 - 1e-30) >> LOW) - 1, -2147483648 >> LOW).to(tl.int64)
    mt = m * tt
    hi = (_ord(mt + tl.abs(mt) * 1e-5 + 1e-30) >> LOW).to(tl.int64) + 2   # nothing at or above it: covers nothing
    c_hi = tl.zeros([], tl.int32)
    m_hi = tl.zeros([], tl.float32)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        c, ms = _above(row, mid, m, tt, V, BLOCK, LOW)
        cover = (c >= k_eff) | (ms >= pp * Z)
        lo = tl.where(cover, mid, lo)
        hi = tl.where(cover, hi, mid)
        c_hi = tl.where(cover, c_hi, c)            # tokens above u: count and mass
        m_hi = tl.where(cover, m_hi, ms)
    # the logit at u: its key's dropped bits are 0 (ones for a negative value, whose low bits ord flips)
    v = _unord(((lo << LOW) | tl.where(lo < 0, (1 << LOW) - 1, 0)).to(tl.int32))
    # ties at u take ranks c_hi, c_hi + 1, ...: kept while below top-k and their mass before < top-p
    n_p = (pp * Z - m_hi) / tl.exp(tl.math.div_rn(v, tt) - m)
    n_p = tl.where(n_p == n_p, tl.minimum(n_p, V * 1.0), V * 1.0)
    n_eq = tl.maximum(tl.minimum(k_eff - c_hi, tl.ceil(n_p).to(tl.int64)), 1)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 2147483647, tl.int32)
    ties = tl.zeros([], tl.int32)
    for k0 in tl.range(0, V, BLOCK, num_stages=3):
        k = k0 + tl.arange(0, BLOCK)
        x, key = _key(row, k, k < V, LOW)
        eq = key == lo
        rank = ties + tl.cumsum(eq.to(tl.int32), axis=0) - 1
        ties += tl.sum(eq.to(tl.int32), axis=0)
        keep = (key > lo) | (eq & (rank < n_eq))
        sc = tl.where(keep, tl.math.div_rn(x, tt) - tl.log(_exp_noise(seed, stp, k)), float("-inf"))
        take = sc > best
        best = tl.where(take, sc, best)
        best_i = tl.where(take, k, best_i)
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_i, 2147483647), axis=0)


@triton.jit
def _bisect_buffer(buf, n, lo_x, hi_x, m, Z, n0, z0, k_eff, pp, seed, stp, V, SCAN: tl.constexpr):
    """(score, token) of the race among the kept of n (CAP < n <= BIG) band keys in buf, unsorted,
    after n0 sure tokens of mass z0: each token ranks by the dense key ord(s) * V + V - 1 - id
    (distinct, in the kernel's order); the last kept key is the largest x whose keys >= x cover
    the kept set with the sure ones (count >= k_eff or mass >= top-p * Z), found by bisection
    between lo_x's (the band's floor: covers) and one above every key (s <= hi_x)."""
    lo = _ord(lo_x).to(tl.int64) * V
    hi = (_ord(hi_x).to(tl.int64) + 1) * V + 1     # lo may reach hi - 1, above every key: the sure cover alone
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        cnt = tl.zeros([SCAN], tl.int32)
        mass = tl.zeros([SCAN], tl.float32)
        for i0 in range(0, n, SCAN):
            r = i0 + tl.arange(0, SCAN)
            key = _load_cands(buf, r, n)
            s, idx = _uncand(key)
            sel = (r < n) & ((key >> 32) * V + V - 1 - idx >= mid)
            cnt += sel.to(tl.int32)
            mass += tl.where(sel, tl.exp(s - m), 0.0)
        cover = (n0 + tl.sum(cnt, axis=0) >= k_eff) | (z0 + tl.sum(mass, axis=0) >= pp * Z)
        lo = tl.where(cover, mid, lo)
        hi = tl.where(cover, hi, mid)
    best = tl.full([SCAN], float("-inf"), tl.float32)
    best_i = tl.full([SCAN], 2147483647, tl.int32)
    for i0 in range(0, n, SCAN):
        r = i0 + tl.arange(0, SCAN)
        key = _load_cands(buf, r, n)
        s, idx = _uncand(key)
        keep = (r < n) & ((key >> 32) * V + V - 1 - idx >= lo)
        sc = tl.where(keep, s - tl.log(_exp_noise(seed, stp, tl.where(keep, idx, 0))), float("-inf"))
        best, best_i = _better(sc, idx, best, best_i)
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, best_i, 2147483647), axis=0)


@triton.jit
def _race_sorted(buf, n, m, Z, n0, z0, k_eff, pp, seed, stp, SIZE: tl.constexpr):
    """(score, token) of the race among the kept of the n band keys in buf (n <= SIZE), after n0
    sure tokens of mass z0: sorted, kept while their rank is below k_eff and their mass before
    them below top-p * Z."""
    r = tl.arange(0, SIZE)
    s, idx = _uncand(tl.sort(_load_cands(buf, r, n), descending=True))
    p = tl.where(r < n, tl.exp(s - m), 0.0)
    keep = (r < n) & (n0 + r < k_eff) & (z0 + tl.cumsum(p, axis=0) - p < pp * Z)
    sc = tl.where(keep, s - tl.log(_exp_noise(seed, stp, tl.where(keep, idx, 0))), float("-inf"))
    top = tl.max(sc, axis=0)
    first = tl.min(tl.where(sc == top, r, SIZE), axis=0)        # the first in the order
    return top, tl.sum(tl.where(r == first, idx, 0), axis=0)


@triton.jit
def _race_band(buf, tmp, n, a, hb, m, Z, n0, z0, k_eff, pp, seed, stp, SIZE: tl.constexpr, SMALL: tl.constexpr,
               MID: tl.constexpr, FINE: tl.constexpr, SLACK: tl.constexpr):
    """(score, token) of the race among the kept of n (MID < n <= SIZE) band keys (a, hb] in buf,
    after n0 sure tokens of mass z0, without sorting them all: binned (FINE) and narrowed as the
    refining launch does (_narrow); the tokens above the narrowed band race here, those in it
    (usually a few dozen) are compacted into tmp and sorted."""
    r = tl.arange(0, SIZE)
    key = _load_cands(buf, r, n)
    s, idx = _uncand(key)
    real = r < n
    a2 = a
    b2 = hb
    if _fine_enough(a, hb, FINE):
        a2, b2 = _narrow(tl.histogram(_bin(s, a, hb, FINE), FINE, mask=real), a, hb, n0, z0, m, Z, k_eff, pp,
                         FINE, SLACK)
    above = real & (s > b2)
    sc = tl.where(above, s - tl.log(_exp_noise(seed, stp, tl.where(above, idx, 0))), float("-inf"))
    top = tl.max(sc, axis=0)
    top_i = tl.min(tl.where(sc == top, idx, 2147483647), axis=0)
    n1 = n0 + tl.sum(above.to(tl.int32), axis=0)
    z1 = z0 + tl.sum(tl.where(above, tl.exp(s - m), 0.0), axis=0)
    sub = real & (s > a2) & (s <= b2)
    tl.store(tmp + tl.cumsum(sub.to(tl.int32), axis=0) - 1, key, mask=sub)
    tl.debug_barrier()       # the program's own stores, read back by other threads
    ns = tl.sum(sub.to(tl.int32), axis=0)
    if ns <= SMALL:
        sub_sc, sub_i = _race_sorted(tmp, ns, m, Z, n1, z1, k_eff, pp, seed, stp, SMALL)
    elif ns <= MID:
        sub_sc, sub_i = _race_sorted(tmp, ns, m, Z, n1, z1, k_eff, pp, seed, stp, MID)
    else:                    # ties wider than the bins
        sub_sc, sub_i = _race_sorted(tmp, ns, m, Z, n1, z1, k_eff, pp, seed, stp, SIZE)
    return _better(sub_sc, sub_i, top, top_i)


@triton.jit
def _row_kind(t_ptr, k_ptr, p_ptr, b, V, min_t):
    """(tt, k_eff, top_p, race, filt) of row b: the divisor of its logits (1 for greedy rows), its
    top-k (V when off), top-p, whether it races over all tokens (a temperature, no filter) or over
    the kept (a temperature and a filter)."""
    t = tl.load(t_ptr + b)
    kk = tl.load(k_ptr + b)
    pp = tl.load(p_ptr + b)
    k_eff = tl.where((kk > 0) & (kk < V), kk, V)
    return (tl.where(t > 0, tl.maximum(t, min_t), 1.0), k_eff, pp, (t > 0) & (k_eff == V) & (pp >= 1.0),
            (t > 0) & ((k_eff < V) | (pp < 1.0)))


@triton.jit
def _bin(s, a, hb, FINE: tl.constexpr):
    """Bin of s in FINE equal bins over the band (a, hb]: bin f holds hb - (f + 1) * w < s <= hb - f * w
    (up to rounding: _narrow allows a bin)."""
    return tl.minimum(tl.maximum(tl.floor((hb - s) * (FINE / (hb - a))), 0.0), FINE - 1.0).to(tl.int32)


@triton.jit
def _narrow(n, a, hb, n0, y0, m, Z, k_eff, pp, FINE: tl.constexpr, SLACK: tl.constexpr):
    """(a2, b2): the narrowest band of bin edges known to hold the cut, from the band's bin counts n
    [FINE] and the count n0 / mass y0 (exp(s - m), exact) of the tokens above hb. Above hb - g * w:
    at most the tokens of bins <= g, at least those of bins <= g - 2 (one bin of rounding each way)."""
    f = tl.arange(0, FINE)
    w = (hb - a) / FINE
    top = hb - f * w                 # bin f's upper edge
    cum = n0 + tl.cumsum(n, axis=0)
    ub_y = y0 + tl.cumsum(n.to(tl.float32) * tl.exp(top - m), axis=0)
    sure = (cum <= k_eff) & (ub_y <= pp * Z * (1.0 - SLACK))     # everything above hb - f * w kept
    gh = tl.maximum(tl.min(tl.where(sure, FINE, f), axis=0) - 1, 0)
    lb_y = y0 + tl.cumsum(n.to(tl.float32) * tl.exp(top - w - m), axis=0)
    cover = (cum >= k_eff) | (lb_y >= pp * Z * (1.0 + SLACK))    # hb - (f + 2) * w covers the kept set
    gl = tl.min(tl.where(cover, f, FINE), axis=0) + 2
    a2 = tl.where(gl < FINE, hb - gl * w, a)
    return a2, tl.maximum(hb - gh * w, a2)


@triton.jit
def _fine_enough(a, hb, FINE: tl.constexpr):
    """Whether FINE bins over (a, hb] are wide against an ulp (_narrow's bounds allow one bin of rounding)."""
    return (hb - a) * (1.0 / FINE) > tl.maximum(tl.abs(a), tl.abs(hb)) * (1.0 / (1 << 14))


@triton.jit
def _filter_stats_kernel(lg_ptr, step_ptr, t_ptr, seed_ptr, k_ptr, p_ptr, wb_ptr, wi_ptr, wz_ptr, wc_ptr, wm_ptr,
                         wr_ptr, cnt_ptr, V, s_lg, CHUNK, min_t, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                         LEVELS: tl.constexpr, LEVEL_W: tl.constexpr, FINE: tl.constexpr, CAP: tl.constexpr,
                         SLACK: tl.constexpr):
    """First launch, grid (B, SPLITS), chunks as in _next_token_kernel. Chunk program: its max (or
    race best) and first index into wb / wi; filtered rows also the sum of exp(s - chunk max) into
    wz and per level (LEVEL_W nats each below the chunk max) the cumulative count and the mass
    bound of the deeper levels into wc / wm [B, SPLITS, LEVELS]. The row's last program of a
    filtered row merges them into wr [B, 5]: row max, Z, the band (a, b], and whether the band may
    hold more than CAP tokens (1.0: the refining launch narrows it)."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    row = lg_ptr + b * s_lg
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    tt, k_eff, pp, race, filt = _row_kind(t_ptr, k_ptr, p_ptr, b, V, min_t)
    seed = tl.load(seed_ptr + b)
    stp = tl.load(step_ptr + b)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 2147483647, tl.int32)
    for k0 in range(lo, hi, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        s = tl.math.div_rn(tl.load(row + k, mask=k < hi, other=float("-inf")).to(tl.float32), tt)
        if race:
            s = s - tl.log(_exp_noise(seed, stp, k))
        # NaN: the largest, as torch.argmax has it, except in filtered rows (their max must be a number)
        s = tl.where(s != s, tl.where(filt, float("-inf"), float("inf")), s)
        take = s > best
        best = tl.where(take, s, best)
        best_i = tl.where(take, k, best_i)
    mc = tl.max(best, axis=0)
    tl.store(wb_ptr + b * SPLITS + sp, mc)
    tl.store(wi_ptr + b * SPLITS + sp, tl.where(mc == float("-inf"), lo, tl.min(tl.where(best == mc, best_i, 2147483647), axis=0)))
    if filt:
        z = tl.zeros([BLOCK], tl.float32)
        h = tl.zeros([LEVELS], tl.int32)
        for k0 in range(lo, hi, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            s = _scaled(row, k, k < hi, tt)
            real = s > float("-inf")
            z += tl.where(real, tl.exp(s - mc), 0.0)
            lvl = tl.where(real, tl.minimum(tl.floor((mc - s) * (1.0 / LEVEL_W)), LEVELS - 1.0), LEVELS - 1.0)
            h += tl.histogram(lvl.to(tl.int32), LEVELS, mask=k < hi)
        tl.store(wz_ptr + b * SPLITS + sp, tl.sum(z, axis=0))
        j = tl.arange(0, LEVELS)
        # a token of level j has max - (j + 1) * LEVEL_W < s <= max - j * LEVEL_W: counts of the levels
        # <= j, and a bound on the mass of those >= j (at most exp(-j * LEVEL_W) each)
        at = (b * SPLITS + sp) * LEVELS + j
        tl.store(wc_ptr + at, tl.cumsum(h, axis=0))
        ub = h.to(tl.float32) * tl.exp(-j * LEVEL_W)
        tl.store(wm_ptr + at, tl.sum(ub, axis=0) - tl.cumsum(ub, axis=0) + ub)
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel", scope="gpu")
        if old == SPLITS - 1:
            c = tl.arange(0, SPLITS)
            ms = tl.load(wb_ptr + b * SPLITS + c, cache_modifier=".cg")
            m = tl.max(ms, axis=0)
            real = ms > float("-inf")
            scale = tl.where(real, tl.exp(ms - m), 0.0)
            Z = tl.sum(tl.load(wz_ptr + b * SPLITS + c, cache_modifier=".cg") * scale, axis=0)
            g = tl.arange(0, LEVELS)
            base = (b * SPLITS + c[None, :]) * LEVELS
            # a: row level g (s > m - (g + 1) * LEVEL_W) holds chunk c's levels <= g - d[c] (d: the
            # chunk max's depth in levels, rounded up); the others weigh at most the bound of the
            # levels after them. The first g whose lower bounds reach top-k or top-p covers the kept set.
            d = tl.where(real, tl.ceil((m - ms) * (1.0 / LEVEL_W)), 2.0 * LEVELS).to(tl.int32)
            jj = tl.minimum(g[:, None] - d[None, :], LEVELS - 2)          # [LEVELS, SPLITS]; the last: all deeper
            cnt = tl.sum(tl.load(wc_ptr + base + jj, mask=jj >= 0, other=0, cache_modifier=".cg"), axis=1)
            rest = tl.sum(tl.load(wm_ptr + base + tl.maximum(jj + 1, 0), cache_modifier=".cg") * scale[None, :], axis=1)
            cover = (cnt >= k_eff) | (Z - rest >= pp * Z)
            gs = tl.min(tl.where(cover, g, LEVELS), axis=0)
            # one level more than needed: rounding of the levels cannot drop a counted token; and a
            # few ulps of m lower (s = logit / a tiny t reaches 1e7, where an ulp is a whole nat)
            ulps = tl.abs(m) * (1.0 / (1 << 20))
            a = tl.where(gs < LEVELS, m - (gs + 2.0) * LEVEL_W - ulps, float("-inf"))
            # b: the tokens above m - g * LEVEL_W lie in chunk c's levels <= g - e[c] (e: rounded
            # down, one level more than they reach): upper bounds of their count and mass. Wide
            # bands (more than CAP tokens may lie above a): b is the lowest such edge whose tokens
            # are surely all kept, and the refining launch narrows (a, b]; other rows: b = m (the
            # buffer takes every candidate, the hash runs for a few of them only)
            e = tl.where(real, tl.floor((m - ms) * (1.0 / LEVEL_W)), 2.0 * LEVELS).to(tl.int32)
            ja = gs + 2 - e
            n_a = tl.sum(tl.load(wc_ptr + b * SPLITS * LEVELS + c * LEVELS + tl.minimum(ja, LEVELS - 1), mask=ja >= 0,
                                 other=0, cache_modifier=".cg"), axis=0)
            wide = (gs < LEVELS) & ((gs + 2 >= LEVELS) | (n_a > CAP))
            hb = m
            if wide:
                ju = g[:, None] - e[None, :]
                cnt_u = tl.sum(tl.load(wc_ptr + base + tl.minimum(ju, LEVELS - 1), mask=ju >= 0, other=0,
                                       cache_modifier=".cg"), axis=1)
                deeper = tl.load(wm_ptr + base + ju + 1, mask=(ju >= 0) & (ju < LEVELS - 1), other=0.0,
                                 cache_modifier=".cg")
                mass_u = tl.sum(tl.where(ju >= 0, tl.load(wm_ptr + base, cache_modifier=".cg") - deeper, 0.0)
                                * scale[None, :], axis=1)
                sure = (cnt_u <= k_eff) & (mass_u <= pp * Z * (1.0 - SLACK))
                gh = tl.maximum(tl.min(tl.where(sure, LEVELS, g), axis=0) - 1, 0)     # m itself: nothing above
                hb = tl.maximum(tl.minimum(m - gh * LEVEL_W + ulps, m), a)
                wide = (hb > a) & _fine_enough(a, hb, FINE)
                hb = tl.where(wide, hb, m)
            tl.store(wr_ptr + b * 5, m)
            tl.store(wr_ptr + b * 5 + 1, Z)
            tl.store(wr_ptr + b * 5 + 2, a)
            tl.store(wr_ptr + b * 5 + 3, hb)
            tl.store(wr_ptr + b * 5 + 4, wide.to(tl.float32))
            tl.atomic_xchg(cnt_ptr + b, 0)    # ready for the next launch
    elif sp == 0:        # other rows: never wide (wr is not zeroed; the refining launch reads this flag)
        tl.store(wr_ptr + b * 5 + 4, 0.0)


@triton.jit
def _filter_refine_kernel(lg_ptr, t_ptr, k_ptr, p_ptr, wb_ptr, wr_ptr, wh_ptr, wn_ptr, wy_ptr, cnt_ptr, V, s_lg,
                          CHUNK, min_t, SPLITS: tl.constexpr, BLOCK: tl.constexpr, FINE: tl.constexpr,
                          SLACK: tl.constexpr):
    """Second launch, same grid; rows that launch 1 marked wide only. Chunk program: its band
    tokens (a, b] histogrammed in FINE bins of equal width into wh [B, SPLITS, FINE], the count and
    exact mass of its tokens above b into wn / wy [B, SPLITS]. The row's last program bounds the
    count and mass above each bin edge and writes the narrowest band that still holds the cut back
    into wr (a, b)."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    if tl.load(wr_ptr + b * 5 + 4) > 0:
        row = lg_ptr + b * s_lg
        tt, k_eff, pp, race, filt = _row_kind(t_ptr, k_ptr, p_ptr, b, V, min_t)
        m = tl.load(wr_ptr + b * 5)
        Z = tl.load(wr_ptr + b * 5 + 1)
        a = tl.load(wr_ptr + b * 5 + 2)
        hb = tl.load(wr_ptr + b * 5 + 3)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, V)
        h = tl.zeros([FINE], tl.int32)
        ns = tl.zeros([BLOCK], tl.int32)
        ys = tl.zeros([BLOCK], tl.float32)
        for k0 in range(lo, tl.where(tl.load(wb_ptr + b * SPLITS + sp) > a, hi, lo), BLOCK):   # chunks below a: none
            k = k0 + tl.arange(0, BLOCK)
            s = _scaled(row, k, k < hi, tt)
            sure = s > hb
            ns += sure.to(tl.int32)
            ys += tl.where(sure, tl.exp(s - m), 0.0)
            h += tl.histogram(_bin(s, a, hb, FINE), FINE, mask=(s > a) & (s <= hb))
        f = tl.arange(0, FINE)
        tl.store(wh_ptr + (b * SPLITS + sp) * FINE + f, h)
        tl.store(wn_ptr + b * SPLITS + sp, tl.sum(ns, axis=0))
        tl.store(wy_ptr + b * SPLITS + sp, tl.sum(ys, axis=0))
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel", scope="gpu")
        if old == SPLITS - 1:
            c = tl.arange(0, SPLITS)
            n = tl.sum(tl.load(wh_ptr + (b * SPLITS + c[:, None]) * FINE + f[None, :], cache_modifier=".cg"), axis=0)
            n0 = tl.sum(tl.load(wn_ptr + b * SPLITS + c, cache_modifier=".cg"), axis=0)
            y0 = tl.sum(tl.load(wy_ptr + b * SPLITS + c, cache_modifier=".cg"), axis=0)
            a2, b2 = _narrow(n, a, hb, n0, y0, m, Z, k_eff, pp, FINE, SLACK)
            tl.store(wr_ptr + b * 5 + 2, a2)
            tl.store(wr_ptr + b * 5 + 3, b2)
            tl.atomic_xchg(cnt_ptr + b, 0)


@triton.jit
def _filter_pick_kernel(lg_ptr, tok_ptr, pos_ptr, step_ptr, live_ptr, t_ptr, seed_ptr, k_ptr, p_ptr,
                        wb_ptr, wi_ptr, wr_ptr, wn_ptr, wy_ptr, ws_ptr, wt_ptr, buf_ptr, cnt_ptr, V, s_lg, s_tok,
                        CHUNK, min_t, SPLITS: tl.constexpr, SMALL: tl.constexpr, MID: tl.constexpr,
                        CAP: tl.constexpr, BIG: tl.constexpr, FINE: tl.constexpr, SLACK: tl.constexpr,
                        SCAN: tl.constexpr, LOW: tl.constexpr, LIVE: tl.constexpr):
    """Last launch, same grid. Filtered rows, chunk program: the count, mass and race best (score,
    first token) of its sure tokens (s > b) into wn / wy / ws / wt [B, SPLITS]; its band tokens
    (a, b] appended to buf [B, BIG] (_cand_key; slots by an atomic count in cnt[B + b]). The row's
    last program races among the kept band tokens, after the sure ones: sorted (up to SMALL or
    MID), narrowed by bins then sorted (up to CAP; buf's tail [B, CAP] its scratch), by bisection over
    them (up to BIG), or by bisection over the whole row (more); the better of that and the sure
    best wins. Other rows: the first maximum of the chunks' bests. Then the token, pos / step
    advanced."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    row = lg_ptr + b * s_lg
    tt, k_eff, pp, race, filt = _row_kind(t_ptr, k_ptr, p_ptr, b, V, min_t)
    m = tl.load(wr_ptr + b * 5)
    a = tl.load(wr_ptr + b * 5 + 2)
    hb = tl.load(wr_ptr + b * 5 + 3)
    seed = tl.load(seed_ptr + b)
    stp = tl.load(step_ptr + b)
    if filt:
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, V)
        n0 = tl.zeros([], tl.int32)
        y0 = tl.zeros([], tl.float32)
        best = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], 2147483647, tl.int32)
        wide = tl.load(wr_ptr + b * 5 + 4) > 0
        for k0 in range(lo, tl.where(tl.load(wb_ptr + b * SPLITS + sp) > a, hi, lo), SCAN):   # chunks below a: none
            k = k0 + tl.arange(0, SCAN)
            s = _scaled(row, k, k < hi, tt)
            sel = (s > a) & (s <= hb)
            n = tl.sum(sel.to(tl.int32), axis=0)
            if n > 0:
                slot = tl.atomic_add(cnt_ptr + tl.num_programs(0) + b, n) + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                tl.store(buf_ptr + b * BIG + slot, _cand_key(s, k), mask=sel & (slot < BIG))
            if wide:         # narrow rows: b = m, no sure tokens
                sure = s > hb
                ns = tl.sum(sure.to(tl.int32), axis=0)
                if ns > 0:       # the hash only where a block has sure tokens
                    n0 += ns
                    y0 += tl.sum(tl.where(sure, tl.exp(s - m), 0.0), axis=0)
                    sc = tl.where(sure, s - tl.log(_exp_noise(seed, stp, k)), float("-inf"))
                    top = tl.max(sc, axis=0)
                    best_i = tl.where(top > best, tl.min(tl.where(sc == top, k, 2147483647), axis=0), best_i)
                    best = tl.maximum(best, top)      # strict above: an earlier block keeps ties
        tl.store(wn_ptr + b * SPLITS + sp, n0)
        tl.store(wy_ptr + b * SPLITS + sp, y0)
        tl.store(ws_ptr + b * SPLITS + sp, best)
        tl.store(wt_ptr + b * SPLITS + sp, best_i)
    tl.debug_barrier()
    old = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel", scope="gpu")
    if old == SPLITS - 1:
        nxt = _first_max(wb_ptr, wi_ptr, b, SPLITS)[1]     # greedy and race rows
        if filt & (m > float("-inf")):
            Z = tl.load(wr_ptr + b * 5 + 1)
            c = tl.arange(0, SPLITS)
            n0 = tl.sum(tl.load(wn_ptr + b * SPLITS + c, cache_modifier=".cg"), axis=0)
            y0 = tl.sum(tl.load(wy_ptr + b * SPLITS + c, cache_modifier=".cg"), axis=0)
            sure_sc, sure_i = _first_max(ws_ptr, wt_ptr, b, SPLITS)
            n = tl.atomic_xchg(cnt_ptr + tl.num_programs(0) + b, 0)      # read, and ready for the next launch
            buf = buf_ptr + b * BIG
            band_sc = float("-inf")
            band_i = 0
            if n <= SMALL:       # a sort's cost grows with its size: the smallest that holds them
                band_sc, band_i = _race_sorted(buf, n, m, Z, n0, y0, k_eff, pp, seed, stp, SMALL)
            elif n <= MID:
                band_sc, band_i = _race_sorted(buf, n, m, Z, n0, y0, k_eff, pp, seed, stp, MID)
            elif n <= CAP:       # binning them costs less than their sort
                band_sc, band_i = _race_band(buf, buf_ptr + tl.num_programs(0) * BIG + b * CAP, n, a, hb, m, Z, n0, y0,
                                             k_eff, pp, seed, stp, CAP, SMALL, MID, FINE, SLACK)
            elif n <= BIG:
                band_sc, band_i = _bisect_buffer(buf, n, a, hb, m, Z, n0, y0, k_eff, pp, seed, stp, V, SCAN)
            if n <= BIG:
                nxt = _better(band_sc, band_i, sure_sc, sure_i)[1]
            else:
                nxt = _bisect_race(row, a, m, Z, tt, k_eff, pp, seed, stp, V, SCAN, LOW)
        _store_advance(tok_ptr, s_tok, pos_ptr, step_ptr, live_ptr, cnt_ptr, b, nxt, LIVE)


def next_token_advance(logits: Tensor, tokens: Tensor, pos: Tensor, step: Tensor, live: Tensor | None = None,
                       sampling: tuple[Tensor, Tensor, float] | None = None,
                       filters: tuple[Tensor, Tensor] | None = None,
                       tiles: tuple[int, int] | None = None) -> None:
    """tokens[b] = argmax(logits[b]) (the first maximum; NaN is the largest), or with `sampling`
    = (temperature [B] fp32, seed [B] int64, min_t) the exponential race for rows with
    temperature > 0 (runtime/sampling.sample, its noise counter_noise(seed, step)), among the
    tokens that `filters` = (top_k [B] int64, 0 = off; top_p [B] fp32, 1 = off) keep (None: all;
    NaN logits of a filtered row are never kept); then pos[b] and step[b] += live[b] (live None:
    += 1), in place, one launch (three with filters), no host sync (CUDA-graph capturable). logits
    [B, V] (any float dtype); tokens [B] (any stride, any int dtype); pos / step [B] contiguous
    int64; live [B] bool or int; tiles: (MIN_CHUNK, BLOCK), None: the rule above. Callers take it
    where formats.base.use_kernels says so (on CPU: the Triton interpreter, tests only)."""
    B, V = logits.shape
    min_chunk, block = tiles or (LARGE_TILES if B >= LARGE_FROM and sampling is None else SMALL_TILES)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if B == 0:
        return
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 132
    splits = max(1, min(cdiv(V, min_chunk), cdiv(2 * sms, B)))
    splits = 1 << (splits.bit_length() - 1)     # a power of 2 (the merge's arange), <= the bound above
    chunk = cdiv(cdiv(V, splits), block) * block
    ws = torch.empty(B, splits, dtype=torch.float32, device=logits.device)
    wi = torch.empty(B, splits, dtype=torch.int32, device=logits.device)
    counters = split_counters(logits.device, B if filters is None else 2 * B)   # filters: arrivals, candidate counts
    live_arg = pos if live is None else live
    if filters is not None:
        temp, seed, min_t = sampling
        top_k, top_p = filters
        f32 = dict(dtype=torch.float32, device=logits.device)
        i32 = dict(dtype=torch.int32, device=logits.device)
        wz, wy, wsc = (torch.empty(B, splits, **f32) for _ in range(3))
        wn, wt = (torch.empty(B, splits, **i32) for _ in range(2))
        wc = torch.empty(B, splits, LEVELS, **i32)
        wm = torch.empty(B, splits, LEVELS, **f32)
        wh = torch.empty(B, splits, FINE, **i32)
        wr = torch.empty(B, 5, **f32)
        buf = torch.empty(B * (BIG + CAP), dtype=torch.int64, device=logits.device)     # [B, BIG], then [B, CAP]
        _filter_stats_kernel[(B, splits)](logits, step, temp, seed, top_k, top_p, ws, wi, wz, wc, wm, wr, counters,
                                          V, logits.stride(0), chunk, min_t, SPLITS=splits, BLOCK=block,
                                          LEVELS=LEVELS, LEVEL_W=LEVEL_W, FINE=FINE, CAP=CAP, SLACK=SLACK,
                                          num_warps=4)
        _filter_refine_kernel[(B, splits)](logits, temp, top_k, top_p, ws, wr, wh, wn, wy, counters, V,
                                           logits.stride(0), chunk, min_t, SPLITS=splits, BLOCK=block, FINE=FINE,
                                           SLACK=SLACK, num_warps=4)
        _filter_pick_kernel[(B, splits)](logits, tokens, pos, step, live_arg, temp, seed, top_k, top_p, ws, wi, wr,
                                         wn, wy, wsc, wt, buf, counters, V, logits.stride(0), tokens.stride(0), chunk,
                                         min_t, SPLITS=splits, SMALL=min(SMALL, CAP), MID=min(MID, CAP), CAP=CAP,
                                         BIG=BIG, FINE=FINE, SLACK=SLACK, SCAN=SCAN,
                                         LOW={torch.bfloat16: 16, torch.float16: 13}.get(logits.dtype, 0),
                                         LIVE=live is not None, num_warps=8)
        return
    temp, seed, min_t = sampling if sampling is not None else (ws, pos, 0.0)
    _next_token_kernel[(B, splits)](logits, tokens, pos, step, live_arg, temp, seed, ws, wi,
                                    counters, V, logits.stride(0), tokens.stride(0), chunk,
                                    min_t, SPLITS=splits, BLOCK=block, LIVE=live is not None,
                                    SAMPLE=sampling is not None, num_warps=4)
