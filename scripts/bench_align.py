"""moe_align alone (the dot path's sort of (token, expert) pairs by expert): one program vs the
chunked count / scan / scatter launches, E=128, top-8, CUDA graphs, µs per call; both must agree.
This is how moe.ALIGN_ONE_PROGRAM_MAX_P is chosen.

    python scripts/bench_align.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe, timing          # noqa: E402

print(f"# {torch.cuda.get_device_name()}: moe_align(ids [M, 8], E=128, BM) one program vs chunked", flush=True)
for bm in (16, 64):
    for M in (8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192):
        ids = moe.route(torch.randn(M, 128, device="cuda"), 8, True)[1]
        us, out = [], []
        for thr in (1 << 30, 0):
            moe.ALIGN_ONE_PROGRAM_MAX_P = thr
            us.append(timing.graph_us([lambda: moe.moe_align(ids, 128, bm)]))
            out.append(moe.moe_align(ids, 128, bm))
        same = all(torch.equal(x, y) for x, y in zip(*out))
        print(f"BM={bm:3d} M={M:5d} P={8 * M:6d}: one program {us[0]:8.1f} us, chunked {us[1]:8.1f} us, "
              f"equal={same}", flush=True)
