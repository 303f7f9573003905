"""Launch configurations of the fused MoE kernels (moe_triton.py).

Swept on one H100 80GB HBM3 (torch 2.11.0+cu130, triton 3.6.0) on 2026-11-25 (session 4) by
`python -m mixprec bench-moe --sweep --check --out DIR` (benchmarks/moe.md): every candidate of
moe_bench.GEMV_CANDIDATES / DOT_CANDIDATES timed on uniform int4, fp8 and bf16 layers of both
Qwen3 shapes (cold weights, CUDA graphs). Joint winners (GEMV, GEMV_MAX_M, DOT) minimise the sum
of times relative to the best candidate over the three formats and serve launches that mix
layouts; GEMV_LAYOUT holds each layout's own GEMV winner and GEMV/dot crossover, used by a side
(gate/up or down) whose buckets all share that layout.

GEMV path (one (token, expert) pair per program, fp32 FMA): decode, M <= the crossover.
Dot path (BM sorted pairs of one expert per program, tensor cores): everything larger.
BK* are the K tiles per layout (D dense, F fp8, Q intq, I int8); BK is lowered automatically
where a format's block needs it (an fp8 GEMV tile spans blocks only when its rows share a scale
row; the W8A8 dot path uses 128).
"""
from __future__ import annotations

# the GEMV/dot crossover of a side whose buckets mix layouts: `python scripts/diag_moe_decode.py
# --mixed` (H100, session 5, after the W8A8 pre-pass made the fp8/int8 dot tiles cheaper): at M=8
# the dot path beats the joint GEMV config on every mix (30B int4+fp8 120 vs 137 µs, the runtime's
# mixed preset 124 vs 132; 235B 321 vs 437, 333 vs 407), at M=4 the two are within 2% in sum,
# at M=2 the GEMV wins (57 vs 68 µs)
GEMV_MAX_M = 4

# side -> config; "up" computes gate and up tiles of BN columns each (fused silu*mul), "down" BN rows of H.
# Serves launches that mix layouts, i.e. M = 2..GEMV_MAX_M (M=1: GEMV_M1). Session 6 sweep at M=4
# (H100, both shapes, int4 / fp8 / bf16): this config has the least summed relative time (30B
# int4 50.9, fp8 76.5 µs vs 55.6 / 97.0 with the session-4 joint winner, chosen then over M up to 16)
GEMV = {
    "up": dict(BN=64, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=8, num_stages=1),
    "down": dict(BN=64, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=8, num_stages=1),
}

# (max tokens, config): the first row whose bound >= M is used
DOT = [
    (8, dict(BM=16, BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3)),
    # BKQ 128: int4 tiles of one group take the per-field dot path (scripts/diag_int4_dot.py, H100,
    # session 4: 30B M=32/64 314/334 -> 221/255 µs, 235B 1032/1131 -> 740/834 µs vs BKQ 64)
    (128, dict(BM=16, BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=3)),
    (1 << 30, dict(BM=64, BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=8, num_stages=3)),
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
    # but the 235B decode step at batch 8 slower (H200, same call: 284.0 -> 264.9 tok/s): 16 kept
    "intq": (16, dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1)),
    "fp8": (1, dict(BN=16, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=2, num_stages=1)),
    "dense": (8, dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1)),
    # not swept: int8 keeps the session-3 joint config it was measured with (30B M=1 38.9 µs)
    "int8": (8, dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1)),
}


# batch-1 decode (M=1): (layout, hidden size) -> GEMV config, and ("mixed", hidden) for launches
# that mix layouts; the M=1 winners differ from the M<=16 ones above. Swept on an H100 in session
# 6 (`python -m mixprec bench-moe --sweep --sweep-paths gemv --tokens 1,2,4`, moe_bench.m1_winners;
# µs per layer, winner vs the config used before): 30B fp8 36.4 vs 43.0, int4 23.4 vs 26.1, bf16
# 39.3 vs 41.9; 235B int4 48.1 vs 50.7. A second run, table vs table (with a scale / x prefetch
# in the tile loops that changed nothing and was dropped): 30B fp8 43.3 -> 35.5, int4 24.9 ->
# 22.5, bf16 42.3 -> 39.1, int4+fp8 44.2 -> 40.8; 235B int4 50.8 -> 48.2. Winners within run-to-run
# noise (235B fp8 / bf16, < 4%) are not listed; what is not listed uses the tables above. 235B
# "mixed" keeps the earlier joint config (the M=2-4 one below is 25% slower there on bf16 at M=1).
GEMV_M1: dict[tuple[str, int], dict] = {
    ("intq", 2048): dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1),
    ("fp8", 2048): dict(BN=8, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1),
    ("dense", 2048): dict(BN=16, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=8, num_stages=1),
    ("mixed", 2048): dict(BN=8, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=4, num_stages=1),
    ("intq", 4096): dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1),
    ("mixed", 4096): dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1),
}


def dot_config(m: int) -> dict:
    for bound, cfg in DOT:
        if m <= bound:
            return cfg
    return DOT[-1][1]


def pick(m: int, up_layouts=(), down_layouts=(), hidden: int | None = None) -> tuple[str, dict, str, dict]:
    """-> (up path, up config, down path, down config) for M tokens; *_layouts: the bucket
    layouts of each side (one layout: its own GEMV config and crossover); hidden: the layer's
    hidden size (M=1 takes GEMV_M1 where it has the shape)."""
    out = []
    for layouts, key in ((set(up_layouts), "up"), (set(down_layouts), "down")):
        layout = next(iter(layouts)) if len(layouts) == 1 else "mixed"
        m1 = GEMV_M1.get((layout, hidden)) if m == 1 else None
        if m1 is not None:
            out += ["gemv", m1]
            continue
        max_m, cfg = GEMV_LAYOUT.get(layout) or (GEMV_MAX_M, GEMV[key])
        out += ["gemv", cfg] if m <= max_m else ["dot", dot_config(m)]
    return tuple(out)


def sides(config: tuple) -> tuple[str, dict, str, dict]:
    """(path, up config, down config) -> (path, up config, path, down config); 4-tuples pass."""
    return (config[0], config[1], config[0], config[2]) if len(config) == 3 else tuple(config)
