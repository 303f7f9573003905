"""Decode attention (one new query per sequence over its KV cache) against torch SDPA, on the
Qwen3-30B-A3B attention shapes (32 query heads, or --heads 64 for the 235B; 4 kv heads, head dim 128, bf16): CUDA graphs over
cold cache copies (a decode step reads each layer's cache once, after 47 other layers' weights
went through L2), µs per call, GB/s of K/V read and % of the measured copy bandwidth. Also the
split of the cache length over programs (kernels/attention.py TARGET_PROGRAMS, block_n), which is
how those two are chosen; every variant is checked against SDPA first (SQNR >= 40 dB).

    python scripts/bench_attention.py [--batch 1,8,32,64] [--lens 256,2048,8192,32768] [--new]"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import attention, timing     # noqa: E402
from mixprec.kernels.moe_testing import sqnr_db    # noqa: E402

HQ, HK, D = 32, 4, 128
VARIANTS = {   # name -> kernels/attention.py attributes replaced for the call
    "ours": {},
    "no split": dict(TARGET_PROGRAMS=1),
    "half the programs": dict(TARGET_PROGRAMS=attention.TARGET_PROGRAMS // 2),
    "twice the programs": dict(TARGET_PROGRAMS=attention.TARGET_PROGRAMS * 2),
    "BLOCK_N 32": dict(block_n=lambda n: 32),
    "BLOCK_N 64": dict(block_n=lambda n: 64),
    "BLOCK_N 128": dict(block_n=lambda n: 128),
    "at most 8 splits": dict(MAX_SPLITS=8),
    "at most 16 splits": dict(MAX_SPLITS=16),
    "at most 64 splits": dict(MAX_SPLITS=64),
    "merge 2x wider": dict(MERGE_ELEMS=2 * attention.MERGE_ELEMS),
    "merge 4x wider": dict(MERGE_ELEMS=4 * attention.MERGE_ELEMS),
    "2 warps": dict(DECODE_WARPS=2, WIDE_WARPS=2),
    "4 warps": dict(DECODE_WARPS=4, WIDE_WARPS=4),
    "8 warps": dict(DECODE_WARPS=8, WIDE_WARPS=8),
    "at most 4 splits": dict(MAX_SPLITS=4),
    "at most 2 splits": dict(MAX_SPLITS=2),
    "tile loop only": dict(ONE_TILE=False),
}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batch", default="1,8,32,64")
p.add_argument("--lens", default="256,2048,8192,32768")
p.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (default: all)")
p.add_argument("--heads", type=int, default=HQ, help="query heads (32: Qwen3-30B-A3B, 64: Qwen3-235B-A22B)")
p.add_argument("--max-cache-gb", type=float, default=4.0, help="skip (batch, length) whose one cache is larger")
p.add_argument("--new", action="store_true",
               help="time the decoder's step: raw q / k / v projections, q/k RMSNorm + RoPE and the new token's "
                    "k / v stored in the same launch (decode_attention_new); its first column is the same work "
                    "in two launches (qk_norm_rope_store, then decode_attention), the variants' reference")
a = p.parse_args()
HQ = a.heads
if a.variants:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in a.variants.split(",")}
bw = timing.copy_bandwidth_gbps()
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: copy bandwidth {bw:.0f} GB/s; "
      f"µs per call (GB/s of K/V read, % of copy bandwidth)", flush=True)
print("| batch | cache length | " + " | ".join(["two launches" if a.new else "SDPA"] + list(VARIANTS)) + " |")
print("|---:|---:|" + "---:|" * (1 + len(VARIANTS)))


def point(B: int, S: int, kv_bytes: int) -> list[float]:
    """µs of SDPA, then of each variant, at batch B over S cached slots (all visible)."""
    copies = max(1, min(16, int(512e6 // kv_bytes) + 1))    # >= 512 MB of caches: no L2 reuse
    g = torch.Generator(device="cuda").manual_seed(B * 100003 + S)
    qs = [torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    ks = [torch.randn(B, HK, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    vs = [torch.randn(B, HK, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    start = torch.zeros(B, dtype=torch.long, device="cuda")
    pos = torch.full((B,), S - 1, dtype=torch.long, device="cuda")

    def sdpa(i):
        return F.scaled_dot_product_attention(qs[i][:, :, None], ks[i], vs[i], enable_gqa=True)[:, :, 0]

    def ours(i):
        return attention.decode_attention(qs[i], ks[i], vs[i], start, pos)

    if a.new:   # raw projections [B, H*D]; the new token goes to slot pos = S - 1
        qr, kr, vr = ([torch.randn(B, h * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
                      for h in (HQ, HK, HK))
        ang = torch.rand(B, D // 2, device="cuda", generator=g) * 6.28
        cos, sin = (f(torch.cat([ang, ang], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        qw, kw = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16), torch.ones(D).cuda().bfloat16()

        def sdpa(i):       # the same work in two launches
            qn = attention.qk_norm_rope_store(qr[i][:, None], kr[i][:, None], vr[i][:, None], cos[:, None],
                                              sin[:, None], qw, kw, 1e-6, ks[i], vs[i], pos[:, None])
            return attention.decode_attention(qn[:, 0], ks[i], vs[i], start, pos)

        def ours(i):
            return attention.decode_attention_new(qr[i], kr[i], vr[i], cos, sin, qw, kw, 1e-6, ks[i], vs[i], start, pos)

    ref = sdpa(0).float()
    cells = [timing.graph_us([lambda i=i: sdpa(i) for i in range(copies)])]
    for patch in VARIANTS.values():
        saved = {k: getattr(attention, k) for k in patch}
        for k, v in patch.items():
            setattr(attention, k, v)
        try:
            db = sqnr_db(ref, ours(0).float())
            cells.append(timing.graph_us([lambda i=i: ours(i) for i in range(copies)]) if db >= 40 else float("inf"))
        finally:
            for k, v in saved.items():
                setattr(attention, k, v)
    return cells


for B in (int(v) for v in a.batch.split(",")):
    for S in (int(v) for v in a.lens.split(",")):
        kv_bytes = 2 * B * HK * S * D * 2
        if kv_bytes > a.max_cache_gb * 1e9:
            continue
        row = [f"{us:.1f} ({kv_bytes / us / 1e3:.0f}, {100 * kv_bytes / us / 1e3 / bw:.0f}%)"
               for us in point(B, S, kv_bytes)]
        print(f"| {B} | {S} | " + " | ".join(row) + " |", flush=True)
        torch.cuda.empty_cache()
