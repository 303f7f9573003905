"""Launch configurations of the fused MoE kernels (moe_triton.py).

Swept on one H100 80GB HBM3 (torch 2.11.0+cu130, triton 3.6.0) on 2026-11-25 (session 4) by
`python -m mixprec bench-moe --sweep --check --out DIR` (benchmarks/moe.md): every candidate of
moe_bench.GEMV_CANDIDATES / DOT_CANDIDATES timed on uniform int4, fp8 and bf16 layers of both
Qwen3 shapes (cold weights, CUDA graphs). Joint winners (GEMV, GEMV_MAX_M, DOT) minimise the sum
of times relative to the best candidate over the three formats and serve launches that mix
layouts; GEMV_LAYOUT holds each layout's own GEMV winner and GEMV/dot crossover, used by a side
(gate/up or down) whose buckets all share that layout. Rows set later name their session, device
(H100 or H200), command and log beside them.

GEMV path (one (token, expert) pair per program, fp32 FMA): decode, M <= the crossover.
Dot path (BM sorted pairs of one expert per program, tensor cores): everything larger. Session 10
re-chose the dot rows and the crossovers on real mixed layers as well as uniform ones
(scripts/sweep_moe_dot.py, benchmarks/moe.md); its batch-1 dot rows (DOT_M1, K split over 2
programs per tile) gave way to GEMV rows in session 33.
BK* are the K tiles per layout (D dense, F fp8, Q intq, I int8); BK is lowered automatically
where a format's block needs it (an fp8 GEMV tile spans blocks only when its rows share a scale
row; the W8A8 dot path uses 128). `split`: programs per output tile (K chunks; on the GEMV path
also the gate / up halves). `gu` (GEMV configs): a launch of gate_up weights only runs gate and
up in one K loop (moe._gate_up_fused; the dot path decides that without a key). `f16` (GEMV
configs): the packed word loops: int4 slots in fp16 math (gemv_tiles); fp8 W8A8 slots whose tile
rows share a scale row likewise (moe_triton._gemv_fp8_words) and int8 W8A8 slots as dp4a
(_gemv_int8_words). Offline SASS of the 30B batch-1 launches, instructions per loop step (session
23): fp8 gate/up 423 -> 173, down 239 -> 102; int8 gate/up 173 -> 45, down 98 -> 36; the rows that
set it were timed in session 24 (GEMV_M1's note). `mma` (GEMV configs, BN 16 / 32 gate/up rows or
32 / 64 down rows): int4 slots of 128-input groups on the tensor cores (gemv_mma; ~16 instructions
per int4 word against the fp16 loop's ~27, fp32 accumulation). `mma` on a dot row (BM 8; rows for
int4 layers only: DOT_INTQ_MMA): each block of 8 pairs on the same tiles, the pairs as the mma's 8
columns; in a layer that mixes int4 with fp8 / int8 / bf16 the other slots run their dots on 16
rows, 8 of them masked off: no row takes that (H200, session 39, scripts/sweep_moe_dot.py: 0.98-1.67x
the picked row's time on the 30B / 235B mixes at 8-64 tokens).
"""
from __future__ import annotations

# the GEMV/dot crossover of a side whose buckets mix layouts. Session 10 (H200, one run, route +
# fused_moe per layer, µs, GEMV with the config below vs the dot row of M <= 128, K unsplit): M=2
# 30B int4+fp8 55.8 vs 53.9, the runtime's mixed preset 55.5 vs 55.9, 235B 151.3 vs 105.3 / 135.8
# vs 113.7; M=4 30B 80.3 vs 67.0 / 83.1 vs 72.8, 235B 225.0 vs 170.1 / 231.4 vs 179.1. (Session 5
# had the GEMV ahead at M=2, before the int4 dot tiles got faster in session 8.)
GEMV_MAX_M = 1

# side -> config; "up" computes gate and up tiles of BN columns each (fused silu*mul), "down" BN rows of H.
# Serves launches that mix layouts at M=1 for shapes GEMV_M1 does not list. Session 6
# sweep at M=4 (H100, both shapes, int4 / fp8 / bf16): this config has the least summed relative
# time (30B int4 50.9, fp8 76.5 µs vs 55.6 / 97.0 with the session-4 joint winner)
GEMV = {
    "up": dict(BN=64, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=8, num_stages=1),
    "down": dict(BN=64, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=8, num_stages=1),
}

# (max tokens, config): the first row whose bound >= M is used
DOT = [
    # BKQ 128: int4 tiles of one group take the per-field dot path (scripts/diag_int4_dot.py, H100,
    # session 4: 30B M=32/64 314/334 -> 221/255 µs, 235B 1032/1131 -> 740/834 µs vs BKQ 64).
    # Session 10 (H200, one run, µs per layer at M=32, this row vs the BN=128 / BKD=BKI=64 row it
    # replaced for M = 9..128): 30B int4 172.2 vs 183.4, fp8 185.6 vs 192.2, bf16 286.3 vs 303.4,
    # int8 183.6 vs 245.6, int4+fp8 175.0 vs 199.3; 235B int4 544.4 vs 555.3, int8 563.9 vs 833.9,
    # int4+fp8 519.2 vs 598.8; faster on all 36 (shape, mix, M = 32/64/128) points. The 128-wide
    # dense / int8 K tiles are most of it; 64 columns balance launches that mix layouts better.
    # H100, same comparison at M=32/64 (moe_diag/session10_dot_m32_64_h100.log): faster on 21 of 24
    # points (30B int8 237.7 vs 292.3, int4 174.6 vs 187.2), 235B fp8 0.7-1.3% slower, 235B bf16 at
    # M=32 1728 vs 1538 (at M=64 1623 vs 1689)
    (128, dict(BM=16, BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3)),
    # prefill. Session 10 (H100, M = 512 / 2048, µs per layer, this vs the 8-warp BKQ=BKI=64 row it
    # replaced; moe_diag/session10_prefill2_h100.log): 30B int4 617 / 1837 vs 750 / 2183, int8 513 /
    # 1389 vs 547 / 1492, fp8 561 / 1619 vs 597 / 1690, bf16 equal; 235B int4 1631 / 4173 vs 2132 /
    # 5679, fp8 1386 / 3233 vs 1465 / 3718, bf16 2022 / 3648 vs 2244 / 3731, int8 1234 / 2586 vs
    # 1372 / 3050
    (1 << 30, dict(BM=64, BN=128, BKD=64, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3)),
]


