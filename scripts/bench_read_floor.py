"""Pure-read floor: how long a kernel that only streams S bytes of cold HBM takes (CUDA-graph
replay), best over grid sizes, warps and unrolls: what a batch-1 GEMV over that many weight bytes
could at best take, launch and ramp included.

    python scripts/bench_read_floor.py      (GPU; about a minute)
    python scripts/bench_read_floor.py --sizes 51.9,26.0 --pair    (and the two back to back)

--pair: the sizes' reads as two launches in a row (each with its best row), the floor of a layer
whose weights two dependent launches read (the 235B int4 MoE at batch 1: gate/up 51.9 MB, down
26.0 MB with their g128 scales).
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from mixprec.kernels import timing

SIZES_MB = [3.1, 6.3, 8.4, 10.5, 12.6, 25.2, 75.5]   # 30B / 235B weight sizes of one launch


@triton.jit
def _read_kernel(p, out, per, BLOCK: tl.constexpr, U: tl.constexpr):
    # program reads int32 words [pid * per, (pid + 1) * per), U loads of BLOCK words per step
    lo = tl.program_id(0).to(tl.int64) * per
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, per, BLOCK * U):
        for u in tl.static_range(U):
            acc ^= tl.load(p + lo + i + u * BLOCK + offs)
    tl.store(out + tl.program_id(0), tl.sum(acc, 0))


def _launch(mb: float, sms: int, per_sm: int, warps: int, U: int):
    """-> (the buffers, rotated past the 50 MB L2, and one read launch per buffer) of one size."""
    n = int(mb * 1e6) // 4
    P, BLOCK = sms * per_sm, warps * 32 * 4      # 16-byte loads per thread
    step = BLOCK * U
    per = -(-n // (P * step)) * step
    copies = max(2, -(-(256 << 20) // (P * per * 4)))
    bufs = [torch.randint(-2**31, 2**31 - 1, (P * per,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    out = torch.empty(P, dtype=torch.int32, device="cuda")
    return bufs, [lambda b=b: _read_kernel[(P,)](b, out, per, BLOCK=BLOCK, U=U, num_warps=warps) for b in bufs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_MB)), help="MB, comma-separated")
    ap.add_argument("--pair", action="store_true")
    a = ap.parse_args()
    sizes = [float(v) for v in a.sizes.split(",")]
    if a.pair and len(sizes) != 2:
        ap.error("--pair times two sizes: give --sizes A,B")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = timing.copy_bandwidth_gbps()
    print(f"device {torch.cuda.get_device_name()} SMs {sms} copy {bw:.0f} GB/s", flush=True)
    rows = {}
    for mb in sizes:
        best = None
        for per_sm, warps, U in itertools.product([1, 2, 3, 4, 8], [4, 8, 16], [1, 2, 4, 8]):
            bufs, fns = _launch(mb, sms, per_sm, warps, U)
            us = timing.graph_us(fns)
            if best is None or us < best[0]:
                best = (us, per_sm, warps, U)
            del bufs, fns
        us, per_sm, warps, U = rows[mb] = best
        print(f"{mb:6.1f} MB: best {us:6.2f} us = {mb / us * 1e3:7.0f} GB/s ({100 * mb / us * 1e3 / bw:4.1f}% "
              f"copy) at {per_sm}/SM warps {warps} U {U}; bytes / copy bandwidth {mb / bw * 1e3:5.2f} us", flush=True)
    if a.pair:
        (b0, f0), (b1, f1) = (_launch(mb, sms, *rows[mb][1:]) for mb in sizes)
        c = min(len(f0), len(f1))
        us = timing.graph_us([f for i in range(c) for f in (f0[i], f1[i])]) * 2
        tot = sum(sizes)
        print(f"{sizes[0]} + {sizes[1]} MB as two launches: {us:6.2f} us = {100 * tot / us * 1e3 / bw:4.1f}% copy "
              f"(bytes / copy bandwidth {tot / bw * 1e3:5.2f} us)", flush=True)


if __name__ == "__main__":
    main()
