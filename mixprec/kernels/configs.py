"""Launch configurations of the linear kernels, per (kind, M bucket, N, K).

A config is a dict: path ("gemv": one activation row per program, FMA dot products, for M = 1-2;
"gemm": tl.dot tiles), BM (gemm rows per program), BN, BK (K elements per loop step), split
(K splits, reduced in-kernel, see quant.splitk_store), warps, stages.

TUNED holds the configs measured on the GPU (see the comment above it); every other shape gets
`default`, a heuristic from the same measurements: gemv with 4-8 waves of programs on a 132-SM
H100 (gemv programs have few loads in flight), gemm with 1-2 waves. M > 256 uses the 256 bucket.
"""
from __future__ import annotations

from .ints import cdiv

KINDS = ("intq4", "intq8", "fp8_w8a8", "fp8_w8a16", "int8_w8a8", "int8_w8a16")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMS = 132  # H100 SXM; only used to size split-K in the defaults


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


def cfg(path: str, BM: int, BN: int, BK: int, split: int, warps: int, stages: int, **flags) -> dict:
    return dict(path=path, BM=BM, BN=BN, BK=BK, split=split, warps=warps, stages=stages, **flags)


def auto_split(M: int, N: int, K: int, BM: int, BN: int, BK: int, target: int = 2 * SMS) -> int:
    """K splits so that tiles * split reaches ~target programs (capped by the K tiles)."""
    tiles = (M if BM == 0 else cdiv(M, BM)) * cdiv(N, BN)
    k_tiles = cdiv(K, BK)
    return max(1, min(k_tiles, round(target / tiles)))


def default(kind: str, M: int, N: int, K: int) -> dict:
    b = m_bucket(M)
    if kind.startswith("intq") and b <= 2:
        # the small-tile GEMV won every tuned int4 shape at M = 1 and 2 (session 6)
        warps = 8 if b == 1 else 4
        return cfg("gemv", 1, 16, 512, auto_split(1, N, K, 1, 16, 512, 2 * SMS), warps, 1)
    if b == 1:   # gemv programs hold few loads in flight: many K splits
        BN, BK, warps, target = 32, 128, 4, 8 * SMS
        return cfg("gemv", 1, BN, BK, auto_split(1, N, K, 1, BN, BK, target), warps, 1)
    if b <= 16:
        BM, BN, warps, stages = 16, 64, 4, 3
    elif b <= 64:
        BM, BN, warps, stages = b, 64, 4, 3
    else:
        BM, BN, warps, stages = 64, 128, 4, 3
    if kind.startswith("intq") and b > 16:
        # the int4 GEMM stages a [BK, BN] int32 word tile (each word once per code it holds) and,
        # for groups smaller than BK, [BK, BN] scales and zeros: with BM 64, 3-4 stages exceed the
        # 227 KB of shared memory (group 32, H100: 248-272 KB requested)
        BN, stages = 64, 2
    return cfg("gemm", BM, BN, 128, auto_split(M, N, K, BM, BN, 128, target=SMS if b > 64 else 2 * SMS),
               warps, stages)


def get(kind: str, M: int, N: int, K: int) -> dict:
    c = TUNED.get((kind, m_bucket(M), N, K))
    return dict(c) if c is not None else default(kind, M, N, K)


