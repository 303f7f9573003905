"""Is eager prefill GPU- or host-bound? A synthetic Qwen3-30B-A3B model; per batch of 128-token
prompts: wall time of a prefill (+ first token, median of 5), the sum of its GPU kernel times and
the GPU span (torch.profiler, one more call), and the kernels that take the most time. A wall far
above the kernel sum means the host's launches set the pace.

    python scripts/profile_prefill.py [MIX] [BATCHES]"""
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.runtime.generate import Generator                             # noqa: E402
from mixprec.runtime.sampling import SamplingParams                         # noqa: E402
from mixprec.runtime.synthetic import build_synthetic, synthetic_args       # noqa: E402

mix = sys.argv[1] if len(sys.argv) > 1 else "bf16"
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "8,32,64").split(",")]
args = synthetic_args("qwen3-30b-a3b")
gen = Generator(build_synthetic(args, mix, progress=False))
for B in batches:
    prompts = torch.randint(0, args.vocab_size, (B, 128), generator=torch.Generator().manual_seed(B)).tolist()

    def once():
        for _ in gen.stream(prompts, SamplingParams(max_new_tokens=1)):
            pass
    for _ in range(3):
        once()
    walls = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        once()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kern = sum(e.time_range.end - e.time_range.start for e in evs) / 1e3
    span = (max(e.time_range.end for e in evs) - min(e.time_range.start for e in evs)) / 1e3
    print(f"mix={mix} B={B} tokens={B * 128}: wall median {statistics.median(walls) * 1e3:.1f} ms "
          f"(all {[round(w * 1e3, 1) for w in walls]}), GPU kernel sum {kern:.1f} ms, GPU span {span:.1f} ms, "
          f"kernels {len(evs)}", flush=True)
    top = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]   # per kernel name
    for e in sorted(top, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"    {e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x {e.key[:90]}", flush=True)
