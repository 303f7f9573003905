"""The int4 (and GPTQ 8-bit) GEMM's launch choice (intq.intq_config: its path in brackets) against
the alternatives it replaced, per group size: the BM-16 per-field tiles (int4: the choice for 17-128
rows until session 13), the tuned group-128 row (configs.get) and the defaults (configs.default), in
µs per call on the bench-kernels shapes (cold weights rotated over >= 256 MB, CUDA-graph replay). A
config that cannot launch prints FAIL (e.g. out of shared memory; the per-field tiles are int4 only).

    python scripts/bench_int4_gemm.py [--ms 17,32,64,128,256,512] [--groups 128,32] [--bits 4,8] [--act-order]
                                      [--swap-tiles] [--paired-min-bm N]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import bench as B
from mixprec.kernels import configs, timing
from mixprec.kernels.ints import next_power_of_2
from mixprec.kernels.intq import field_tiles_config, intq_config, intq_linear_cfg, intq_linear_reference

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--ms", default="17,32,64,128,256,512")
p.add_argument("--groups", default="128,32")
p.add_argument("--bits", default="4")
p.add_argument("--act-order", action="store_true", help="weights with a random act-order permutation")
p.add_argument("--swap-tiles", action="store_true",
               help="also time swap tiles of BN 64 / 4 warps and BN 128 / 8 warps (BM: the rows rounded up to a "
                    "power of two, 16-128; auto K split; 3 stages)")
p.add_argument("--paired-min-bm", type=int, default=None,
               help="set quant.PAIRED_MIN_BM in this process (swap tiles of at least this many rows pair fields)")
a = p.parse_args()
if a.paired_min_bm is not None:      # before any kernel compiles: a constexpr global of the tile loop
    import triton.language as tl

    from mixprec.kernels import quant
    quant.PAIRED_MIN_BM = tl.constexpr(a.paired_min_bm)
ms, groups = [int(m) for m in a.ms.split(",")], [int(g) for g in a.groups.split(",")]
bitss = [int(b) for b in a.bits.split(",")]


def weights(bits: int, G: int, N: int, K: int):
    """(tensors, reference(x, tensors)) of a random asymmetric `bits`-bit weight, group G."""
    if bits == 4:
        ts, _, ref = B.make_variant(f"int4 g{G} asym", N, K, "cuda")
        if a.act_order:
            perm = torch.randperm(K, device="cuda").to(torch.int32)
            return ts + [perm], lambda x, t: intq_linear_reference(x, t[0], t[1], t[2], t[3], 4, G)
        return ts + [None], ref
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K * bits // 32, N), dtype=torch.int32, device="cuda")
    sc = (torch.rand(K // G, N, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    z = torch.randint(0, 1 << bits, (K // G, N), dtype=torch.uint8, device="cuda")
    return [qw, sc, z, None], lambda x, t: intq_linear_reference(x, t[0], t[1], t[2], None, bits, G)

print(f"{torch.cuda.get_device_name()}, copy bandwidth {timing.copy_bandwidth_gbps():.0f} GB/s; "
      "µs library [path] / per-field BM 16 / tuned / default" + (" / swap BN 64 4 warps / swap BN 128 8 warps"
                                                                  if a.swap_tiles else ""))
for model, sname, N, K in B.SHAPES:
    for bits, G in ((b, g) for b in bitss for g in groups):
        ts, ref = weights(bits, G, N, K)
        sets = B.rotate(ts)
        cells = []
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y0 = ref(x, ts)
            res = []
            lib = intq_config(bits, M, N, K, G, torch.bfloat16)
            field = field_tiles_config(M, N, K)
            cands = [lib, field, configs.get(f"intq{bits}", M, N, K), configs.default(f"intq{bits}", M, N, K)]
            if a.swap_tiles:
                bm = min(128, max(16, next_power_of_2(M)))
                cands += [configs.cfg("swap", bm, bn, 128, configs.auto_split(M, N, K, bm, bn, 128), w, 3)
                          for bn, w in ((64, 4), (128, 8))]
            for c in cands:
                def f(t, c=c):
                    return intq_linear_cfg(x, t[0], t[1], t[2], t[3], bits, G, c)
                try:
                    q = B.sqnr(f(ts).float(), y0.float())
                    us = timing.graph_us([lambda t=t: f(t) for t in sets])
                    res.append(f"{us:.1f}" + ("" if q >= B.SQNR_MIN else f"(SQNR {q:.0f} dB)"))
                except B.BENCH_ERRORS as e:
                    res.append(f"FAIL {type(e).__name__}")
            res[0] += f" [{lib['path']}]"
            cells.append(f"M={M} " + " / ".join(res))
        del sets, ts
        print(f"{model} {sname:8s} {bits}-bit g{G:<3d} " + " | ".join(cells), flush=True)
