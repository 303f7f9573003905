"""Launch configurations of the fused MoE kernels (moe_triton.py).

Swept on one H100 80GB HBM3 (torch 2.11.0+cu130, triton 3.6.0) on 2026-11-25 by
`python -m mixprec bench-moe --sweep --per-bucket --check --out DIR` (benchmarks/moe.md): every
candidate of moe_bench.GEMV_CANDIDATES / DOT_CANDIDATES timed on uniform int4, fp8 and bf16 layers
of both Qwen3 shapes (cold weights, CUDA graphs), the winner per M by the sum of its times relative
to the best candidate. GEMV_MAX_M is the largest M where the GEMV winner beats the dot winner on
that score: int4 alone would stay on the GEMV path longer (its dot path is dequantization-bound),
fp8 and bf16 want the dot path from M=16, and one launch serves every bucket of a layer.

GEMV path (one (token, expert) pair per program, fp32 FMA): decode, M <= GEMV_MAX_M tokens.
Dot path (BM sorted pairs of one expert per program, tensor cores): everything larger.
BK* are the K tiles per layout (D dense, F fp8, Q intq, I int8); BK is lowered automatically
where a format's block needs it (fp8 tile inside one weight block along K; W8A8 uses 128).
"""
from __future__ import annotations

GEMV_MAX_M = 8

# side -> config; "up" computes gate and up tiles of BN columns each (fused silu*mul), "down" BN rows of H
GEMV = {
    "up": dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1),
    "down": dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1),
}

# (max tokens, config): the first row whose bound >= M is used
DOT = [
    (128, dict(BM=16, BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=3)),
    (1 << 30, dict(BM=64, BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=8, num_stages=3)),
]


# layout -> (largest M for the GEMV path, GEMV config) for a side whose buckets all have that
# layout (uniform layers): its own BN / warps and crossover instead of the joint ones above
GEMV_LAYOUT: dict[str, tuple[int, dict]] = {}


def pick(m: int, up_layouts=(), down_layouts=()) -> tuple[str, dict, dict]:
    """-> (path, up config, down config) for M tokens; *_layouts: the bucket layouts of each side."""
    own = [GEMV_LAYOUT.get(next(iter(ls))) if len(set(ls)) == 1 else None for ls in (up_layouts, down_layouts)]
    max_m = min(o[0] if o else GEMV_MAX_M for o in own)
    if m <= max_m:
        return "gemv", own[0][1] if own[0] else GEMV["up"], own[1][1] if own[1] else GEMV["down"]
    for bound, cfg in DOT:
        if m <= bound:
            return "dot", cfg, cfg
    return "dot", DOT[-1][1], DOT[-1][1]