# layout -> (largest M for the GEMV path, GEMV config) for a side whose buckets all have that
# layout (uniform layers, or one side of a per-projection mix): its own BN / warps and crossover
# instead of the joint ones above. Each side picks its path: the two paths exchange the
# intermediate by pair index (perproj int4 gate/up on the GEMV path, fp8 down on the dot path).
GEMV_LAYOUT: dict[str, tuple[int, dict]] = {
    # swept (see the module docstring; benchmarks/moe.md, session 4, two sweeps that agree on these
    # winners; dense's crossover came out 8 and 1 in the two runs: 8 kept, its GEMV rows at M=2-8 beat
    # the dot rows of the other run by 3-13%)
    # intq, session 8 (the dot path's activations one prefetched tile): the isolated 235B layer
    # was faster on the dot path from M=8 (H100 bench-moe, M=8 247.0 -> 233.5 µs, M=16 463 -> 408),
    # but the 235B decode step at batch 8 slower (H200, same call: 284.0 -> 264.9 tok/s). Session
    # 10 (H200): at M=16 the dot row beats the GEMV on both shapes (30B 124.7 vs 137.7 µs, 235B 380.8
    # vs 464.4), at M=8 only on the 235B (240.3 vs 247.7; 30B 85.1 vs 76.1): crossover 8
    # "gu": gate and up in one K loop (moe._gate_up_fused). Session 16 (H100, route + layer, µs,
    # two loops vs one; moe_diag/session16_gemv_gate_up_h100.log): 30B M=2 31.7 vs 29.7, M=4 47.5
    # vs 48.8, M=8 78.6 vs 75.1; 235B M=2 78.8 vs 82.0, M=4 142.9 vs 134.2, M=8 249.3 vs 237.4
    # "f16": int4 words in packed fp16 math (gemv_tiles.gemv_intq_cols). Session 21 (H100, bench-moe,
    # route + layer, µs, fp32 loop -> fp16 loop; moe_diag/session21_f16_moe_ab_h100.log): 235B M=2
    # 80.4 -> 73.4, M=8 234.2 -> 207.3; 30B M=2 30.3 -> 31.9 (the one loss), M=8 73.5 -> 70.6. Off at
    # M=1 (GEMV_M1): a first version lost on the 30B (20.7 -> 21.5) and gained 4% on the 235B
    "intq": (8, dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1, gu=True, f16=True)),
    # fp8, session 33 (H200, `python scripts/sweep_moe_m1.py --tokens 2,4 --config fp8`, route +
    # layer, µs, each side against the dot row with the other side on it; moe_diag/
    # session33_m24_fp8_h200.log): the word loops (f16) with BKF 256 on the GEMV path up to 4 tokens
    # (was 1: dot from 2, set before the word loops), gate/up 30B M=2 41.5 -> 38.0, M=4 58.0 -> 55.2,
    # 235B 96.8 -> 95.2, 155.6 -> 154.1; down 39.7 / 55.4 / 91.3 / 150.3. Decode of a 16-layer model,
    # old/new alternated twice (runtime/session33_fp8_gemv24_ab_h200.log), tok/s: 30B batch 2 1692.5 /
    # 1692.1 -> 1888.9 / 1889.6, batch 4 2515.0 / 2515.4 -> 2770.9 / 2772.8; 235B 739.8 / 739.6 ->
    # 795.1 / 795.3, 1072.5 / 1072.9 -> 1139.3 / 1139.6. At 8 tokens the dot row stays (same sweep,
    # --tokens 8, moe_diag/session33_m8_fp8_h200.log: 235B every GEMV side 0-8% slower, 30B 1-5%
    # faster)
    "fp8": (4, dict(BN=32, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=4, num_stages=1, gu=True, f16=True)),
    # dense "gu": session 17 (H100, route + layer, µs, two loops vs one; moe_diag/
    # session17_gate_up_all_h100.log): 30B M=2 63.7 vs 66.5, M=4 110.1 vs 106.8, M=8 171.8 vs 171.4;
    # 235B 216.6 vs 207.9, 369.1 vs 367.6, 631.0 vs 622.0; runtime bf16 batch 4 537.7 -> 549.7 tok/s
    # (+2.2%), batch 8 732.1 -> 735.5 (two runs each, same call)
    "dense": (8, dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True)),
    # int8, session 17 (the session-3 joint config before, never swept for int8): the GEMV_GU_CANDIDATES
    # at M=1-8 (H100, route + layer, µs, that config vs this; moe_diag/session17_sweep_gemv_gu_*):
    # 30B M=1 39.9 vs 33.8, M=2 51.8 vs 52.2, M=4 85.9 vs 78.9, M=8 127.5 vs 120.7; 235B M=2 155.8
    # vs 139.3, M=4 245.8 vs 232.2, M=8 401.9 vs 397.4; runtime int8 batch 1 282.9 -> 308.8 tok/s
    # f16 (int8 W8A8 slots as dp4a): session 24, see GEMV_M1's f16 note
    "int8": (8, dict(BN=8, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1, gu=True, f16=True)),
}


