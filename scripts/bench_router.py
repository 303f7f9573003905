"""The batch 1-4 MoE router on its own: residual add + RMSNorm + router linear + softmax / top-k
in one launch (`moe.norm_router_route`, what a decoder layer runs at 1-4 tokens) against the
same work as separate launches (the RMSNorm kernel, then F.linear + `moe.route`), on the
Qwen3-30B-A3B and 235B-A22B shapes (E = 128 experts, top-8): CUDA graphs over cold copies of the
router weight (a decode step reads each layer's router once, after other layers' weights went
through L2), µs per call; a row says when the two picked other experts (bf16 logits summed in
another order can round apart). A quick A/B for router changes: run it on two trees in one call.

    python scripts/bench_router.py [--tokens 1,2] [--programs 1x0,2x4,1x1x1024]"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe, timing     # noqa: E402
from mixprec.kernels.norm import rms_norm    # noqa: E402

SHAPES = {"30B": 2048, "235B": 4096}          # hidden size; both: 128 experts, top-8, renormalised
E, TOPK = 128, 8

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--tokens", default="1,2")
p.add_argument("--programs", default="1x0",
               help="one-launch router columns, EXPERTSxWARPS[xTILE] each (moe.ROUTER_BE / ROUTER_WARPS / "
                    "ROUTER_TILE; warps 0: moe's rule)")
a = p.parse_args()
VARIANTS = [tuple(int(v) for v in c.split("x")) for c in a.programs.split(",")]
TOKENS = [int(v) for v in a.tokens.split(",")]
moe.ROUTER_FUSED_MAX_M = max(TOKENS + [moe.ROUTER_FUSED_MAX_M])    # time the one launch past its range too
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: µs per call (CUDA graph, cold router "
      f"weights)")
cols = [f"one launch {'x'.join(map(str, v))}" for v in VARIANTS]
print("| shape | tokens | " + " | ".join(cols) + " | rms_norm + F.linear + route |")
print("|---|---:|" + "---:|" * (len(cols) + 1))
for name, H in SHAPES.items():
    for M in TOKENS:
        g = torch.Generator(device="cuda").manual_seed(H + M)
        copies = 64                                       # 64 x 0.5-1 MB of router weights: past L2
        ws = [torch.randn(E, H, device="cuda", generator=g).mul(H ** -0.5).to(torch.bfloat16) for _ in range(copies)]
        x, r = (torch.randn(M, H, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        nw = torch.ones(H, device="cuda", dtype=torch.bfloat16)

        def fused(i):
            return moe.norm_router_route(x, r, nw, 1e-6, ws[i], TOPK, True)

        def split(i):
            y, _ = rms_norm(x, nw, 1e-6, residual=r)
            return moe.route(F.linear(y, ws[i]), TOPK, True)

        cells = []
        for v in VARIANTS:
            moe.ROUTER_BE, moe.ROUTER_WARPS = v[0], v[1] or None
            moe.ROUTER_TILE = v[2] if len(v) > 2 else 4096
            # the logits' bf16 rounding may differ (fp32 sums in another order): say so, do not stop
            same = torch.equal(fused(0)[1].sort(-1).values, split(0)[1].sort(-1).values)
            us = timing.graph_us([lambda i=i: fused(i) for i in range(copies)])
            cells.append(f"{us:.2f}{'' if same else ' (other experts picked)'}")
        us = timing.graph_us([lambda i=i: split(i) for i in range(copies)])
        print(f"| {name} | {M} | " + " | ".join(cells) + f" | {us:.2f} |", flush=True)
