"""Gate and up in one K loop vs two, same process: each layer timed with the library's choice
(moe._gate_up_fused, which reads the `gu` key of GEMV configs and DOT_GATE_UP_FP8_MAX_M), then with
gate and up forced into one loop on every launch that can take it, then with two loops everywhere;
cold weights, route + layer in CUDA graphs (moe_bench.bench_config). This is how `gu` and
moe_configs.DOT_GATE_UP_FP8_MAX_M are chosen (session 16 with one-off runs of the same bench_config
calls, benchmarks/moe_diag/session16_*gate_up*; this script's runs: session17_gate_up*_h100.log).

    python scripts/bench_gate_up.py [--configs int4,fp8,perproj] [--shapes 30b,235b] [--tokens 1,2,...,128]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe, moe_bench as mb          # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--configs", default="int4,fp8,perproj", help=f"of {', '.join(mb.CONFIGS)}")
p.add_argument("--shapes", default="30b,235b")
p.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
a = p.parse_args()
Ms = [int(m) for m in a.tokens.split(",")]
bw = mb.copy_bandwidth()
mb.log(f"== {torch.cuda.get_device_name()}, copy_bw {bw:.0f} GB/s")
choice = moe._gate_up_fused


def fused_where_possible(descs, cfg, bkq, gemv, tokens):
    """One loop on every launch the kernels can run that way (the GEMV `gu` key and the fp8 token
    bound ignored)."""
    return choice(descs, {**cfg, "gu": True}, bkq, gemv, 0)


variants = {"library": choice, "one loop": fused_where_possible, "two loops": lambda *args: False}
for shape in a.shapes.split(","):
    for name in a.configs.split(","):
        rows = {}
        for label, fn in variants.items():
            moe._gate_up_fused = fn
            res = []
            mb.bench_config(shape, name, mb.CONFIGS[name], Ms, 400e6, res, bw, label=f"{name} {label}")
            rows[label] = {r["M"]: r["us"] for r in res}
        moe._gate_up_fused = choice
        for M in Ms:
            us = {label: rows[label][M] for label in variants}
            mb.log(f"{shape:5s} {name:10s} M={M:4d} " + " ".join(f"{k} {v:8.1f}" for k, v in us.items())
                   + f"  one/two {us['one loop'] / us['two loops']:.3f}")