# batch-1 decode (M=1): (layout, hidden size) -> GEMV config, and ("mixed", hidden) for launches
# that mix layouts; the M=1 winners differ from the M<=16 ones above. Swept on an H100 in session
# 6 (`python -m mixprec bench-moe --sweep --sweep-paths gemv --tokens 1,2,4`, moe_bench.m1_winners;
# µs per layer, winner vs the config used before): 30B fp8 36.4 vs 43.0, int4 23.4 vs 26.1, bf16
# 39.3 vs 41.9; 235B int4 48.1 vs 50.7. A second run, table vs table (with a scale / x prefetch
# in the tile loops that changed nothing and was dropped): 30B fp8 43.3 -> 35.5, int4 24.9 ->
# 22.5, bf16 42.3 -> 39.1, int4+fp8 44.2 -> 40.8; 235B int4 50.8 -> 48.2. Winners within run-to-run
# noise (235B fp8 / bf16, < 4%) are not listed; what is not listed uses the tables above.
# 235B fp8 and mixed: session 33, see GEMV_M1_DOWN's ("fp8", 4096).
# the long-K gate/up tile most M=1 rows share (gate and up in one loop); rows differ in BN / warps
_GU512 = dict(BKD=256, BKF=512, BKQ=512, BKI=256, num_stages=1, gu=True)
_INT8_GU = dict(_GU512, BN=8, num_warps=2, f16=True)     # int8 layers at M=1, both shapes (below)
GEMV_M1: dict[tuple[str, int], dict] = {
    # gu (see GEMV_LAYOUT): session 16, 30B M=1 23.7 -> 22.4 µs; 235B 50.1 -> 53.0 (kept off)
    ("intq", 2048): dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True),
    # session 17: gate and up in one K loop on every layout (the GEMV-M1 rows before had two:
    # fused with their old tiles the fp8 / bf16 layers were slower, 30B fp8 36.9 -> 39.5 µs); swept
    # with the GEMV_GU_CANDIDATES (H100, route + layer, µs, the row before vs this;
    # moe_diag/session17_sweep_gemv_gu_*): 30B fp8 35.7 vs 33.4, bf16 40.9 vs 38.5, int8 39.9 vs
    # 33.8 (GEMV_LAYOUT's int8 row now), the runtime's mixed preset 41.8 vs 37.9, int4+fp8 38.6 vs
    # 34.4; 235B bf16 124.7 vs 116.7. Runtime, same H100 call, two runs each
    # (runtime/session17_gemv_m1_ab_h100.json), decode batch 1 tok/s: 30B fp8 300.3 -> 312.1,
    # mixed preset 284.5 -> 299.5, bf16 269.4 -> 273.9, int8 282.9 -> 308.8; 235B (8 layers) bf16
    # 493.8 -> 508.0; batch 2 unchanged
    # f16 on the fp8 / int8 word loops (moe_triton._gemv_fp8_words / _gemv_int8_words): session 24
    # (H100, `scripts/sweep_moe_dot.py --f16 --grid "" --tokens 1,2,4,8 --configs fp8,int8,rt_mixed`,
    # route + layer, µs, pick -> pick + f16; moe_diag/session24_f16_words_sweep_h100.log): 30B fp8 M=1
    # 31.6 -> 28.9, mixed preset M=1 35.4 -> 33.3, int8 M=2 / 4 / 8 51.9 -> 44.3 / 78.7 -> 66.8 / 121.7
    # -> 105.6; 235B int8 M=1 / 2 / 4 / 8 86.3 -> 74.6 / 138.7 -> 121.4 / 232.8 -> 211.2 / 398.4 ->
    # 342.4. Decode of a 16-layer 30B model, two runs each (runtime/session24_f16_words_ab_h100.log),
    # tok/s: fp8 batch 1 884.6 / 886.4 -> 919.2 / 919.8, mixed preset 861.8 / 859.2 -> 878.4 / 876.9,
    # int8 batch 2 1237.6 / 1239.0 -> 1338.3 / 1339.0, batch 4 1889.9 / 1891.3 -> 2080.5 / 2071.2.
    # Set on these rows, their GEMV_M1_DOWN rows and GEMV_LAYOUT's int8 row (a mixed launch's int4
    # slots then run the fp16 loop too, as measured)
    ("fp8", 2048): dict(_GU512, BN=4, BKF=256, num_warps=1, f16=True),
    ("dense", 2048): dict(BN=8, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1, gu=True),
    # BKF 512 and the down row's BKF 256: session 32, see GEMV_M1_DOWN's ("mixed", 2048)
    ("mixed", 2048): dict(_GU512, BN=4, num_warps=1, f16=True),
    # f16 (GEMV_LAYOUT's "f16"), 235B shapes only: session 22 (H100), bench-moe route + layer
    # 48.5 -> 44.0 µs (moe_diag/session22_x_planes_moe_h100.log, with the down row below); decode of
    # a 16-layer 235B int4 model, batch 1, two runs each: 488.3 / 488.3 -> 507.0 / 506.7 tok/s
    # (runtime/session22_235b_m1f16_ab_h100.log). The 30B rows stay on the fp32 loop (20.7 -> 21.6 µs).
    # gu with f16: session 31 (H100, route + layer, µs, 3 rounds alternated; `python scripts/sweep_moe_m1.py`,
    # moe_diag/session31_sweep_m1_h100.log): 42.01 -> 40.42 (BN 32 tiles, with or without gu, 43.4-47.4)
    # mma (gemv_mma: int4 slots of 128-input groups on the tensor cores, gate and up of 32 rows):
    # session 35 (H200, `python scripts/sweep_moe_m1.py --only mma32/4,...`, route + layer, µs,
    # 3 rounds; moe_diag/session35_int4_mma_*_h200.log): 37.66 -> 36.13 (this row: BN 16 word loop
    # -> BN 32 mma tiles); its down tiles lost (38.9-47.9 against 37.6), the 30B rows too
    # (gate/up 18.7 -> 18.6-26.5, down -> 20.1-22.8). Decode: BENCHMARKS.md session 35
    ("intq", 4096): dict(BN=32, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True, f16=True,
                         mma=True),
    ("dense", 4096): dict(_GU512, BN=4, num_warps=2),
    ("fp8", 4096): dict(_GU512, BN=4, num_warps=1, f16=True),
    # int8, 235B: session 33 (H200, `python scripts/sweep_moe_m1.py --shapes 235b --config int8`,
    # gate/up against GEMV_LAYOUT's int8 row; moe_diag/session33_m1_235b_int8_h200.log): 56.3 ->
    # 51.8 µs (BKI 256); the down side keeps that row (GEMV_M1_DOWN), no candidate beat it. Decode,
    # 16-layer 235B int8, batch 1, old/new twice (runtime/session33_int8_m1_235b_ab_h200.log): 533.8 /
    # 533.6 -> 555.2 / 555.5 tok/s. 30B: session 34, same sweep with --shapes 30b
    # (moe_diag/session34_sweeps_h200.log): 28.68 -> 25.38 µs with the 235B's row; decode:
    # BENCHMARKS.md session 34
    ("int8", 2048): _INT8_GU,
    ("int8", 4096): _INT8_GU,
    ("mixed", 4096): dict(_GU512, BN=16, num_warps=4, f16=True),
}

