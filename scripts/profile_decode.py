"""Where a decode step's time goes: torch.profiler over eager (no CUDA graph) decode steps of a
synthetic Qwen3-30B-A3B-shaped model with fewer layers. Prints the top kernels, their launches per
step and the step time with and without CUDA graphs.

    python scripts/profile_decode.py MIX [LAYERS] [BATCH]"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.runtime.generate import Generator
from mixprec.runtime.sampling import SamplingParams
from mixprec.runtime.synthetic import build_synthetic, synthetic_args

mix = sys.argv[1] if len(sys.argv) > 1 else "bf16"
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
model = build_synthetic(synthetic_args("qwen3-30b-a3b", layers), mix, progress=False)
prompts = [[(7 * b + 13 * j) % 4096 + 1 for j in range(128)] for b in range(batch)]   # rows route apart
STEPS = 32


def run(graphs: bool) -> float:
    gen = Generator(model, use_cuda_graphs=graphs)
    for _ in gen.stream(prompts, SamplingParams(max_new_tokens=4)):   # warm-up, graph capture
        pass
    torch.cuda.synchronize()
    t0, n = None, 0
    for _ in gen.stream(prompts, SamplingParams(max_new_tokens=STEPS + 1)):
        n += 1
        if n == 1:     # the first token (prefill) is read once decode step 1 is queued: both finish here
            torch.cuda.synchronize()
            t0 = time.perf_counter()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (n - 2) * 1e3     # steps 2 .. n-1 ran after t0


print(f"mix={mix} layers={layers} batch={batch}: ms/step graphs {run(True):.3f}, eager {run(False):.3f}")
gen = Generator(model, use_cuda_graphs=False)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in gen.stream(prompts, SamplingParams(max_new_tokens=9)):
        pass
    torch.cuda.synchronize()
ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
tot = sum(e.self_device_time_total for e in ev)
launches = sum(e.count for e in ev)
print(f"CUDA kernels over 1 prefill + 8 decode steps: {launches} launches "
      f"({launches / 9 / layers:.1f} per step per layer), {tot / 1e3:.2f} ms device time")
for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:30]:
    print(f"{e.self_device_time_total / 1e3:8.3f} ms {e.count:6d}x {e.self_device_time_total / max(e.count, 1):8.2f} us  {e.key[:110]}")
