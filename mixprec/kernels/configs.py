"""Launch configurations of the linear kernels, per (kind, M bucket, N, K).

A config is a dict: path ("gemv": one activation row per program, FMA dot products, for M = 1;
"gemm": tl.dot tiles), BM (gemm rows per program), BN, BK (K elements per loop step), split
(K splits, reduced in-kernel, see quant.splitk_store), warps, stages.

TUNED holds the configs measured on the GPU (see the comment above it); every other shape gets
`default`, a heuristic that keeps ~2 waves of programs on a 132-SM H100.
"""
from __future__ import annotations

import triton

KINDS = ("intq4", "intq8", "fp8_w8a8", "fp8_w8a16", "int8_w8a8", "int8_w8a16")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMS = 132  # H100 SXM; only used to size split-K in the defaults


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


def cfg(path: str, BM: int, BN: int, BK: int, split: int, warps: int, stages: int) -> dict:
    return dict(path=path, BM=BM, BN=BN, BK=BK, split=split, warps=warps, stages=stages)


def auto_split(M: int, N: int, K: int, BM: int, BN: int, BK: int, target: int = 2 * SMS) -> int:
    """K splits so that tiles * split reaches ~target programs (capped by the K tiles)."""
    tiles = (M if BM == 0 else triton.cdiv(M, BM)) * triton.cdiv(N, BN)
    k_tiles = triton.cdiv(K, BK)
    return max(1, min(k_tiles, round(target / tiles)))


def default(kind: str, M: int, N: int, K: int) -> dict:
    b = m_bucket(M)
    if b == 1:   # gemv programs hold few loads in flight: many K splits
        if kind.startswith("intq"):
            BN, BK, warps, target = 256, 128, 2, 4 * SMS
        else:
            BN, BK, warps, target = 32, 128, 4, 8 * SMS
        return cfg("gemv", 1, BN, BK, auto_split(1, N, K, 1, BN, BK, target), warps, 1)
    if b <= 16:
        BM, BN, warps, stages = 16, 64, 4, 3
    elif b <= 64:
        BM, BN, warps, stages = b, 64, 4, 3
    else:
        BM, BN, warps, stages = 64, 128, 4, 3
    return cfg("gemm", BM, BN, 128, auto_split(M, N, K, BM, BN, 128, target=SMS if b > 64 else 2 * SMS),
               warps, stages)


def get(kind: str, M: int, N: int, K: int) -> dict:
    c = TUNED.get((kind, m_bucket(M), N, K))
    return dict(c) if c is not None else default(kind, M, N, K)


# Measured: see benchmarks/linear.md (device, date, command). Filled from
# `python -m mixprec bench-kernels --tune` output (tuned_configs.py written to --out).
TUNED: dict[tuple[str, int, int, int], dict] = {}
