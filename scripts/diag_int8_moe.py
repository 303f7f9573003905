"""Which int8 activation quantization does the fused MoE differ from moe_reference on? SQNR of
fused_moe against the reference as is and with the int8 W8A8 quantization of the down input, the
gate/up input, or both left out (uniform int8 experts, both Qwen3 shapes; needs CUDA).

    PYTHONPATH=. python scripts/diag_int8_moe.py"""
import torch
from mixprec.kernels import moe, moe_testing as mt
from mixprec.kernels.moe_bench import routing
orig = moe.quant_act
def variant(skip):
    def q(v, layout, params):
        return v if skip(v) else orig(v, layout, params)
    return q
for shape, (H, I) in {"30b": (2048, 768), "235b": (4096, 1536)}.items():
    b = mt.build_buckets(mt.uniform("int8", 128), H, I, dtype=torch.bfloat16, device="cuda", seed=3)
    for M in (1, 1, 1, 5, 40):
        torch.manual_seed(M * 7 + len(shape))
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        w, ids = moe.route(routing(M, 128, 8, 5), 8, True)
        for path in ("auto", "dot"):
            cfg = None if path == "auto" else ("dot",) + (moe.moe_configs.DOT[0][1],) * 2
            y = moe.fused_moe(x, ids, w, b, I, config=cfg).float()
            out = []
            for name, skip in (("ref", lambda v: False), ("down-unq", lambda v: v.shape[-1] == I),
                               ("up-unq", lambda v: v.shape[-1] == H), ("none", lambda v: True)):
                moe.quant_act = variant(skip)
                out.append(f"{name} {mt.sqnr_db(moe.moe_reference(x, ids, w, b, I), y):.1f}")
                moe.quant_act = orig
            print(shape, "M", M, path, " | ".join(out), flush=True)