# layers whose buckets hold exactly these layouts (both sides together), from 2 tokens: rows in
# order of max_m, the first row with m <= max_m gives the GEMV configs of a side that mixes layouts
# (a side of one layout keeps its GEMV_LAYOUT row); past the last row, the dot path. Measured with
# `python scripts/sweep_moe_m1.py --tokens 2,4,8 --config C --pairs` (route + layer, µs, 3 rounds
# alternated), dot rows -> GEMV:
# - int4 + fp8 (50/50 experts, W8A8), the intq GEMV row on both sides. Session 31 (H100,
#   moe_diag/session31_sweep_mixed_pairs_h100.log): 30B M=2 49.2 -> 37.1, M=4 65.4 -> 52.6, M=8 102.4
#   -> 83.5; 235B 114.9 -> 101.6, 202.2 -> 163.4, 299.0 -> 275.5. Session 33 (H200,
#   moe_diag/session33_pairs_int4fp8_h200.log): the fp8 K tile as long in loop steps as the int4
#   one (BKF 256) is no better: 30B 33.9 -> 32.9, 45.4 -> 50.1, 73.0 -> 74.0; 235B 79.4 -> 86.6,
#   131.9 -> 131.3, 228.1 -> 218.9.
# - the runtime's mixed preset (moe_bench "rt_mixed": int4 experts, fp8 gate/up + bf16 down, int8 +
#   fp8 down). 2-4 tokens, BN 16 gate/up and BN 32 / 8-warp down tiles: session 32 (H200,
#   moe_diag/session32_sweep_rt_mixed_pairs_h200.log), 30B M=2 47.7 -> 38.3, M=4 66.8 -> 58.5; 235B
#   107.9 -> 94.3, 172.0 -> 162.8. 5-8 tokens, the intq row with BKF 256 on both sides: session 33
#   (H200, moe_diag/session33_pairs_rtmixed_h200.log), M=8 30B 96.4 -> 84.4, 235B 250.1 -> 253.1
#   (the 2-4 token row there: 91.4 / 276.3).
# int4 + fp8 + bf16 (a third each) stays on the dot rows: the same pairs were 4-17% slower on the
# 235B at 2-8 tokens, within 5% either way on the 30B (moe_diag/session32_sweep_3fmt_pairs_h200.log).
# Other mixes keep GEMV_MAX_M.
GEMV_MIXED: dict[frozenset, tuple[dict, ...]] = {
    frozenset({"intq", "fp8"}): (dict(max_m=GEMV_LAYOUT["intq"][0], up=GEMV_LAYOUT["intq"][1], down=GEMV_LAYOUT["intq"][1]),),
    frozenset({"intq", "fp8", "int8", "dense"}): (
        dict(max_m=4, up=dict(BN=16, BKD=128, BKF=256, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True, f16=True),
             down=dict(BN=32, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=8, num_stages=1, f16=True)),
        dict(max_m=8, up=dict(GEMV_LAYOUT["intq"][1], BKF=256), down=dict(GEMV_LAYOUT["intq"][1], BKF=256))),
}

