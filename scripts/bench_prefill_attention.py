"""The attention of a prompt's rest after a cached prefix (Prefill.tail), per layer: our
prefill_attention over a cache row chosen on the device (what the tail graphs run) against SDPA
(flash, causal_lower_right) over a view of exactly the row's used slots (what the eager tail runs;
a view of a dynamic length, so no graph), for the 30B / 235B heads (32 / 64 query heads, 4 kv
heads, D 128, bf16), rest R tokens after a prefix of C. µs per call from CUDA-graph replays
(kernels.timing.graph_us) over caches rotated past L2 (kernels.bench.rotate: >= 256 MB of
copies, one per call, as a model's layers each read their own), max difference. GPU only.

    python scripts/bench_prefill_attention.py [--rests 16,128,2048] [--contexts 1000,8000,32000]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels.attention import prefill_attention
from mixprec.kernels.bench import rotate
from mixprec.kernels.timing import graph_us
from mixprec.layers.attention import tail_attention

ap = argparse.ArgumentParser()
ap.add_argument("--rests", default="16,128,2048")
ap.add_argument("--contexts", default="1000,8000,32000")
a = ap.parse_args()
dev, dt, D, HK, ROWS = "cuda", torch.bfloat16, 128, 4, 4
print(f"{torch.cuda.get_device_name()}; cache of {ROWS} rows, the rest in row 2")
print("| heads | prefix C | rest R | prefill_attention µs | SDPA flash µs | ratio | max diff |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for HQ in (32, 64):
    for C in (int(c) for c in a.contexts.split(",")):
        for R in (int(r) for r in a.rests.split(",")):
            S = C + R
            g = torch.Generator(device=dev).manual_seed(S)
            kc, vc = (torch.randn(ROWS, HK, S, D, generator=g, device=dev, dtype=dt) for _ in range(2))
            q = torch.randn(1, R, HQ, D, generator=g, device=dev, dtype=dt)
            rows = torch.tensor([2], device=dev)
            pos = torch.arange(C, S, device=dev)[None]
            ours = lambda k, v: prefill_attention(q, k, v, rows, pos)                       # noqa: E731
            ref = lambda k, v: tail_attention(q.transpose(1, 2), k[2:3], v[2:3], True)     # noqa: E731
            diff = (ours(kc, vc).float() - ref(kc, vc).transpose(1, 2).float()).abs().max().item()
            copies = rotate([kc, vc])
            t_ours, t_ref = (graph_us([lambda k=k, v=v, f=f: f(k, v) for k, v in copies]) for f in (ours, ref))
            print(f"| {HQ} | {C} | {R} | {t_ours:.1f} | {t_ref:.1f} | {t_ours / t_ref:.2f} | {diff:.1e} |", flush=True)
