"""A decode step's last part in one launch: each row's next token, greedy (argmax of its logits)
or sampled without top-k / top-p (the exponential race of runtime/sampling.py: argmax of
logits / t - log E, E the row's counter-hash Exp(1) draws, runtime/generate.counter_noise),
written into the caller's token buffer, and the row's position / step counters advanced.

The torch version is a chain of small kernels after the lm_head (greedy: logits cast to fp32,
argmax, the token copy, two adds: 13 µs at 1 row, 63 µs at 64 rows of Qwen3's 151936 logits,
H100, scripts/bench_greedy.py; sampled: ~15 more passes over [B, V] 64-bit hash values). Here each
row is cut into `splits` chunks, one program each; the last program of a row to finish (an
arrival counter) merges the chunks' maxima in chunk order, so ties go to the lowest index, as
torch.argmax breaks them, and the result does not depend on timing. References: the torch paths
of runtime/engine.py (`logits.float().argmax(-1)`, runtime/sampling.sample)."""
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
        s = tl.arange(0, SPLITS)
        ms = tl.load(ws_ptr + b * SPLITS + s, cache_modifier=".cg")
        ids = tl.load(wi_ptr + b * SPLITS + s, cache_modifier=".cg")
        top = tl.max(ms, axis=0)
        nxt = tl.min(tl.where(ms == top, ids, 2147483647), axis=0)   # chunks in order: the first max
        tl.store(tok_ptr + b * s_tok, nxt.to(tok_ptr.dtype.element_ty))
        inc = tl.load(live_ptr + b).to(tl.int64) if LIVE else 1
        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + inc)
        tl.store(step_ptr + b, tl.load(step_ptr + b) + inc)
        tl.atomic_xchg(cnt_ptr + b, 0)    # ready for the next launch


def next_token_advance(logits: Tensor, tokens: Tensor, pos: Tensor, step: Tensor, live: Tensor | None = None,
                       sampling: tuple[Tensor, Tensor, float] | None = None,
                       tiles: tuple[int, int] | None = None) -> None:
    """tokens[b] = argmax(logits[b]) (the first maximum; NaN is the largest), or with `sampling`
    = (temperature [B] fp32, seed [B] int64, min_t) the exponential race for rows with
    temperature > 0 (runtime/sampling.sample without top-k / top-p, its noise counter_noise(seed,
    step)); then pos[b] and step[b] += live[b] (live None: += 1), in place, one launch, no host
    sync (CUDA-graph capturable). logits [B, V] (any float dtype); tokens [B] (any stride, any int
    dtype); pos / step [B] contiguous int64; live [B] bool or int; tiles: (MIN_CHUNK, BLOCK), None:
    the rule above. Callers take it where formats.base.use_kernels says so (on CPU: the Triton
    interpreter, tests only)."""
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
    temp, seed, min_t = sampling if sampling is not None else (ws, pos, 0.0)
    _next_token_kernel[(B, splits)](logits, tokens, pos, step, pos if live is None else live, temp, seed, ws, wi,
                                    split_counters(logits.device, B), V, logits.stride(0), tokens.stride(0), chunk,
                                    min_t, SPLITS=splits, BLOCK=block, LIVE=live is not None,
                                    SAMPLE=sampling is not None, num_warps=4)