# Measured on one NVIDIA H100 80GB HBM3 (132 SMs, torch 2.11.0+cu130, triton 3.6.0) on 2026-11-25 by
# `python -m mixprec bench-kernels --tune --budget-s 100` (mixprec/kernels/bench.py): every candidate of
# `bench.candidates` was checked against the reference (SQNR >= 40 dB) and timed with CUDA-graph replay
# over cold weights (>= 256 MB of copies), bf16 activations; the fastest is kept. Shapes: Qwen3-30B-A3B
# and 235B-A22B qkv / o_proj / expert gate_up / down (lm_head was not tuned: defaults). The sym int4 and
# fp8 per-channel variants use the int4-asym and fp8-block entries. The M=1 rows of fp8 / int8 (and
# 30B down, lm_head) were re-tuned later the same day, with the wider-K GEMV candidates and the fp8
# scale folding, by `python -m mixprec bench-kernels --tune --ms 1 --variants "fp8 blk w8a8,fp8 blk
# w8a16,int8 w8a8,int8 w8a16" --baselines bf16 --budget-s 70`. The int4 rows of M = 1, 2, 4 were
# re-tuned in session 6 (2026-11-26, same device and versions) with the small-tile int4 GEMV
# (then named "gemvt", now the only int4 gemv) among the candidates: `python -m mixprec
# bench-kernels --tune --ms 1,2,4 --variants "int4 g128 asym" --baselines bf16,tinygemm
# --budget-s 150` (30B qkv M=1 10.3 -> 6.0 µs).
# The fp8_w8a8 rows of M = 32, 64, 256 were re-tuned in session 8 (2026-11-26, same device and
# versions) for the GEMM reading act_quant's codes from fp8.PRE_QUANT_M rows: `python -m mixprec
# bench-kernels --tune --ms 32,64,256 --variants "fp8 blk w8a8" --baselines "bf16,F.scaled_mm blk"
# --budget-s 200` (BN 64 won every shape; 235B qkv M=64 46.3 -> 26.0 µs with the old kernel's configs).
# The M=1 rows of fp8 / int8 were re-tuned in session 20 (2026-11-27, same device and versions) with
# 8-row GEMV programs over 1-2k K ranges among the candidates: `python -m mixprec bench-kernels --tune
# --ms 1 --variants "fp8 blk w8a8,fp8 blk w8a16,int8 w8a8,int8 w8a16" --baselines bf16 --budget-s
# 100`; a winner replaced the row only where it was >= 5% faster than the row's own config in that
# run (23 rows; 30B o_proj fp8 w8a8 7.84 -> 6.33 µs, 30B down 4.83 -> 2.86; benchmarks/linear_raw/
# session20_tune_m1_h100.*). The int4 M=1 rows likewise in session 21 (same device and versions):
# `python -m mixprec bench-kernels --tune --ms 1 --variants "int4 g128 asym" --baselines bf16,tinygemm
# --budget-s 110` (6 rows; 30B gate_up 5.15 -> 3.74 µs, 30B o_proj 6.66 -> 5.16, 235B gate_up 8.02
# -> 5.89; benchmarks/linear_raw/session21_tune_int4_m1_h100.*). The int4 M = 2, 4, 8 rows in session
# 22 (same device and versions) with GEMV programs of 2 / 4 rows (gemv column "BM": each word
# unpacked once for all of them) among the candidates: `python -m mixprec bench-kernels --tune --ms
# 2,4,8 --variants "int4 g128 asym" --baselines bf16,tinygemm --budget-s 240`, the same >= 5% rule (12
# rows; 235B down M=4 7.98 -> 6.07 µs, 30B o_proj M=2 7.52 -> 6.17; benchmarks/linear_raw/
# session22_tune_int4_m248_h100.*). Two more winners, 30B qkv / o_proj M=4 (8.88 -> 8.28, 8.51 ->
# 7.89), were left out: with them a 16-layer 30B int4-all decode at batch 4 ran 0.7% slower (two
# runs each; batch 2 +2.4% with the M=2 rows; benchmarks/runtime/session22_int4all_rows_ab_h100.log).
# The fp8 w8a8 M=1 rows in session 23 (same device and versions), after the GEMV's packed-fp16 word
# loop (fp8._gemv_f16_words): `python -m mixprec bench-kernels --tune --ms 1 --variants "fp8 blk w8a8"
# --baselines bf16 --budget-s 60`, the same >= 5% rule against the same-day library run (4 rows, three
# of them from the GEMM to the GEMV: 235B qkv 20.4 -> 15.6 µs, o_proj 17.1 -> 13.9, gate_up 7.0 ->
# 6.6, lm_head 113.5 -> 102.6; benchmarks/linear_raw/session23_tune_fp8_w8a8_m1_h100.log). A 16-layer
# 235B int4-experts + fp8-attention decode at batch 1, twice each: 506.6 / 506.8 -> 544.1 / 544.2
# tok/s (benchmarks/runtime/session23_235b_fp8_m1_tune_ab_h100.log).
# The int8 w8a8 M=1 rows in session 24 (same device and versions) with the dp4a word loop
# (int8._gemv_dp4a_words, "words") among the candidates: `python -m mixprec bench-kernels --tune --ms
# 1 --variants "int8 w8a8" --baselines bf16 --budget-s 60`, the same >= 5% rule against the row's own
# config in that run (8 rows, all now on the word loop: 30B qkv 7.94 -> 6.75 µs, o_proj 7.34 ->
# 6.44, gate_up 4.77 -> 4.36, down 4.87 -> 4.35; 235B qkv 18.88 -> 17.21, o_proj 16.65 -> 15.80,
# gate_up 8.48 -> 7.64, down 6.19 -> 5.56; lm_head 109.1 -> 104.5 left out;
# benchmarks/linear_raw/session24_tune_int8_w8a8_m1_h100.*). The fp8 w8a16 M=1 rows the same session
# after its GEMV moved to the packed-fp16 word loop (x over a power of two; same configs, the tree
# before -> after in one call: 30B qkv 6.74 -> 5.98 µs, o_proj 6.49 -> 5.35, gate_up 4.28 -> 3.36,
# down 3.11 -> 2.63; 235B qkv 17.1 -> 16.75, o_proj 16.72 -> 15.48, gate_up 7.9 -> 6.8, down 5.36 ->
# 4.84): `python -m mixprec bench-kernels --tune --ms 1 --variants "fp8 blk w8a16" --baselines bf16
# --budget-s 60`, the >= 5% rule (4 rows: lm_head 111.9 -> 101.8 from the GEMM to the GEMV, 235B qkv
# 16.75 -> 15.54, o_proj 15.48 -> 14.12, down 4.84 -> 4.53; benchmarks/linear_raw/
# session24_fp8_w8a16_words_h100.*).
# The fp8 / int8 w8a8 M = 2, 4, 8 rows in session 25 (same device and versions), with the batch-1
# word loops (one program per activation row) among the candidates: `python -m mixprec bench-kernels
# --tune --ms 2,4,8 --variants "fp8 blk w8a8,int8 w8a8" --baselines bf16 --budget-s 120`; a GEMV winner
# >= 5% faster than the best GEMM candidate became the row, then checked against the old rows in one
# call (18 rows, all >= 5% faster: 30B qkv fp8 M=2 8.98 -> 5.97 µs, o_proj 9.24 -> 6.14, int8 gate_up
# M=2 9.13 -> 4.72, 235B down fp8 M=2 7.92 -> 4.98; benchmarks/linear_raw/session25_*). 16-layer 30B
# decode at batch 2, two runs each, with the router change: fp8 +8.5%, int4 experts + fp8 attention
# +10.5%, int8 +5.9% (benchmarks/runtime/session25_rows_router_ab_h100.log).
# The fp8 rows of M = 2-16 in session 26 (same device and versions): `python -m mixprec bench-kernels
# --tune --ms 2,4,8,16 --variants "fp8 blk w8a8,fp8 blk w8a16" --baselines bf16 --budget-s 260`, the
# >= 5% rule, the winner re-timed against the row's own config in that run (17 rows: w8a16, not tuned
# at M = 2-8 before, now on the word loops: 30B qkv M=2 9.32 -> 6.11 µs, down M=4 5.39 -> 3.09, 235B
# gate_up M=2 10.49 -> 7.19; w8a8 30B down M=8 5.55 -> 5.12, gate_up M=2 3.70 -> 3.51;
# benchmarks/linear_raw/session26_tune_fp8_m2_16_h100.*). That tune also had GEMM "swap" tiles among
# its candidates (out^T = W x^T, fp8 wgmma): they won 13 w8a8 points by 5-8% alone (30B o_proj M=8
# 9.24 -> 8.18) but a 16-layer 30B decode at batch 8 / 16 ran 1.5-3% slower with them (their PDL
# launch lost its overlap: without PDL the step equalled the old rows); removed (BENCHMARKS.md
# session 26).
# The int4 rows with "mma" (the tensor-core GEMV, intq.mma_takes; "alt": the row they replaced, which
# act-order, groups under 128 and fp32 x keep) in session 36 on one H200 (torch 2.11.0+cu130, triton
# 3.6.0, 2026-11-28): `python -m mixprec bench-kernels --tune --ms 1,2,4,8 --variants "int4 g128
# asym" --baselines bf16 --budget-s 230` with the mma candidates and the library's own row in the
# same run; an mma winner >= 5% faster than the library row replaced it: 18 rows, all of 2-8
# activation rows (benchmarks/linear_raw/session36_tune_int4_mma_h200.*). At one row the mma tiles
# won only on the 235B o_proj (asym 12.74 -> 10.55 µs; left out: sym, GPTQ's, 9.8 -> 10.4 in the
# library A/B below) and the 30B head (by 4%). At 16 rows (two programs of 8 per column tile, the
# same day, `--tune --ms 16`, linear_raw/session36_tune_int4_mma_m16_h200.log) the mma tiles won on
# the 30B expert shapes as dense (asym / sym: gate_up 6.29 / 6.1 -> 5.63 / 5.31 µs, down 5.38 / 5.2 ->
# 3.87 / 4.02), taken, and on the 235B down for asym only (7.16 -> 5.84; sym 6.4 -> 6.7), not taken.
# The library before / after, both variants, twice alternated (session36_int4_mma_rows_ab_h200.log):
# asym 235B qkv M=4 17.5 -> 12.6, o_proj M=2 16.4 -> 11.1, down M=8 7.0 -> 5.1, 30B lm_head M=4
# 94.2 -> 66.9; sym the same or better but 30B qkv M=8 7.8 -> 8.1 and lm_head M=8 75.8 -> 76.9.
# Session 38 (one H200, same versions, 2026-11-29), the >= 5% rule against the library row timed in
# the same run: `python -m mixprec bench-kernels --tune --ms 16,32,64 --variants "fp8 blk w8a8"
# --baselines "bf16,F.scaled_mm blk" --budget-s 170` with BN-32 / deeper-pipeline GEMM candidates new
# at 17-64 rows (6 fp8 w8a8 rows: 30B qkv M=64 12.23 -> 11.58 µs, o_proj M=32 / 64 10.47 -> 9.90 /
# 12.37 -> 11.65, down M=16 5.53 -> 5.17, 235B down M=64 12.20 -> 11.34, fp8 head M=16 120.6 ->
# 88.4; linear_raw/session38_tune_fp8_w8a8_m16_64_h200.*), and `--tune --ms 1,2,4,8,16 --variants
# "int4 g128 asym" --baselines bf16,tinygemm --budget-s 170` with one- / two-warp mma candidates (6
# int4 rows: 235B gate_up M=2 / 4 / 8 / 16 8.17 -> 7.48, 8.22 -> 7.72, 8.56 -> 7.88, 9.93 -> 9.38,
# o_proj M=16 17.72 -> 15.92, 30B gate_up M=2 4.41 -> 4.02; linear_raw/session38_tune_int4_h200.*).
# That int4 tune ran before the tile's zero folding (gemv_mma, the same session), which both sides of
# the two mma-against-mma rows take. Left out: winners that move a row onto the mma tiles where GPTQ's
# sym was not timed (235B o_proj M=1 +21%, down M=16 +21%, 30B qkv M=16 +7%; session 36 saw sym lose
# at the first two). In decode (session 39, 16-layer 30B int4 experts + fp8 attention, batch 32 / 64,
# old / new alternated twice; runtime/session39_tuned_rows_ab_h200.log): -0.0% / +0.5%.
# Session 39 (same H200 kind and versions, 2026-11-29): `--tune --ms 1 --shapes 235B,30B --variants
# "fp8 blk w8a8" --baselines bf16 --budget-s 140` (linear_raw/session39_tune_fp8_w8a8_m1_deep_h200.*):
# one row, 30B qkv M=1 5.38 -> 5.02 µs (BN 8 over 1024-wide K tiles); in decode only together with
# the o_proj's early trigger (pdl.early_trigger; 30B batch 1 +2.4% for both).
# Session 46 (one H200, same versions, 2026-11-29), after the tensor-core tiles' 16-byte x loads
# (gemv_mma._xwords, session 45): `--tune --ms 1,2,4,8,16 --variants "int4 g128 asym" --baselines
# bf16 --budget-s 230` (linear_raw/session46_tune_int4_h200.*), the >= 5% rule against the library
# row in the same run, then the library before / after for asym and GPTQ's sym, twice alternated
# (linear_raw/session46_int4_rows_ab_h200.log), µs asym / sym: 235B o_proj M=1 12.8 -> 9.5 / 9.8 ->
# 9.7 (now on the tiles, 8 K splits), qkv M=2 / 4 12.6 -> 11.7 / 13.3 -> 11.2 (one K split), down
# M=16 7.2 -> 5.6 / 6.8 -> 5.4, 30B qkv M=16 8.9 -> 7.2 / 8.4 -> 7.0, down M=8 4.5 -> 4.4 / 4.8 -> 4.7,
# lm_head M=1-8 56.5-62.5 -> 46.1-50.2 / 46.9-62.4 -> 45.0-49.9 (64-row tiles, 2 warps from 2 rows).
# Left out: lm_head M=16 (asym 95.2 -> 80.6, sym 76.5 -> 78.8).
TUNED: dict[tuple[str, int, int, int], dict] = {
    ("fp8_w8a16", 1, 151936, 2048): cfg("gemv", 1, 8, 2048, 1, 4, 1),
    ("fp8_w8a16", 1, 2048, 768): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a16", 1, 1536, 2048): cfg("gemv", 1, 8, 2048, 1, 4, 1),
    ("fp8_w8a16", 1, 2048, 4096): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("fp8_w8a16", 1, 3072, 4096): cfg("gemv", 1, 8, 1024, 1, 8, 1),
    ("fp8_w8a16", 1, 4096, 1536): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("fp8_w8a16", 1, 4096, 8192): cfg("gemv", 1, 8, 2048, 1, 4, 1),
    ("fp8_w8a16", 1, 5120, 2048): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("fp8_w8a16", 1, 9216, 4096): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("fp8_w8a16", 2, 1536, 2048): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("fp8_w8a16", 2, 2048, 4096): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a16", 2, 3072, 4096): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a16", 2, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 2, 4096, 8192): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 2, 5120, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 2, 9216, 4096): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a16", 2, 2048, 768): cfg("gemv", 1, 8, 512, 1, 4, 1),
    ("fp8_w8a16", 4, 1536, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a16", 4, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("fp8_w8a16", 4, 3072, 4096): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 4, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 4, 4096, 8192): cfg("gemm", 16, 64, 128, 8, 4, 3),
    ("fp8_w8a16", 4, 5120, 2048): cfg("gemm", 16, 32, 128, 3, 4, 4),
    ("fp8_w8a16", 4, 9216, 4096): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("fp8_w8a16", 4, 2048, 768): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 8, 1536, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 8, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("fp8_w8a16", 8, 3072, 4096): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("fp8_w8a16", 8, 4096, 1536): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("fp8_w8a16", 8, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("fp8_w8a16", 8, 5120, 2048): cfg("gemm", 16, 32, 128, 3, 4, 4),
    ("fp8_w8a16", 8, 9216, 4096): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("fp8_w8a16", 8, 2048, 768): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a16", 16, 1536, 2048): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("fp8_w8a16", 16, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("fp8_w8a16", 16, 3072, 4096): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("fp8_w8a16", 16, 4096, 1536): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("fp8_w8a16", 16, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("fp8_w8a16", 16, 5120, 2048): cfg("gemm", 16, 32, 128, 3, 4, 4),
    ("fp8_w8a16", 16, 9216, 4096): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("fp8_w8a16", 16, 2048, 768): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("fp8_w8a16", 32, 1536, 2048): cfg("gemm", 16, 64, 128, 6, 4, 4),
    ("fp8_w8a16", 32, 2048, 4096): cfg("gemm", 32, 64, 128, 8, 4, 3),
    ("fp8_w8a16", 32, 3072, 4096): cfg("gemm", 32, 64, 128, 6, 4, 3),
    ("fp8_w8a16", 32, 4096, 1536): cfg("gemm", 32, 64, 128, 4, 4, 3),
    ("fp8_w8a16", 32, 4096, 8192): cfg("gemm", 32, 64, 128, 4, 4, 3),
    ("fp8_w8a16", 32, 5120, 2048): cfg("gemm", 32, 64, 128, 3, 4, 3),
    ("fp8_w8a16", 32, 9216, 4096): cfg("gemm", 32, 64, 128, 2, 4, 3),
    ("fp8_w8a16", 64, 1536, 2048): cfg("gemm", 32, 64, 128, 6, 4, 4),
    ("fp8_w8a16", 64, 2048, 4096): cfg("gemm", 32, 64, 128, 4, 4, 4),
    ("fp8_w8a16", 64, 3072, 4096): cfg("gemm", 64, 64, 128, 6, 4, 3),
    ("fp8_w8a16", 64, 4096, 1536): cfg("gemm", 32, 64, 128, 2, 4, 4),
    ("fp8_w8a16", 64, 4096, 8192): cfg("gemm", 64, 64, 128, 4, 4, 3),
    ("fp8_w8a16", 64, 5120, 2048): cfg("gemm", 64, 64, 128, 3, 4, 3),
    ("fp8_w8a16", 64, 9216, 4096): cfg("gemm", 64, 128, 128, 2, 4, 3),
    ("fp8_w8a16", 256, 1536, 2048): cfg("gemm", 64, 128, 128, 3, 4, 3),
    ("fp8_w8a16", 256, 2048, 4096): cfg("gemm", 128, 64, 128, 2, 4, 3),
    ("fp8_w8a16", 256, 3072, 4096): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a16", 256, 4096, 1536): cfg("gemm", 128, 64, 128, 1, 4, 3),
    ("fp8_w8a16", 256, 4096, 8192): cfg("gemm", 128, 128, 128, 2, 8, 3),
    ("fp8_w8a16", 256, 5120, 2048): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("fp8_w8a16", 256, 9216, 4096): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("fp8_w8a8", 1, 151936, 2048): cfg("gemv", 1, 8, 2048, 1, 4, 1),
    ("fp8_w8a8", 1, 2048, 768): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 1, 1536, 2048): cfg("gemv", 1, 8, 2048, 1, 4, 1),
    ("fp8_w8a8", 1, 2048, 4096): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("fp8_w8a8", 1, 3072, 4096): cfg("gemv", 1, 8, 1024, 1, 8, 1),
    ("fp8_w8a8", 1, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 1, 4096, 8192): cfg("gemv", 1, 8, 2048, 1, 4, 1),
    ("fp8_w8a8", 1, 5120, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 1, 9216, 4096): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 2, 1536, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 2, 2048, 4096): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 2, 3072, 4096): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 2, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 2, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 4, 3),
    ("fp8_w8a8", 2, 5120, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 2, 9216, 4096): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 2, 2048, 768): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 4, 1536, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("fp8_w8a8", 4, 2048, 4096): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 4, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 4, 3),
    ("fp8_w8a8", 4, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 4, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("fp8_w8a8", 4, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 4, 3),
    ("fp8_w8a8", 4, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 4, 3),
    ("fp8_w8a8", 4, 2048, 768): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 8, 1536, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 8, 2048, 4096): cfg("gemm", 16, 64, 128, 8, 4, 3),
    ("fp8_w8a8", 8, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 4, 3),
    ("fp8_w8a8", 8, 4096, 1536): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("fp8_w8a8", 8, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 4, 3),
    ("fp8_w8a8", 8, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 4, 3),
    ("fp8_w8a8", 8, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 4, 3),
    ("fp8_w8a8", 8, 2048, 768): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("fp8_w8a8", 16, 1536, 2048): cfg("gemm", 16, 32, 128, 11, 4, 4),
    ("fp8_w8a8", 16, 2048, 4096): cfg("gemm", 16, 64, 128, 8, 4, 3),
    ("fp8_w8a8", 16, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 4, 3),
    ("fp8_w8a8", 16, 4096, 1536): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("fp8_w8a8", 16, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("fp8_w8a8", 16, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 4, 3),
    ("fp8_w8a8", 16, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 4, 3),
    ("fp8_w8a8", 16, 2048, 768): cfg("gemm", 16, 128, 128, 6, 8, 3),
    ("fp8_w8a8", 16, 151936, 2048): cfg("gemm", 16, 128, 128, 1, 4, 3),
    ("fp8_w8a8", 32, 1536, 2048): cfg("gemm", 32, 64, 128, 6, 4, 3),
    ("fp8_w8a8", 32, 2048, 4096): cfg("gemm", 32, 32, 128, 4, 4, 4),
    ("fp8_w8a8", 32, 3072, 4096): cfg("gemm", 32, 64, 128, 6, 4, 3),
    ("fp8_w8a8", 32, 4096, 1536): cfg("gemm", 16, 64, 128, 2, 4, 4),
    ("fp8_w8a8", 32, 4096, 8192): cfg("gemm", 32, 64, 128, 4, 4, 3),
    ("fp8_w8a8", 32, 5120, 2048): cfg("gemm", 32, 64, 128, 3, 4, 3),
    ("fp8_w8a8", 32, 9216, 4096): cfg("gemm", 32, 64, 128, 2, 4, 3),
    ("fp8_w8a8", 32, 2048, 768): cfg("gemm", 16, 64, 128, 4, 4, 4),
    ("fp8_w8a8", 32, 151936, 2048): cfg("gemm", 32, 64, 128, 1, 4, 3),
    ("fp8_w8a8", 64, 1536, 2048): cfg("gemm", 32, 64, 128, 6, 4, 4),
    ("fp8_w8a8", 64, 2048, 4096): cfg("gemm", 64, 64, 128, 4, 4, 3),
    ("fp8_w8a8", 64, 3072, 4096): cfg("gemm", 64, 64, 128, 6, 4, 3),
    ("fp8_w8a8", 64, 4096, 1536): cfg("gemm", 64, 32, 128, 2, 4, 4),
    ("fp8_w8a8", 64, 4096, 8192): cfg("gemm", 64, 64, 128, 4, 4, 3),
    ("fp8_w8a8", 64, 5120, 2048): cfg("gemm", 64, 32, 128, 2, 4, 4),
    ("fp8_w8a8", 64, 9216, 4096): cfg("gemm", 64, 64, 128, 2, 4, 3),
    ("fp8_w8a8", 64, 2048, 768): cfg("gemm", 32, 64, 128, 4, 4, 4),
    ("fp8_w8a8", 64, 151936, 2048): cfg("gemm", 64, 64, 128, 1, 4, 3),
    ("fp8_w8a8", 256, 1536, 2048): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 2048, 4096): cfg("gemm", 128, 64, 128, 2, 4, 3),
    ("fp8_w8a8", 256, 3072, 4096): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 4096, 1536): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 4096, 8192): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 5120, 2048): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 9216, 4096): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 2048, 768): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("fp8_w8a8", 256, 151936, 2048): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("int8_w8a16", 1, 151936, 2048): cfg("gemv", 1, 32, 256, 1, 4, 1),
    ("int8_w8a16", 1, 2048, 768): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("int8_w8a16", 1, 1536, 2048): cfg("gemv", 1, 8, 1024, 1, 8, 1),
    ("int8_w8a16", 1, 2048, 4096): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("int8_w8a16", 1, 3072, 4096): cfg("gemv", 1, 8, 1024, 1, 8, 1),
    ("int8_w8a16", 1, 4096, 1536): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("int8_w8a16", 1, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 1, 5120, 2048): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("int8_w8a16", 1, 9216, 4096): cfg("gemv", 1, 4, 512, 1, 2, 1),
    ("int8_w8a16", 2, 1536, 2048): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("int8_w8a16", 2, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 2, 3072, 4096): cfg("gemm", 16, 64, 128, 6, 4, 3),
    ("int8_w8a16", 2, 4096, 1536): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("int8_w8a16", 2, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 2, 5120, 2048): cfg("gemm", 16, 64, 128, 7, 4, 3),
    ("int8_w8a16", 2, 9216, 4096): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("int8_w8a16", 4, 1536, 2048): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("int8_w8a16", 4, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 4, 3072, 4096): cfg("gemm", 16, 64, 128, 6, 4, 3),
    ("int8_w8a16", 4, 4096, 1536): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("int8_w8a16", 4, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 4, 5120, 2048): cfg("gemm", 16, 64, 128, 7, 4, 3),
    ("int8_w8a16", 4, 9216, 4096): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("int8_w8a16", 8, 1536, 2048): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("int8_w8a16", 8, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 8, 3072, 4096): cfg("gemm", 16, 64, 128, 6, 4, 3),
    ("int8_w8a16", 8, 4096, 1536): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("int8_w8a16", 8, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 8, 5120, 2048): cfg("gemm", 16, 32, 128, 3, 4, 4),
    ("int8_w8a16", 8, 9216, 4096): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("int8_w8a16", 16, 1536, 2048): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("int8_w8a16", 16, 2048, 4096): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 16, 3072, 4096): cfg("gemm", 16, 32, 128, 6, 4, 4),
    ("int8_w8a16", 16, 4096, 1536): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("int8_w8a16", 16, 4096, 8192): cfg("gemm", 16, 32, 128, 4, 4, 4),
    ("int8_w8a16", 16, 5120, 2048): cfg("gemm", 16, 32, 128, 3, 4, 4),
    ("int8_w8a16", 16, 9216, 4096): cfg("gemm", 16, 32, 128, 2, 4, 4),
    ("int8_w8a16", 32, 2048, 4096): cfg("gemm", 16, 64, 128, 4, 4, 4),
    ("int8_w8a16", 32, 3072, 4096): cfg("gemm", 32, 64, 128, 6, 4, 3),
    ("int8_w8a16", 32, 4096, 1536): cfg("gemm", 32, 64, 128, 4, 4, 3),
    ("int8_w8a16", 32, 4096, 8192): cfg("gemm", 32, 64, 128, 4, 4, 5),
    ("int8_w8a16", 32, 5120, 2048): cfg("gemm", 32, 64, 128, 3, 4, 3),
    ("int8_w8a16", 32, 9216, 4096): cfg("gemm", 32, 64, 128, 2, 4, 3),
    ("int8_w8a16", 64, 2048, 4096): cfg("gemm", 64, 64, 128, 4, 4, 3),
    ("int8_w8a16", 64, 3072, 4096): cfg("gemm", 64, 64, 128, 6, 4, 3),
    ("int8_w8a16", 64, 4096, 1536): cfg("gemm", 64, 64, 128, 2, 4, 3),
    ("int8_w8a16", 64, 4096, 8192): cfg("gemm", 64, 64, 128, 4, 4, 3),
    ("int8_w8a16", 64, 5120, 2048): cfg("gemm", 64, 64, 128, 3, 4, 3),
    ("int8_w8a16", 64, 9216, 4096): cfg("gemm", 64, 128, 128, 2, 4, 3),
    ("int8_w8a16", 256, 2048, 4096): cfg("gemm", 128, 64, 128, 2, 4, 3),
    ("int8_w8a16", 256, 3072, 4096): cfg("gemm", 128, 64, 128, 1, 4, 3),
    ("int8_w8a16", 256, 4096, 1536): cfg("gemm", 128, 64, 128, 1, 4, 3),
    ("int8_w8a16", 256, 4096, 8192): cfg("gemm", 128, 128, 128, 2, 8, 3),
    ("int8_w8a16", 256, 5120, 2048): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("int8_w8a16", 256, 9216, 4096): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("int8_w8a8", 1, 151936, 2048): cfg("gemm", 16, 64, 128, 1, 4, 5),
    ("int8_w8a8", 1, 2048, 768): cfg("gemv", 1, 4, 256, 1, 1, 1, words=True),
    ("int8_w8a8", 1, 1536, 2048): cfg("gemv", 1, 8, 2048, 1, 4, 1, words=True),
    ("int8_w8a8", 1, 2048, 4096): cfg("gemv", 1, 8, 2048, 1, 8, 1, words=True),
    ("int8_w8a8", 1, 3072, 4096): cfg("gemv", 1, 8, 2048, 1, 4, 1, words=True),
    ("int8_w8a8", 1, 4096, 1536): cfg("gemv", 1, 4, 512, 1, 1, 1, words=True),
    ("int8_w8a8", 1, 4096, 8192): cfg("gemv", 1, 8, 1024, 1, 4, 1, words=True),
    ("int8_w8a8", 1, 5120, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1, words=True),
    ("int8_w8a8", 1, 9216, 4096): cfg("gemv", 1, 8, 512, 1, 2, 1, words=True),
    ("int8_w8a8", 2, 1536, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1, words=True),
    ("int8_w8a8", 2, 2048, 4096): cfg("gemv", 1, 8, 1024, 1, 4, 1, words=True),
    ("int8_w8a8", 2, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 8, 3),
    ("int8_w8a8", 2, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 4, 1, words=True),
    ("int8_w8a8", 2, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 2, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 8, 3),
    ("int8_w8a8", 2, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 8, 3),
    ("int8_w8a8", 2, 2048, 768): cfg("gemv", 1, 8, 1024, 1, 4, 1, words=True),
    ("int8_w8a8", 4, 1536, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1, words=True),
    ("int8_w8a8", 4, 2048, 4096): cfg("gemm", 16, 128, 128, 16, 8, 3),
    ("int8_w8a8", 4, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 8, 3),
    ("int8_w8a8", 4, 4096, 1536): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 4, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 4, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 8, 3),
    ("int8_w8a8", 4, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 8, 3),
    ("int8_w8a8", 4, 2048, 768): cfg("gemv", 1, 16, 512, 1, 4, 1, words=True),
    ("int8_w8a8", 8, 1536, 2048): cfg("gemm", 16, 128, 128, 16, 8, 3),
    ("int8_w8a8", 8, 2048, 4096): cfg("gemm", 16, 128, 128, 16, 8, 3),
    ("int8_w8a8", 8, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 8, 3),
    ("int8_w8a8", 8, 4096, 1536): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 8, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 8, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 8, 3),
    ("int8_w8a8", 8, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 8, 3),
    ("int8_w8a8", 16, 1536, 2048): cfg("gemm", 16, 128, 128, 16, 8, 3),
    ("int8_w8a8", 16, 2048, 4096): cfg("gemm", 16, 128, 128, 16, 8, 3),
    ("int8_w8a8", 16, 3072, 4096): cfg("gemm", 16, 128, 128, 11, 8, 3),
    ("int8_w8a8", 16, 4096, 1536): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 16, 4096, 8192): cfg("gemm", 16, 128, 128, 8, 8, 3),
    ("int8_w8a8", 16, 5120, 2048): cfg("gemm", 16, 128, 128, 7, 8, 3),
    ("int8_w8a8", 16, 9216, 4096): cfg("gemm", 16, 128, 128, 4, 8, 3),
    ("int8_w8a8", 32, 1536, 2048): cfg("gemm", 16, 64, 128, 6, 4, 4),
    ("int8_w8a8", 32, 2048, 4096): cfg("gemm", 16, 64, 128, 4, 4, 4),
    ("int8_w8a8", 32, 3072, 4096): cfg("gemm", 16, 64, 128, 3, 4, 4),
    ("int8_w8a8", 32, 4096, 1536): cfg("gemm", 16, 64, 128, 2, 4, 4),
    ("int8_w8a8", 32, 4096, 8192): cfg("gemm", 16, 64, 128, 2, 4, 4),
    ("int8_w8a8", 32, 5120, 2048): cfg("gemm", 16, 64, 128, 2, 4, 4),
    ("int8_w8a8", 32, 9216, 4096): cfg("gemm", 16, 64, 128, 1, 4, 4),
    ("int8_w8a8", 64, 1536, 2048): cfg("gemm", 32, 64, 128, 6, 4, 4),
    ("int8_w8a8", 64, 2048, 4096): cfg("gemm", 32, 64, 128, 4, 4, 4),
    ("int8_w8a8", 64, 3072, 4096): cfg("gemm", 32, 64, 128, 3, 4, 4),
    ("int8_w8a8", 64, 4096, 1536): cfg("gemm", 32, 64, 128, 2, 4, 4),
    ("int8_w8a8", 64, 4096, 8192): cfg("gemm", 32, 64, 128, 2, 4, 4),
    ("int8_w8a8", 64, 5120, 2048): cfg("gemm", 32, 64, 128, 2, 4, 4),
    ("int8_w8a8", 64, 9216, 4096): cfg("gemm", 64, 128, 128, 2, 4, 3),
    ("int8_w8a8", 256, 1536, 2048): cfg("gemm", 64, 128, 128, 3, 4, 3),
    ("int8_w8a8", 256, 2048, 4096): cfg("gemm", 64, 128, 128, 2, 4, 3),
    ("int8_w8a8", 256, 3072, 4096): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("int8_w8a8", 256, 4096, 1536): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("int8_w8a8", 256, 4096, 8192): cfg("gemm", 128, 128, 128, 2, 8, 3),
    ("int8_w8a8", 256, 5120, 2048): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("int8_w8a8", 256, 9216, 4096): cfg("gemm", 64, 128, 128, 1, 4, 3),
    ("intq4", 1, 1536, 2048): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("intq4", 1, 2048, 768): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("intq4", 1, 2048, 4096): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("intq4", 1, 3072, 4096): cfg("gemv", 1, 8, 2048, 1, 8, 1),
    ("intq4", 1, 4096, 1536): cfg("gemv", 1, 16, 512, 1, 8, 1),
    ("intq4", 1, 4096, 8192): cfg("gemv", 1, 64, 128, 8, 4, 1, mma=True,
        alt=cfg("gemv", 1, 8, 2048, 1, 8, 1)),
    ("intq4", 1, 5120, 2048): cfg("gemv", 1, 8, 1024, 1, 4, 1),
    ("intq4", 1, 9216, 4096): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("intq4", 1, 151936, 2048): cfg("gemv", 1, 64, 128, 1, 4, 1, mma=True,
        alt=cfg("gemv", 1, 32, 256, 1, 4, 1)),
    ("intq4", 2, 1536, 2048): cfg("gemv", 2, 8, 2048, 1, 8, 1),
    ("intq4", 2, 2048, 768): cfg("gemv", 2, 16, 1024, 1, 8, 1),
    ("intq4", 2, 2048, 4096): cfg("gemv", 2, 8, 2048, 1, 8, 1),
    ("intq4", 2, 3072, 4096): cfg("gemv", 2, 8, 2048, 1, 8, 1),
    ("intq4", 2, 4096, 1536): cfg("gemv", 2, 16, 1024, 1, 8, 1),
    ("intq4", 2, 4096, 8192): cfg("gemv", 8, 32, 128, 4, 4, 1, mma=True,
        alt=cfg("gemv", 1, 16, 512, 1, 4, 1)),
    ("intq4", 2, 5120, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("intq4", 2, 9216, 4096): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemv", 2, 16, 512, 1, 4, 1)),
    ("intq4", 2, 151936, 2048): cfg("gemv", 8, 64, 128, 1, 2, 1, mma=True,
        alt=cfg("gemv", 2, 32, 256, 1, 4, 1)),
    ("intq4", 4, 1536, 2048): cfg("gemv", 1, 16, 512, 1, 4, 1),
    ("intq4", 4, 2048, 768): cfg("gemv", 4, 16, 1024, 1, 8, 1),
    ("intq4", 4, 2048, 4096): cfg("gemv", 8, 32, 128, 4, 4, 1, mma=True,
        alt=cfg("gemm", 16, 128, 128, 16, 8, 3)),
    ("intq4", 4, 3072, 4096): cfg("gemv", 8, 32, 128, 6, 2, 1, mma=True,
        alt=cfg("gemm", 16, 128, 128, 11, 8, 3)),
    ("intq4", 4, 4096, 1536): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemv", 4, 16, 512, 1, 4, 1)),
    ("intq4", 4, 4096, 8192): cfg("gemv", 8, 32, 128, 4, 4, 1, mma=True,
        alt=cfg("gemm", 16, 128, 128, 8, 8, 3)),
    ("intq4", 4, 5120, 2048): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 128, 128, 7, 8, 3)),
    ("intq4", 4, 9216, 4096): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 4, 4, 3)),
    ("intq4", 4, 151936, 2048): cfg("gemv", 8, 64, 128, 1, 2, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 1, 4, 3)),
    ("intq4", 8, 1536, 2048): cfg("gemv", 8, 32, 128, 3, 4, 1, mma=True,
        alt=cfg("gemm", 16, 32, 128, 11, 4, 4)),
    ("intq4", 8, 2048, 4096): cfg("gemv", 8, 32, 128, 4, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 8, 4, 3)),
    ("intq4", 8, 3072, 4096): cfg("gemv", 8, 32, 128, 6, 2, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 6, 4, 3)),
    ("intq4", 8, 2048, 768): cfg("gemv", 8, 32, 128, 4, 2, 1, mma=True,
        alt=cfg("gemv", 4, 32, 256, 1, 4, 1)),
    ("intq4", 8, 4096, 1536): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 4, 4, 5)),
    ("intq4", 8, 4096, 8192): cfg("gemv", 8, 32, 128, 4, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 8, 4, 3)),
    ("intq4", 8, 5120, 2048): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 7, 4, 3)),
    ("intq4", 8, 9216, 4096): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 4, 4, 3)),
    ("intq4", 8, 151936, 2048): cfg("gemv", 8, 64, 128, 1, 2, 1, mma=True),
    ("intq4", 16, 1536, 2048): cfg("gemv", 8, 32, 128, 1, 8, 1, mma=True,
        alt=cfg("gemm", 16, 32, 128, 11, 4, 4)),
    ("intq4", 16, 2048, 768): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True),
    ("intq4", 16, 2048, 4096): cfg("gemm", 16, 64, 128, 8, 4, 3),
    ("intq4", 16, 3072, 4096): cfg("gemm", 16, 64, 128, 11, 4, 3),
    ("intq4", 16, 4096, 1536): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 4, 4, 3)),
    ("intq4", 16, 4096, 8192): cfg("gemm", 16, 64, 128, 8, 4, 3),
    ("intq4", 16, 5120, 2048): cfg("gemv", 8, 32, 128, 1, 4, 1, mma=True,
        alt=cfg("gemm", 16, 64, 128, 3, 4, 3)),
    ("intq4", 16, 9216, 4096): cfg("gemm", 16, 64, 128, 4, 4, 3),
    ("intq4", 32, 1536, 2048): cfg("gemm", 32, 64, 128, 6, 4, 3),
    ("intq4", 32, 2048, 4096): cfg("gemm", 32, 64, 128, 8, 4, 3),
    ("intq4", 32, 3072, 4096): cfg("gemm", 32, 64, 128, 6, 4, 3),
    ("intq4", 32, 4096, 1536): cfg("gemm", 32, 64, 128, 4, 4, 3),
    ("intq4", 32, 4096, 8192): cfg("gemm", 32, 64, 128, 4, 4, 3),
    ("intq4", 32, 5120, 2048): cfg("gemm", 32, 64, 128, 3, 4, 3),
    ("intq4", 32, 9216, 4096): cfg("gemm", 32, 64, 128, 1, 4, 3),
    ("intq4", 64, 1536, 2048): cfg("gemm", 64, 64, 128, 6, 4, 3),
    ("intq4", 64, 2048, 4096): cfg("gemm", 64, 64, 128, 4, 4, 3),
    ("intq4", 64, 3072, 4096): cfg("gemm", 64, 128, 128, 6, 4, 3),
    ("intq4", 64, 4096, 1536): cfg("gemm", 64, 64, 128, 2, 4, 3),
    ("intq4", 64, 4096, 8192): cfg("gemm", 64, 64, 128, 2, 4, 3),
    ("intq4", 64, 5120, 2048): cfg("gemm", 64, 128, 128, 3, 4, 3),
    ("intq4", 64, 9216, 4096): cfg("gemm", 64, 64, 128, 2, 4, 3),
    ("intq4", 256, 1536, 2048): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("intq4", 256, 2048, 4096): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("intq4", 256, 3072, 4096): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("intq4", 256, 4096, 1536): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("intq4", 256, 4096, 8192): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("intq4", 256, 5120, 2048): cfg("gemm", 64, 64, 128, 1, 4, 4),
    ("intq4", 256, 9216, 4096): cfg("gemm", 64, 64, 128, 1, 4, 4),
}
