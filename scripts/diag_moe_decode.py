"""Where does a decode-size fused MoE layer spend its time? (needs CUDA)

Times, in CUDA graphs over cold weight copies (as bench-moe does), route + fused_moe for uniform
layers of both activation modes (fp8 / int8 W8A8 vs W8A16), two fp8 GEMV configurations, and
the floor of one empty Triton launch and of route() alone, at M = 1, 2, 4, 8, 32.
--mixed: layers whose launches mix layouts (int4+fp8, int4+fp8+bf16, the runtime's mixed
preset), at M = 2..16 on the default path and forced onto the dot path (the crossover).

    PYTHONPATH=. python scripts/diag_moe_decode.py [--mixed] [--out results.json]"""
import argparse
import json

import torch
import triton

from mixprec.kernels import moe, moe_configs, timing
from mixprec.kernels import moe_testing as mt
from mixprec.kernels.moe_bench import SHAPES, clone_buckets, layer_bytes, routing

MIXES = {"int4+fp8": lambda E: mt.split(["int4", "fp8"], E, seed=1),
         "int4+fp8+bf16": lambda E: mt.split(["int4", "fp8", "bf16"], E, seed=2),
         "preset mixed": lambda E: ([("int4",) * 3] * (E // 2) + [("fp8", "fp8", "bf16")] * (E // 4)
                                    + [("int8", "int8", "fp8")] * (E // 4))}


@triton.jit
def _empty_kernel(p):
    pass


def time_layer(rows, shape, name, base, copies, x, M, cfg, label, n_copies):
    """One row: route + fused_moe over `n_copies` cold copies of the layer, M tokens."""
    sh = SHAPES[shape]
    k, I = sh["k"], sh["I"]
    lg = routing(M, sh["E"], k, 0)
    xm = x[:M].contiguous()

    def make(L):
        def f():
            w, ids = moe.route(lg, k, True)
            return moe.fused_moe(xm, ids, w, L, I, config=cfg)
        return f
    us = timing.graph_us([make(L) for L in copies[:n_copies]])
    path = moe_configs.sides(cfg) if cfg else moe_configs.pick(M, *moe.side_layouts(base))
    print(f"{shape} {name:14s} M={M:3d} {us:8.1f} us  {label} ({path[0]}/{path[2]})", flush=True)
    rows.append(dict(shape=shape, spec=name, M=M, us=us, config=label))


def layers(shape, specs_fn):
    sh = SHAPES[shape]
    base = mt.build_buckets(specs_fn(sh["E"]), sh["H"], sh["I"], dtype=torch.bfloat16, device="cuda", seed=7)
    return base, [base] + [clone_buckets(base) for _ in range(max(1, int(4e9 // layer_bytes(base))))]


def uniform(args, rows):
    dummy = torch.zeros(1, device="cuda")
    floor = timing.graph_us([lambda: _empty_kernel[(1,)](dummy)] * 20)
    print(f"empty triton launch in a graph: {floor:.2f} us", flush=True)
    rows.append(dict(what="empty launch", us=floor))
    gemv_fp8 = [dict(moe_configs.GEMV_LAYOUT["fp8"][1]),
                dict(BN=32, BKD=64, BKF=256, BKQ=256, BKI=128, num_warps=4, num_stages=1)]
    for shape in args.shapes.split(","):
        sh = SHAPES[shape]
        for M in (1, 2, 8, 32):
            lg = routing(M, sh["E"], sh["k"], 0)
            us = timing.graph_us([lambda: moe.route(lg, sh["k"], True)] * 20)
            print(f"{shape} M={M} route alone {us:.2f} us", flush=True)
            rows.append(dict(shape=shape, M=M, what="route", us=us))
        x = torch.randn(32, sh["H"], device="cuda", dtype=torch.bfloat16)
        for spec in ("bf16", "int4", "fp8", "fp8_w8a16", "int8", "int8_w8a16"):
            base, copies = layers(shape, lambda E: mt.uniform(spec, E))
            cfgs = [None] + ([("gemv", c, c) for c in gemv_fp8] if spec == "fp8" else [])
            for M in (1, 2, 4, 8, 32):
                for cfg in cfgs if M <= 8 else [None]:
                    time_layer(rows, shape, spec, base, copies, x, M, cfg,
                               "default" if cfg is None else str(cfg[1]), 40 if M <= 8 else 12)
            del copies, base
            torch.cuda.empty_cache()


def mixed(args, rows):
    dot = ("dot", moe_configs.dot_config(8), moe_configs.dot_config(8))
    for shape in args.shapes.split(","):
        x = torch.randn(16, SHAPES[shape]["H"], device="cuda", dtype=torch.bfloat16)
        for name, fn in MIXES.items():
            base, copies = layers(shape, fn)
            for M in (2, 4, 8, 16):
                for label, cfg in (("default", None), ("dot", dot)):
                    time_layer(rows, shape, name, base, copies, x, M, cfg, label, 40)
            del copies, base
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="30b,235b")
    ap.add_argument("--mixed", action="store_true")
    args = ap.parse_args()
    rows = []
    (mixed if args.mixed else uniform)(args, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