# batch-1 decode, the down side: (layout, hidden size) -> GEMV config, before GEMV_M1 (whose rows
# were swept with one config for both sides). Session 18 (H100, route + layer, µs, the GEMV_M1 row
# vs this on the down side, the gate/up side unchanged; `scripts/sweep_moe_dot.py --down --tokens
# 1`, moe_diag/session18_sweep_down_*): 30B int4 22.3 vs 21.3, fp8 34.9 vs 32.9, the runtime's
# mixed preset (int4, bf16 and fp8 down) 37.7 vs 34.9; 235B int4 48.9 vs 47.1 (the sweep's noise is
# ~5%: one tile timed twice, 33.5 / 31.7). Judged by the runtime, same H100 call, two interleaved
# runs, decode batch 1 tok/s (runtime/session18_down_m1_ab_h100.json): 30B int4 380.4 -> 388.5,
# fp8 312.3 -> 322.0, mixed preset 300.5 -> 310.6; 235B int4 (8 layers) 777.0 -> 789.0. Wider
# tiles (32-64 rows, 4-8 warps) than the gate/up side's 4-16
_DOWN32 = dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1)
GEMV_M1_DOWN: dict[tuple[str, int], dict] = {
    # f16: session 31 (same sweep as GEMV_M1's ("intq", 4096)): 30B 20.22 -> 19.86 µs; BN 16 / 64
    # tiles 23.4-23.8
    ("intq", 2048): dict(_DOWN32, f16=True),
    ("intq", 4096): dict(_DOWN32, f16=True),   # session 22: see GEMV_M1's ("intq", 4096)
    ("fp8", 2048): dict(_DOWN32, BN=64, num_warps=8, f16=True),   # f16: session 24, see GEMV_M1
    # session 32 (H200, `python scripts/sweep_moe_m1.py --config C`, route + layer, µs, 3 rounds;
    # moe_diag/session32_sweep_m1_*_h200.log): BKD 128 / 4 warps (was BKD 64 / 8 warps), the
    # runtime's mixed preset 31.06 -> 29.04, int4 + fp8 + bf16 32.44 -> 29.86, int4 + fp8 25.76 -> 25.61.
    # Then the fp8 K tiles as long in loop steps as the int4 ones (BKF 256 here, 512 in GEMV_M1's row:
    # a one-wave launch ends with its slowest programs, the fp8 ones had twice the steps), same sweep
    # with --mixed-m1 (moe_diag/session32_sweep_m1_ktiles_*_h200.log): int4 + fp8 up 25.69 -> 24.98, down ->
    # 24.78; mixed preset 29.20 -> 29.55 / 28.78; int4 + fp8 + bf16 29.83 -> 29.83 / 30.18 (longer
    # bf16 / int8 tiles lost 3-10%). 16-layer 30B decode, batch 1, two runs each
    # (runtime/session32_m1_fp8_ktiles_*): int4 + fp8 per expert 1085.4 / 1084.5 -> 1124.8 / 1123.9
    # tok/s, mixed preset 1042.0 / 1042.9 -> 1044.2 / 1044.4
    ("mixed", 2048): dict(_DOWN32, BKD=128, BKF=256, f16=True),
    # 235B fp8 and mixed layers took the dot path at M=1 (DOT_M1: BM 16 tiles, K in 2 chunks; set
    # in session 10, before the fp8 GEMV word loops of session 24). Session 33 (H200, `python
    # scripts/sweep_moe_m1.py --shapes 235b --config C`, route + layer, µs, 3 rounds, each side
    # against the dot row with the other side on it; moe_diag/session33_m1_235b_*_h200.log): fp8 67.2
    # -> 61.4 (gate/up) / 61.6 (down); int4 + fp8 66.8 -> 61.3 / 61.5; the runtime's mixed preset
    # 75.9 -> 72.1 / 74.2; int4 + fp8 + bf16 75.9 -> 80.7 (gate/up: the one loss) / 75.7. Both sides
    # together, decode of a 16-layer 235B model, batch 1, old/new alternated (runtime/
    # session33_235b_m1_gemv_*), tok/s: fp8 526.1 / 526.1 -> 604.5 / 604.5, the mixed preset
    # 511.9 / 511.5 -> 546.3 / 546.1, int4 + fp8 per expert 523.9 -> 595.7; bench-moe fp8 68.3 -> 50.1 µs
    ("fp8", 4096): dict(_DOWN32, BKD=128, BKF=256, f16=True),
    ("int8", 2048): GEMV_LAYOUT["int8"][1],    # see GEMV_M1's ("int8", 2048 / 4096)
    ("int8", 4096): GEMV_LAYOUT["int8"][1],
    ("mixed", 4096): dict(_DOWN32, BN=64, num_warps=8, BKD=128, BKF=256, f16=True),
}

# batch-1 decode, the down side of int4 layers whose slots can run the tensor-core tiles (pick's
# `mma`), before GEMV_M1_DOWN (which keeps the others: act-order gathers, group 32). 235B: 64-row
# tiles (gemv_mma), 4 warps. They lost to the fp16 word loop in sessions 35-37 (8-22%); re-swept
# after session 44's one-row epilogue and session 45's 16-byte x loads (H200, `python
# scripts/sweep_moe_m1.py --shapes 235b`, route + layer, µs, 3 rounds;
# moe_diag/session45_sweep_m1_235b_h200.log): 34.80 -> 32.49 (the 30B's down rows still lose,
# 18.63 against 18.70-32.62: session45_sweep_m1_30b_h200.log)
GEMV_M1_DOWN_MMA: dict[tuple[str, int], dict] = {
    ("intq", 4096): dict(_DOWN32, BN=64, BKD=128, f16=True, mma=True),
}

