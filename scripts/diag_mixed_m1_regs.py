"""Offline sm_90 registers of the 30B batch-1 GEMV launches of layers mixing layouts: the current
rows against K tiles as long in loop steps as the int4 ones for every layout (session 32: that
lost 3-10% on layers with bf16 / int8 experts). Compiles with tests/sm90_compile.py's stand-in
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
JITFunction.run = sc.compile_only
moe._triton_ok = lambda t: True
H, I, E, k = 2048, 768, 128, 8
g = torch.Generator().manual_seed(0)
x = torch.randn(1, H, generator=g).to(torch.bfloat16)
w, _ = moe.route(torch.randn(1, E, generator=g), k, True)
ids = torch.randperm(E, generator=g)[:k][None].to(torch.int32)
base = dict(BKD=128, BKF=128, BKI=128, num_stages=1)
def c(bn, bkq, wp, **kw): return dict(base, BN=bn, BKQ=bkq, num_warps=wp, **kw)
for name in ("rt_mixed", "int4+fp8+bf16", "int4+fp8"):
    b = mt.build_buckets(mb.CONFIGS[name](E), H, I, dtype=torch.bfloat16, device="cpu", seed=0)
    pu, cu, pd, cd = mc.pick(1, *moe.side_layouts(b), hidden=H)
    for label, up, dn in (("cur", cu, cd), ("K512/K256", c(4, 512, 1, gu=True, f16=True, BKD=512, BKF=512, BKI=512),
                                                       c(32, 256, 4, f16=True, BKD=256, BKF=256, BKI=256))):
        print(f"== {name} {label}", flush=True)
        moe.fused_moe(x, ids, w, b, I, config=("gemv", up, "gemv", dn))
print("failures:", sc.failures)
