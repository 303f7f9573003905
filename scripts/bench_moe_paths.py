"""MoE prefill paths side by side: each layer timed on the cuBLAS grouped path (moe.grouped_moe,
every moe_configs.GROUPED_* threshold set to 1) and on the Triton rows (moe_configs.pick forced),
same process, cold weights, route + layer in CUDA graphs (moe_bench.bench_config). The Triton row's
`sqnr_vs_default` compares it with the grouped result. This is how the GROUPED_* thresholds are chosen.

    python scripts/bench_moe_paths.py [--configs bf16,int4] [--shape 30b] [--tokens 512,...,8192]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe, moe_bench as mb, moe_configs as mc          # noqa: E402
from mixprec.kernels import moe_testing as mt                                 # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--configs", default="bf16,int4", help=f"of {', '.join(mb.CONFIGS)}")
p.add_argument("--shape", default="30b", choices=list(mb.SHAPES))
p.add_argument("--tokens", default="512,1024,2048,4096,8192")
a = p.parse_args()
Ms = [int(m) for m in a.tokens.split(",")]
bw = mb.copy_bandwidth()
mb.log(f"== {torch.cuda.get_device_name()}, copy_bw {bw:.0f} GB/s")
res = []
mc.GROUPED_MIN_M = mc.GROUPED_DEQUANT_MIN_M = 1      # the grouped path wherever grouped_fits allows it
for n in a.configs.split(","):
    mb.bench_config(a.shape, n, mb.CONFIGS[n], Ms, 2e9, res, bw, label=n + " grouped")

    def forced(M, fn=mb.CONFIGS[n]):
        b = mt.build_buckets(fn(8), 64, 32, dtype=torch.bfloat16, device="cpu")   # its layouts only
        return mc.pick(M, *moe.side_layouts(b), hidden=mb.SHAPES[a.shape]["H"])
    mb.bench_config(a.shape, n, mb.CONFIGS[n], Ms, 2e9, res, bw, configs=forced, label=n + " triton")
for r in res:
    print(f"{r['shape']} {r['config']:22s} M={r['M']:5d} {r['us']:9.1f} us path={r['path']:8s} "
          f"sqnr_vs_default={r.get('sqnr_vs_default', float('nan')):.1f}")