# the gate/up side from 2 tokens: (layout, hidden size) -> rows (max tokens, beside, GEMV config),
# the first row with m <= its bound whose `beside` (the other side's layout key it was measured
# beside; None: any) holds, before GEMV_LAYOUT (whose row keeps the down side; past the last row,
# GEMV_LAYOUT's crossover and row as before).
# int4, 30B, 2 tokens: session 31 (H100, `python scripts/sweep_moe_m1.py --tokens 2,4,8`, route +
# layer, µs, 3 rounds; moe_diag/session31_sweep_m2_8_h100.log): 28.53 -> 25.66 (BN 16 / BKQ 512
# 26.36); at 4 / 8 tokens and on the 235B no candidate beat the GEMV_LAYOUT row beyond the rounds'
# spread (235B M=4 BN 64 / 8 warps 118.4 vs 121.6, M=8 within 5% of the row's own rounds).
# bf16, 2-8 tokens: 32-column tiles (GEMV_LAYOUT's dense row has 16, set in session 4 before the
# fused gate/up loop). Session 34 (H200, `python scripts/sweep_moe_m1.py --tokens 2,4,8 --config
# bf16`, each side's candidates with the other on the pick; moe_diag/session34_sweeps_h200.log), µs:
# 30B M=2 / 4 / 8 52.79 -> 46.39 / 83.64 -> 79.58 / 133.85 -> 132.39; 235B 155.07 -> 147.47 /
# 265.87 -> 264.34 / 470.36 -> 465.13. The down side's 32-column tile lost 1-2.5% at every point:
# it keeps the row. Decode: BENCHMARKS.md session 34
# int4, 235B, 2-8 tokens: GEMV_LAYOUT's row (BN 32) with its int4 slots on the tensor cores
# (gemv_mma). Session 35 (H200, `python scripts/sweep_moe_m1.py --tokens 2,4,8 --shapes 235b`,
# moe_diag/session35_int4_mma_m248_h200.log), µs: M=2 61.81 -> 59.19, M=4 109.02 -> 103.06, M=8
# 198.07 -> 187.42; its 64-row down tiles lost at every point (67.7 / 120.3 / 219.8)
# int4, 30B, 2-4 tokens: the same tiles, 32 rows, 4 warps at 2 tokens and 2 at 4 (the 235B's rows
# keep 4: 2 warps -1.8% at 2 tokens, +1.9% at 4). Session 45 (H200, after the 16-byte x loads,
# `python scripts/sweep_moe_m1.py --shapes 235b,30b --tokens 2,4`, moe_diag/
# session45_sweep_m24_h200.log), µs: M=2 24.11 -> 23.15, M=4 37.82 -> 35.49. A side whose int4
# slots cannot run the tiles (act-order gathers, group 32: pick's `mma`) skips "mma" rows: at 2
# tokens it keeps the BN 16 word-loop row set in session 31, at 3-4 GEMV_LAYOUT's row. The 2-token
# tile holds only beside int4 down launches: beside fp8 ones (the per-projection mix: gate/up int4,
# down fp8) the word-loop row wins. Session 46 (H200, `python scripts/sweep_moe_m1.py --shapes 30b
# --tokens 2 --config perproj --only mma32/4,16/256/4gu,16/512/4gu`, moe_diag/
# session46_perproj_m2_h200.log), µs: 28.65 (tile) vs 27.20 (the word-loop row); at 4 tokens the
# tile gains there too (session 45: -6.8%)
_DENSE_UP32 = dict(GEMV_LAYOUT["dense"][1], BN=32)
_MMA_UP32 = dict(BN=32, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True, f16=True, mma=True)
GEMV_UP: dict[tuple[str, int], tuple[tuple[int, str | None, dict], ...]] = {
    ("intq", 2048): ((2, "intq", _MMA_UP32),
                     (2, None, dict(BN=16, BKD=128, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1, gu=True,
                                    f16=True)),
                     (4, None, dict(_MMA_UP32, num_warps=2))),
    ("intq", 4096): ((GEMV_LAYOUT["intq"][0], None, dict(GEMV_LAYOUT["intq"][1], mma=True)),),
    ("dense", 2048): ((GEMV_LAYOUT["dense"][0], None, _DENSE_UP32),),
    ("dense", 4096): ((GEMV_LAYOUT["dense"][0], None, _DENSE_UP32),),
}

# the down side from 2 tokens, as GEMV_UP (past the last row: GEMV_LAYOUT's row and crossover).
# int4: 64-row tensor-core tiles on 2 warps (gemv_mma). Session 45 (H200, after the one-row
# epilogue and the 16-byte x loads, `python scripts/sweep_moe_m1.py --shapes 235b,30b --tokens
# 2,4`, route + layer, µs, 3 rounds; moe_diag/session45_sweep_m24_h200.log): 235B M=2 57.66 ->
# 54.38, M=4 97.84 -> 92.82; 30B M=4 37.82 -> 35.05 (at 2 tokens the 30B's row stays: 24.11
# against 24.29+)
_MMA_DOWN64 = dict(BN=64, BKD=128, BKF=128, BKQ=256, BKI=128, num_warps=2, num_stages=1, f16=True, mma=True)
GEMV_DOWN: dict[tuple[str, int], tuple[tuple[int, str | None, dict], ...]] = {
    ("intq", 2048): ((2, None, GEMV_LAYOUT["intq"][1]), (4, None, _MMA_DOWN64)),
    ("intq", 4096): ((4, None, _MMA_DOWN64),),
}

