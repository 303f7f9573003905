"""int4 MoE dot path: K tiles of 64 (codes reshuffled into K order, one dot per tile) against
K tiles of 128 (one dot per code field, packed int4 unpack), same run, uniform int4 layers of both
Qwen3 shapes; SQNR of each against moe_reference first. GPU only.

    python scripts/diag_int4_dot.py [M,...]"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe
from mixprec.kernels import moe_bench as mb
from mixprec.kernels import moe_testing as mt

tokens = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "16,32,64,128,512").split(",")]
base = dict(BM=16, BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=3)
variants = {"bkq64": base, "lattice128": dict(base, BKQ=128), "lattice128_bn64": dict(base, BKQ=128, BN=64),
            "lattice256": dict(base, BKQ=256), "lattice128_bm64": dict(base, BM=64, BKQ=128, num_warps=8)}
bw = mb.copy_bandwidth()
print(f"copy bandwidth {bw:.0f} GB/s")
for shape in ("30b", "235b"):
    sh = mb.SHAPES[shape]
    E, k, H, I = sh["E"], sh["k"], sh["H"], sh["I"]
    for name in ("int4", "int4_asym"):
        specs = (lambda E, s=name: [(s, s, s)] * E)
        b = mt.build_buckets(specs(E), H, I, dtype=torch.bfloat16, device="cuda", seed=3)
        x = torch.randn(40, H, device="cuda", dtype=torch.bfloat16)
        w, ids = moe.route(mb.routing(40, E, k, 5), k, True)
        ref = moe.moe_reference(x, ids, w, b, I)
        for vn, c in variants.items():
            y = moe.fused_moe(x, ids, w, b, I, config=("dot", c, c))
            print(f"check {shape} {name} {vn} M=40: SQNR {mt.sqnr_db(ref, y.float()):.1f} dB")
        del b
        rows = []
        for vn, c in variants.items():
            mb.bench_config(shape, name, specs, tokens, 256e6, rows, bw, configs=lambda M, c=c: ("dot", c, c),
                            label=f"{name} {vn}")
