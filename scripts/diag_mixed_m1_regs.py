"""Offline sm_90 registers of the 30B batch-1 GEMV launches of layers mixing layouts: the current
rows against scripts/sweep_moe_m1.py's --mixed-m1 candidates (K tiles as long in loop steps as the
int4 ones, for fp8 only or for every layout; session 32: the latter lost 3-10% on layers with
bf16 / int8 experts). Compiles with tests/sm90_compile.py's stand-in
(no GPU; use the Triton the device runs, 3.6):

    TRITON_CACHE_DIR=/tmp/x python scripts/diag_mixed_m1_regs.py | grep -E "^==|_moe_gemv"
"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ["MIXPREC_SM90_REGS"] = "1"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests")); sys.path.insert(0, ROOT)
import sm90_compile as sc
import torch
from triton.runtime.jit import JITFunction
from mixprec.kernels import moe, moe_bench as mb, moe_configs as mc
from mixprec.kernels import moe_testing as mt
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from sweep_moe_m1 import DOWN_MIXED, UP_MIXED   # the candidates the sweep times
JITFunction.run = sc.compile_only
moe._triton_ok = lambda t: True
H, I, E, k = 2048, 768, 128, 8
g = torch.Generator().manual_seed(0)
x = torch.randn(1, H, generator=g).to(torch.bfloat16)
w, _ = moe.route(torch.randn(1, E, generator=g), k, True)
ids = torch.randperm(E, generator=g)[:k][None].to(torch.int32)
for name in ("rt_mixed", "int4+fp8+bf16", "int4+fp8"):
    b = mt.build_buckets(mb.CONFIGS[name](E), H, I, dtype=torch.bfloat16, device="cpu", seed=0)
    pick = mc.pick(1, *moe.side_layouts(b), hidden=H)
    # each side's candidates with the pick's other side, as the sweep times them
    confs = {"cur": pick, **{f"up:{n}": ("gemv", cfg, *pick[2:]) for n, cfg in UP_MIXED.items() if cfg},
             **{f"down:{n}": (*pick[:2], "gemv", cfg) for n, cfg in DOWN_MIXED.items() if cfg}}
    for label, conf in confs.items():
        print(f"== {name} {label}", flush=True)
        moe.fused_moe(x, ids, w, b, I, config=conf)
print("failures:", sc.failures)
