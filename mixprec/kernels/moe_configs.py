"""Launch configurations of the fused MoE kernels (moe_triton.py).

TIMED, NOT YET SWEPT. These guessed defaults produced the first GPU table (2026-11-25, H100 80GB
HBM3, `python -m mixprec bench-moe --per-bucket --check`, benchmarks/moe.md); the launch-config
sweep has not run. The values came from offline sm_90 compilation (registers, spills, SASS
instructions per weight element of the GEMV loop) and, for the dot path, from vLLM's tuned H100
tables for E=128. That table points at what the sweep should settle: from M=8 (GEMV) to M=16
(dot) int4 gets 3x slower for 1.7x the bytes while fp8 gets faster (a GEMV_MAX_M per layout?),
and the BM=64 config above 64 tokens makes fp8/int8 about 2x slower at M=128 than at M=64. Run
`python scripts/bench_moe.py --sweep --out DIR` on the device: it times the candidates in
moe_bench.py (GEMV_CANDIDATES, DOT_CANDIDATES), applies the winners to its table and prints them
("sweep winners: ...") to be copied here.

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
    (64, dict(BM=16, BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3)),
    (1 << 30, dict(BM=64, BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=8, num_stages=3)),
]


def pick(m: int) -> tuple[str, dict, dict]:
    """-> (path, up config, down config) for M tokens."""
    if m <= GEMV_MAX_M:
        return "gemv", GEMV["up"], GEMV["down"]
    for bound, cfg in DOT:
        if m <= bound:
            return "dot", cfg, cfg
    return "dot", DOT[-1][1], DOT[-1][1]
