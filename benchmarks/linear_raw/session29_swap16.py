"""Session 29 experiment (the script behind session29_int4_swap16_autosplit_h100.log; the nosplit log
came from an earlier version with the candidates s64w4s1, s128w8s1, s64w4s3, s64w4s1k2: BM 16, BN,
warps, stages, K split 1 or 2): int4 dense GEMM at 4-16 rows, the library's pick vs 16-row swap
tiles with auto split, their fields paired when PMB <= 16 (quant.PAIRED_MIN_BM set in this process).
    PMB=16 python benchmarks/linear_raw/session29_swap16.py; PMB=128 python ..."""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
import triton.language as tl
from mixprec.kernels import quant
quant.PAIRED_MIN_BM = tl.constexpr(int(os.environ.get("PMB", "128")))
from mixprec.kernels import bench as B, configs, timing
from mixprec.kernels.intq import intq_config, intq_linear_cfg
print(torch.cuda.get_device_name(), "PMB", os.environ.get("PMB"), flush=True)
cands = {"lib": None, "sw64": "auto64", "sw64s4": "auto64s4", "sw128w8": "auto128"}
for model, sname, N, K in B.SHAPES:
    ts, _, ref = B.make_variant("int4 g128 asym", N, K, "cuda")
    sets = B.rotate(ts)
    cells = []
    for M in (4, 8, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y0 = ref(x, ts)
        res = []
        for name, c in cands.items():
            if c is None:
                c = intq_config(4, M, N, K, 128, torch.bfloat16)
            elif c == "auto64":
                c = configs.cfg("swap", 16, 64, 128, configs.auto_split(M, N, K, 16, 64, 128), 4, 3)
            elif c == "auto64s4":
                c = configs.cfg("swap", 16, 64, 128, configs.auto_split(M, N, K, 16, 64, 128), 4, 4)
            else:
                c = configs.cfg("swap", 16, 128, 128, configs.auto_split(M, N, K, 16, 128, 128), 8, 3)
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