# fp8 gate/up dot launches run gate and up in one K loop up to this many tokens (moe._gate_up_fused).
# Session 16 (H100, route + layer, µs, two loops vs one; moe_diag/session16_fp8_gate_up_h100.log):
# 30B M=2 49.0 vs 46.0, M=8 113.5 vs 104.8, 235B M=8 362.5 vs 338.6; M=16-128 within -2..+1%
# (the fused loop holds 144 registers instead of 106); runtime fp8 batch 8 1006.7 -> 1059.2 tok/s
DOT_GATE_UP_FP8_MAX_M = 8

# a side whose buckets are all int4 keeps the first DOT row (BM 16: per-field dots) up to this many
# tokens. Session 12 (H100, route + fused_moe, µs, this vs the prefill row; session12_moe_prefill):
# M=256 30B int4 349.0 vs 513.0, 235B 938.7 vs 1523.3, group 32 370.6 vs 497.0 / 995.4 vs 1473.6;
# M=512 within -2..+9%, M=2048 12-48% slower (the BM-16 row re-reads each expert per 16 pairs)
DOT_INTQ_MAX_M = 256

# int4 layers by hidden size: rows (tokens min_m..max_m, gate/up and down configs) of
# 8-pair blocks on gemv_mma's tensor-core tiles ("mma", BM 8: the block's pairs are the mma's 8 B
# columns, the weights read and dequantized once per block); a side the tiles cannot run (group
# 32, fp32 x, ...: moe._mma_dot_fits) takes DOT[0]. Session 37 (H200, `python
# scripts/sweep_moe_dot.py --configs int4 --tokens 16,32,64,128 --grid "..."`, route + layer, µs,
# 3 rounds, the BM-16 per-field row -> this row; moe_diag/session37_sweep_mma_dot_*_h200.log):
# one-warp programs (each warp its own 32 gate + 32 up or 64 down rows over all of K, no
# cross-warp sum) beat 2, 4 and 8 warps (8: ~2x slower, 131 registers leave one program per SM):
# 235B M=16 317.9 -> 276.2, M=32 456.3 -> 367.8, M=64 519.3 -> 425.2 (M=128 556.5 against 545.2);
# 30B 107.6 -> 99.0, 143.3 -> 120.7, 162.0 -> 135.1 (M=128 170.7 against 168.5). Against the GEMV
# rows below 9 tokens (same sweep, --tokens 2,4,8; moe_diag/session37_sweep_mma_dot_m248_h200.log):
# at 8 tokens 235B 186.5 -> 168.5 (4-warp gate/up programs; one warp 184.1), 30B 64.1 -> 60.4; at 4
# 235B 103.5 vs 102.4 (not taken), 30B 38.4 vs 41.6+, at 2 both lose (63.0 vs 66.8+, 24.7 vs 33.9+).
# Re-swept after session 45's 16-byte x loads (H200, `python scripts/sweep_moe_dot.py --configs
# int4 --shapes 235b,30b --tokens 8,16,32,64 --rounds 3 --grid "..."`, two calls; moe_diag/
# session46_sweep_dot*_h200.log): gate/up on 2 warps (K split between them, one shared-memory sum at
# the end) with the one-warp down programs, µs: 235B M=8 (against 4 warps) 165.1 -> 162.1 / 164.5 ->
# 161.8, M=16 264.0 -> 250.2 / 268.5 -> 257.0, M=32 359.9 -> 352.4 / 364.3 -> 359.9, M=64 401.5 ->
# 397.1 / 416.2 -> 406.3; 30B M=16 92.6 -> 83.4 / 92.1 -> 83.0, M=32 114.2 -> 110.3 / 113.8 -> 109.9;
# the 30B at 8 and 64 tokens keeps one warp (58.5 vs 60.9 / 58.4 vs 60.5; 125.3 vs 125.3 / 124.2 vs
# 125.2). 64-row gate/up, 16-row gate/up, 32- or 128-row down, 2-warp down, two stages and 256-wide
# K tiles: slower or within 1%. Old / new alternated twice, bench-moe int4 (moe_diag/
# session46_dot_w2_ab_h200.log): 235B M=8 / 16 -2.0 / -5.5%, M=32 +1.0%, M=64 -1.2%; 30B M=16 / 32
# -9.8 / -2.7%; 16-layer decode (runtime/session46_dot_w2_ab_*_h200.log): 235B batch 8 / 16 +2.1 /
# +2.8%, batch 32 / 64 -1.1 / -0.3%; 30B batch 16 / 32 +4.6 / +2.4%. So the 235B keeps one warp from
# 17 tokens
_MMA_DOT = dict(BM=8, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=1, num_stages=1, mma=True)
_MMA_DOT_ROW = dict(min_m=9, max_m=64, up=dict(_MMA_DOT, BN=32), down=dict(_MMA_DOT, BN=64))
_MMA_DOT_UP2 = dict(_MMA_DOT, BN=32, num_warps=2)
DOT_INTQ_MMA: dict[int, tuple[dict, ...]] = {
    4096: (dict(_MMA_DOT_ROW, min_m=8, max_m=16, up=_MMA_DOT_UP2), dict(_MMA_DOT_ROW, min_m=17)),
    2048: (dict(_MMA_DOT_ROW, min_m=8, max_m=8), dict(_MMA_DOT_ROW, max_m=32, up=_MMA_DOT_UP2),
           dict(_MMA_DOT_ROW, min_m=33)),
}


