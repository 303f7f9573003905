"""Session 29 experiment (session29_int4_swap_bm32_64_tiles_h100.log): int4 swap tiles at 32 / 64 rows,
the library's pick (BN 64, 4 warps) vs BN 128 / 8 warps and BN 64 / 8 warps, paired (PMB=32:
quant.PAIRED_MIN_BM lowered in this process) or not (PMB=128).
    PMB=32 python benchmarks/linear_raw/session29_swap64.py"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
import triton.language as tl
from mixprec.kernels import quant
quant.PAIRED_MIN_BM = tl.constexpr(int(os.environ.get("PMB", "128")))
from mixprec.kernels import bench as B, configs, timing
from mixprec.kernels.intq import intq_config, intq_linear_cfg
print(torch.cuda.get_device_name(), "PMB", os.environ.get("PMB"), flush=True)
for model, sname, N, K in B.SHAPES:
    if N * K < (1 << 22):
        continue
    ts, _, ref = B.make_variant("int4 g128 asym", N, K, "cuda")
    sets = B.rotate(ts)
    cells = []
    for M in (32, 64):
        bm = 32 if M <= 32 else 64
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y0 = ref(x, ts)
        res = []
        for name in ("lib", "bn128w8", "bn64w8"):
            if name == "lib":
                c = intq_config(4, M, N, K, 128, torch.bfloat16)
            elif name == "bn128w8":
                c = configs.cfg("swap", bm, 128, 128, configs.auto_split(M, N, K, bm, 128, 128), 8, 3)
            else:
                c = configs.cfg("swap", bm, 64, 128, configs.auto_split(M, N, K, bm, 64, 128), 8, 3)
            def f(t, c=c):
                return intq_linear_cfg(x, t[0], t[1], t[2], None, 4, 128, c)
            try:
                q = B.sqnr(f(ts).float(), y0.float())
                us = timing.graph_us([lambda t=t: f(t) for t in sets])
                res.append(f"{name} {us:.1f}" + ("" if q >= B.SQNR_MIN else f"(SQNR {q:.0f})"))
            except B.BENCH_ERRORS as e:
                res.append(f"{name} FAIL {type(e).__name__}")
        cells.append(f"M={M} " + " ".join(res))
    del sets, ts
    print(f"{model} {sname:8s} " + " | ".join(cells), flush=True)
