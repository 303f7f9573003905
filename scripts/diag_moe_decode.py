"""Where does a decode-size fused MoE layer spend its time? (needs CUDA)

Times, in CUDA graphs over cold weight copies (as bench-moe does), route + fused_moe for uniform
layers of both activation modes (fp8 / int8 W8A8 vs W8A16), a few fp8 GEMV configurations, and
the floor of one empty Triton launch and of route() alone, at M = 1, 2, 4, 8, 32.
--mixed: layers whose launches mix layouts (int4+fp8, int4+fp8+bf16, the runtime's mixed
preset), at M = 2..16 on the joint GEMV config and forced onto the dot path (the crossover).

    PYTHONPATH=. python scripts/diag_moe_decode.py [--mixed] [--out results.json]"""
import argparse
import json

import torch
import triton
import triton.language as tl

from mixprec.kernels import moe, moe_configs, timing
from mixprec.kernels import moe_testing as mt
from mixprec.kernels.moe_bench import SHAPES, clone_buckets, layer_bytes, routing


@triton.jit
def _empty_kernel(p):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="30b,235b")
    ap.add_argument("--mixed", action="store_true")
    args = ap.parse_args()
    rows = []
    if args.mixed:
        mixed(args, rows)
        return
    dummy = torch.zeros(1, device="cuda")
    floor = timing.graph_us([lambda: _empty_kernel[(1,)](dummy)] * 20)
    print(f"empty triton launch in a graph: {floor:.2f} us", flush=True)
    rows.append(dict(what="empty launch", us=floor))
    gemv_fp8 = [dict(moe_configs.GEMV_LAYOUT["fp8"][1]),
                dict(BN=32, BKD=64, BKF=256, BKQ=256, BKI=128, num_warps=4, num_stages=1)]
    for shape in args.shapes.split(","):
        sh = SHAPES[shape]
        E, k, H, I = sh["E"], sh["k"], sh["H"], sh["I"]
        x = torch.randn(32, H, device="cuda", dtype=torch.bfloat16)
        for M in (1, 2, 8, 32):
            lg = routing(M, E, k, 0)
            us = timing.graph_us([lambda: moe.route(lg, k, True)] * 20)
            print(f"{shape} M={M} route alone {us:.2f} us", flush=True)
            rows.append(dict(shape=shape, M=M, what="route", us=us))
        for spec in ("bf16", "int4", "fp8", "fp8_w8a16", "int8", "int8_w8a16"):
            base = mt.build_buckets(mt.uniform(spec, E), H, I, dtype=torch.bfloat16, device="cuda", seed=7)
            copies = [base] + [clone_buckets(base) for _ in range(max(1, int(4e9 // layer_bytes(base))))]
            cfgs = [None]
            if spec == "fp8":
                cfgs += [("gemv", c, c) for c in gemv_fp8]
            for M in (1, 2, 4, 8, 32):
                lg = routing(M, E, k, 0)
                xm = x[:M].contiguous()
                for cfg in cfgs if M <= 8 else [None]:
                    def make(L, cfg=cfg, xm=xm, lg=lg):
                        def f():
                            w, ids = moe.route(lg, k, True)
                            return moe.fused_moe(xm, ids, w, L, I, config=cfg)
                        return f
                    n = min(len(copies), 40 if M <= 8 else 12)
                    us = timing.graph_us([make(L) for L in copies[:n]])
                    label = "default" if cfg is None else str(cfg[1])
                    path = moe_configs.pick(M, *moe.side_layouts(base)) if cfg is None else cfg
                    print(f"{shape} {spec:11s} M={M:3d} {us:8.1f} us  {label} ({path[0]}/{path[2] if len(path) == 4 else path[0]})",
                          flush=True)
                    rows.append(dict(shape=shape, spec=spec, M=M, us=us, config=label))
            del copies, base
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def mixed(args, rows):
    mixes = {"int4+fp8": lambda E: mt.split(["int4", "fp8"], E, seed=1),
             "int4+fp8+bf16": lambda E: mt.split(["int4", "fp8", "bf16"], E, seed=2),
             "preset mixed": lambda E: ([("int4",) * 3] * (E // 2) + [("fp8", "fp8", "bf16")] * (E // 4)
                                        + [("int8", "int8", "fp8")] * (E // 4))}
    dot = ("dot", moe_configs.dot_config(8), moe_configs.dot_config(8))
    for shape in args.shapes.split(","):
        sh = SHAPES[shape]
        E, k, H, I = sh["E"], sh["k"], sh["H"], sh["I"]
        x = torch.randn(16, H, device="cuda", dtype=torch.bfloat16)
        for name, fn in mixes.items():
            base = mt.build_buckets(fn(E), H, I, dtype=torch.bfloat16, device="cuda", seed=7)
            copies = [base] + [clone_buckets(base) for _ in range(max(1, int(4e9 // layer_bytes(base))))]
            for M in (2, 4, 8, 16):
                lg = routing(M, E, k, 0)
                xm = x[:M].contiguous()
                for label, cfg in (("default", None), ("dot", dot)):
                    def make(L, cfg=cfg, xm=xm, lg=lg):
                        def f():
                            w, ids = moe.route(lg, k, True)
                            return moe.fused_moe(xm, ids, w, L, I, config=cfg)
                        return f
                    us = timing.graph_us([make(L) for L in copies[:min(len(copies), 40)]])
                    path = moe_configs.pick(M, *moe.side_layouts(base)) if cfg is None else cfg
                    print(f"{shape} {name:14s} M={M:3d} {us:8.1f} us  {label} ({path[0]}/{path[2] if len(path) == 4 else path[0]})",
                          flush=True)
                    rows.append(dict(shape=shape, spec=name, M=M, us=us, config=label))
            del copies, base
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