# prefill of many tokens as torch._grouped_mm (cuBLAS grouped GEMMs, moe.grouped_moe, grouped_fits):
# a layer whose experts are all bf16 from GROUPED_MIN_M tokens (weights used in place); one whose
# buckets are bf16 or intq from GROUPED_DEQUANT_MIN_M tokens, dequantized per call into transient
# bf16 stacks of at most GROUPED_STACK_MAX_BYTES (30B: 1.2 GB; the 235B layer's 4.8 GB stays on the
# Triton path). Session 15 (H100, route + layer, CUDA graphs, µs, grouped vs the Triton rows, same
# call, after moe_align's chunked launches; session 14 had timed the Triton rows with the
# one-program align, 1.8 ms of them at 4096 tokens; moe_diag/session15_grouped_*): bf16 30B M=512
# 590.2 vs 489.3, 1024 661.8 vs 568.4, 2048 830.7 vs 794.3, 4096 1024.7 vs 1270.7, 8192 1631.5 vs
# 2265.6; bf16 235B 512 1904.7 vs 1815.6, 1024 2007.7 vs 2101.2, 2048 2716.9 vs 2823.1, 4096 3064.4
# vs 4484.5; int4 30B (stacks dequantized each call) 2048 1404.8 vs 972.9, 4096 1588.6 vs 1753.7,
# 8192 2191.6 vs 3252.6. fp8 / int8 buckets keep the Triton rows (a grouped variant was measured
# and dropped: 30B fp8 M=4096 1748 vs 1335, int8 1745 vs 911)
GROUPED_MIN_M = 4096
GROUPED_DEQUANT_MIN_M = 4096
GROUPED_STACK_MAX_BYTES = 2 << 30


def dot_config(m: int, layout: str | None = None) -> dict:
    """The DOT row for m tokens (`layout`: the side's one layout, None when it mixes layouts)."""
    if layout == "intq" and m <= DOT_INTQ_MAX_M:
        return DOT[0][1]
    for bound, cfg in DOT:
        if m <= bound:
            return cfg
    return DOT[-1][1]


def side_key(layouts) -> str:
    """A side's key in the (layout, hidden) tables: its one layout, or "mixed"."""
    return next(iter(layouts)) if len(layouts) == 1 else "mixed"


def pick(m: int, up_layouts=(), down_layouts=(), hidden: int | None = None,
         mma: tuple[bool, bool] = (True, True)) -> tuple[str, dict, str, dict]:
    """-> (up path, up config, down path, down config) for M tokens; *_layouts: the bucket
    layouts of each side (one layout: its own GEMV config and crossover); hidden: the layer's
    hidden size (M=1 takes GEMV_M1_DOWN_MMA / GEMV_M1_DOWN / GEMV_M1 where they have the shape,
    from 2 tokens GEMV_UP's / GEMV_DOWN's rows, those measured beside the other side's layout); a
    side mixing layouts takes GEMV_MIXED's row for the layer's layouts from 2 tokens. mma: whether
    each side's int4 slots can run the tensor-core tiles (intq.mma_takes); where not,
    GEMV_M1_DOWN_MMA and the rows of GEMV_UP / GEMV_DOWN with "mma" are passed over (their tiles
    would fall back to the word loops with a BN / warp count chosen for the tiles; GEMV_M1's 235B
    int4 row, older, was measured so: kept). The dot path's 8-pair rows keep theirs: fused_moe
    falls back to DOT[0] there (_mma_dot_fits)."""
    out = []
    rows = GEMV_MIXED.get(frozenset(up_layouts) | frozenset(down_layouts), ()) if m > 1 else ()
    mixed = next((row for row in rows if m <= row["max_m"]), None)
    # int4 layers (both sides: one alignment for both): DOT_INTQ_MMA's 8-pair blocks before the GEMV rows
    both = set(up_layouts) == set(down_layouts) == {"intq"}
    blocks = next((row for row in DOT_INTQ_MMA.get(hidden, ()) if row["min_m"] <= m <= row["max_m"]), None) \
        if both else None
    if blocks is not None:
        return ("dot", blocks["up"], "dot", blocks["down"])
    for layouts, other, key, tiles in ((set(up_layouts), set(down_layouts), "up", mma[0]),
                                       (set(down_layouts), set(up_layouts), "down", mma[1])):
        layout = side_key(layouts)
        if m == 1:
            cands = [GEMV_M1_DOWN_MMA.get((layout, hidden)) if tiles else None,
                     GEMV_M1_DOWN.get((layout, hidden))] if key == "down" else []
            cands.append(GEMV_M1.get((layout, hidden)))
        else:
            cands = [cfg for bound, beside, cfg in (GEMV_UP if key == "up" else GEMV_DOWN).get((layout, hidden), ())
                     if m <= bound and beside in (None, side_key(other)) and (tiles or not cfg.get("mma"))]
        own = next((cfg for cfg in cands if cfg is not None), None)
        if own is not None:
            out += ["gemv", own]
            continue
        max_m, cfg = GEMV_LAYOUT.get(layout) or (mixed and (mixed["max_m"], mixed[key])) or \
            (GEMV_MAX_M, GEMV[key])
        out += ["gemv", cfg] if m <= max_m else ["dot", dot_config(m, layout)]
    return tuple(out)


def sides(config: tuple) -> tuple[str, dict, str, dict]:
    """(path, up config, down config) -> (path, up config, path, down config); 4-tuples pass."""
    return (config[0], config[1], config[0], config[2]) if len(config) == 3 else tuple(config)
