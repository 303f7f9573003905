"""moe_align alone (the dot path's sort of (token, expert) pairs by expert), E=128, top-8, CUDA
graphs, µs per call, for each of its kernels: one program sorting the pairs in registers (up to
1024 pairs here) and the count / scan / scatter launches over chunks; both must agree bit for
bit. This is how moe.ALIGN_SORT_MAX_P is chosen.

    python scripts/bench_align.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe, timing          # noqa: E402

# ALIGN_SORT_MAX_P that sends moe_align to each kernel
METHODS = {"sort": 1 << 30, "chunked": 0}
print(f"# {torch.cuda.get_device_name()}: moe_align(ids [M, 8], E=128, BM), µs", flush=True)
for bm in (16, 64):
    for M in (1, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192):
        ids = moe.route(torch.randn(M, 128, device="cuda"), 8, True)[1]
        row, out = [], []
        for name, sort_max in METHODS.items():
            if name == "sort" and 8 * M > 1024:
                continue
            moe.ALIGN_SORT_MAX_P = sort_max
            row.append(f"{name} {timing.graph_us([lambda: moe.moe_align(ids, 128, bm)]):8.1f}")
            out.append(moe.moe_align(ids, 128, bm))
        same = all(torch.equal(a, b) for o in out[1:] for a, b in zip(o, out[0]))
        print(f"BM={bm:3d} M={M:5d} P={8 * M:6d}: " + ", ".join(row) + f", equal={same}", flush=True)
