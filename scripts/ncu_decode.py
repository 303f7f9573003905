"""Target for Nsight Compute: the decode-size (M=1) kernels of one Qwen3-30B-A3B layer, run in a
profiled region after a warm-up (compilation), so that

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python scripts/ncu_decode.py [LAYOUTS]

reports each kernel once per layout: route, the fused MoE up / down launches (uniform int4, fp8,
bf16 layers), and the dense fp8 W8A8 qkv / o_proj GEMVs. Without ncu it prints CUDA-event times."""
import sys

import torch

from mixprec.kernels import moe
from mixprec.kernels import moe_testing as mt
from mixprec.kernels.fp8 import fp8_linear
from mixprec.kernels.moe_bench import SHAPES, routing

layouts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["int4", "fp8", "bf16"]
sh = SHAPES["30b"]
x = torch.randn(1, sh["H"], device="cuda", dtype=torch.bfloat16)
lg = routing(1, sh["E"], sh["k"], 0)
layers = {s: mt.build_buckets(mt.uniform(s, sh["E"]), sh["H"], sh["I"], dtype=torch.bfloat16, device="cuda", seed=7)
          for s in layouts}
dense = {}
for name, N, K in (("qkv", 5120, 2048), ("o_proj", 2048, 4096)):
    w = (torch.randn(N, K, device="cuda") * 64).to(torch.float8_e4m3fn)
    s = torch.rand(N // 128, K // 128, device="cuda") * 1e-3 + 1e-4
    dense[name] = (w, s, torch.randn(1, K, device="cuda", dtype=torch.bfloat16))


def step():
    for L in layers.values():
        w, ids = moe.route(lg, sh["k"], True)
        moe.fused_moe(x, ids, w, L, sh["I"])
    for w, s, xi in dense.values():
        fp8_linear(xi, w, s, (128, 128), "w8a8")


for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.profiler.start()
step()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("done")
