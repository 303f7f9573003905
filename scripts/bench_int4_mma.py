"""The int4 mma GEMV tile (kernels/gemv_mma.py) as a dense one-token GEMV over whole K (intq_linear_cfg
with an "mma" config, one program per 64 columns), against the library's int4 GEMV (intq_linear,
its tuned row) and bf16 F.linear on the same weights: µs (CUDA graphs over cold weight copies),
% of the measured copy bandwidth over the int4 bytes, SQNR against the fp32 dequant reference.
The default shapes are the 235B / 30B batch-1 MoE launches as one matrix (8 experts' gate_up side
by side, 8 experts' down) and one expert of each. GPU only.

    python scripts/bench_int4_mma.py [--shapes 24576x4096,32768x1536] [--warps 4,8]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixprec.formats.intq import pack_int32  # noqa: E402
from mixprec.kernels import configs, intq, timing  # noqa: E402
from mixprec.kernels.moe_testing import sqnr_db  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="24576x4096,32768x1536,12288x2048,16384x768,3072x4096,4096x1536")
    ap.add_argument("--warps", default="4,8")
    args = ap.parse_args()
    bw = timing.copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s (int4 weights, group 128, one bf16 token)", flush=True)
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (K, N), generator=g)
        q = pack_int32(codes, 4, dim=0).cuda()     # canonical qweight [K/8, N]
        s = (torch.rand(K // 128, N, generator=g) * 0.02 + 0.005).to(torch.bfloat16).cuda()
        x = torch.randn(1, K, generator=g).to(torch.bfloat16).cuda()
        w_ref = (codes.float() - 8) * s.float().cpu().repeat_interleave(128, 0)      # [K, N]
        ref = (x.float().cpu() @ w_ref).cuda()
        wb = w_ref.t().contiguous().to(torch.bfloat16).cuda()                         # bf16 baseline [N, K]
        copies = max(1, int(2.5e8 // (q.numel() * 4)))
        qs, ss = [q.clone() for _ in range(copies)], [s.clone() for _ in range(copies)]
        wbs = [wb.clone() for _ in range(max(1, copies // 4))]
        nbytes = q.numel() * 4 + s.numel() * 2
        res = {}
        for nw in (int(v) for v in args.warps.split(",")):
            # the library's tensor-core GEMV (intq "mma" rows): 64 columns per program, whole K
            c = configs.cfg("gemv", 1, 64, 128, 1, nw, 1, mma=True)
            y = intq.intq_linear_cfg(x, qs[0], ss[0], None, None, 4, 128, c)
            res[f"mma/{nw}w"] = (timing.graph_us([lambda i=i, c=c: intq.intq_linear_cfg(x, qs[i], ss[i], None, None, 4, 128, c)
                                                  for i in range(copies)]), sqnr_db(ref, y), nbytes)
        y = intq.intq_linear(x, qs[0], ss[0], None, None, 4, 128)
        res["intq"] = (timing.graph_us([lambda i=i: intq.intq_linear(x, qs[i], ss[i], None, None, 4, 128)
                                        for i in range(copies)]), sqnr_db(ref, y), nbytes)
        y = torch.nn.functional.linear(x, wbs[0])
        res["bf16"] = (timing.graph_us([lambda i=i: torch.nn.functional.linear(x, wbs[i]) for i in range(len(wbs))]),
                       sqnr_db(ref, y), wb.numel() * 2)
        print(f"N={N} K={K} ({nbytes / 1e6:.1f} MB int4): " + "  ".join(
            f"{k} {us:.2f} µs {b / us / 1e3 / bw * 100:.1f}% ({db:.0f} dB)" for k, (us, db, b) in res.items()), flush=True)


if __name__ == "__main__":
    main()
