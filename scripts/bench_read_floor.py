"""Pure-read floor: how long a kernel that only streams S bytes of cold HBM takes (CUDA-graph
replay), best over grid sizes, warps and unrolls: what a batch-1 GEMV over that many weight bytes
could at best take, launch and ramp included.

    python scripts/bench_read_floor.py      (GPU; about a minute)
"""
from __future__ import annotations

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


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = timing.copy_bandwidth_gbps()
    print(f"device {torch.cuda.get_device_name()} SMs {sms} copy {bw:.0f} GB/s", flush=True)
    for mb in SIZES_MB:
        n = int(mb * 1e6) // 4
        best = None
        for per_sm, warps, U in itertools.product([1, 2, 3, 4, 8], [4, 8, 16], [1, 2, 4, 8]):
            P, BLOCK = sms * per_sm, warps * 32 * 4      # 16-byte loads per thread
            step = BLOCK * U
            per = -(-n // (P * step)) * step
            copies = max(2, -(-(256 << 20) // (P * per * 4)))    # cold: rotate past the 50 MB L2
            bufs = [torch.randint(-2**31, 2**31 - 1, (P * per,), dtype=torch.int32, device="cuda")
                    for _ in range(copies)]
            out = torch.empty(P, dtype=torch.int32, device="cuda")
            us = timing.graph_us([lambda b=b: _read_kernel[(P,)](b, out, per, BLOCK=BLOCK, U=U, num_warps=warps)
                                  for b in bufs])
            if best is None or us < best[0]:
                best = (us, per_sm, warps, U)
            del bufs
        us, per_sm, warps, U = best
        print(f"{mb:6.1f} MB: best {us:6.2f} us = {n * 4 / us / 1e3:7.0f} GB/s ({100 * n * 4 / us / 1e3 / bw:4.1f}% "
              f"copy) at {per_sm}/SM warps {warps} U {U}; bytes / copy bandwidth {n * 4 / bw / 1e3:5.2f} us", flush=True)


if __name__ == "__main__":
    main()
