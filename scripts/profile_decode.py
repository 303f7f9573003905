"""Where a decode step's time goes: torch.profiler over eager (no CUDA graph) decode steps of a
synthetic model of Qwen3-30B-A3B shapes (or MODEL's) with fewer layers. Prints the top kernels,
their launches per step and the step time with and without CUDA graphs; then the same steps
replayed as CUDA graphs: kernel time per step against the step's span (the gaps are launch /
drain latency), and kernels launched several times per layer split by their order in the layer
(#0 / #1: the MoE's gate/up / down launches, the qkv / o_proj GEMVs).

    python scripts/profile_decode.py MIX [LAYERS] [BATCH] [MODEL]"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.runtime.generate import Generator
from mixprec.runtime.sampling import SamplingParams
from mixprec.runtime.synthetic import profile_target

model, prompts, label = profile_target(sys.argv[1:], "bf16", 8)
layers = model.args.num_hidden_layers
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


print(f"{label}: ms/step graphs {run(True):.3f}, eager {run(False):.3f}")
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

# The same decode steps replayed as CUDA graphs (what `bench` times): how much of a step the GPU
# spends inside kernels (their union; PDL lets neighbours overlap) and how much between them.
gen = Generator(model, use_cuda_graphs=True)
for _ in gen.stream(prompts, SamplingParams(max_new_tokens=4)):   # capture
    pass
steps = gen.stream(prompts, SamplingParams(max_new_tokens=STEPS + 2))
next(steps)
torch.cuda.synchronize()
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as prof:
    for _ in range(STEPS):
        next(steps)
    torch.cuda.synchronize()
for _ in steps:
    pass
evs = prof.events()
n_graphs = sum(1 for e in evs if e.name == "cudaGraphLaunch")
if not n_graphs:
    sys.exit("graph replay: no cudaGraphLaunch in the trace")
kern = sorted((e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "cudaGraphLaunch"),
              key=lambda e: e.time_range.start)
busy, end = 0.0, float("-inf")
for e in kern:      # union of the kernels' intervals
    s, t = e.time_range.start, e.time_range.end
    busy += max(0.0, t - max(s, end))
    end = max(end, t)
span = end - kern[0].time_range.start
dur = sum(e.time_range.elapsed_us() for e in kern)
print(f"graph replay: {n_graphs} decode graphs, {len(kern)} kernels ({len(kern) / n_graphs / layers:.1f} per step "
      f"per layer); per step {span / n_graphs:.1f} us from first kernel start to last end, kernels busy "
      f"{busy / n_graphs:.1f} us (union), kernel durations summed {dur / n_graphs:.1f} us")
per: dict[str, list] = {}
for e in kern:
    per.setdefault(e.name, []).append(e.time_range.elapsed_us())
for name, ds in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:20]:
    print(f"{sum(ds) / n_graphs:8.1f} us/step {len(ds) / n_graphs:6.1f}x {sum(ds) / len(ds):8.2f} us  {name[:110]}")

# A kernel launched c times per layer (the MoE's gate/up and down launches, qkv and o_proj) is
# split by its launch order inside the layer: "#i" is the i-th of the c (in the step's order).
per_launch: dict[tuple, list] = {}
seen: dict[str, int] = {}
for e in kern:
    k = seen.get(e.name, 0)
    seen[e.name] = k + 1
    per_layer, rem = divmod(len(per[e.name]), n_graphs * layers)
    idx = k % per_layer if per_layer > 1 and rem == 0 else None
    per_launch.setdefault((e.name, idx), []).append(e.time_range.elapsed_us())
print("per launch inside a layer (kernels launched several times per layer):")
for (name, idx), ds in sorted(per_launch.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    if idx is not None:
        print(f"{sum(ds) / n_graphs:8.1f} us/step {len(ds) / n_graphs:6.1f}x {sum(ds) / len(ds):8.2f} us  "
              f"{name[:100]} #{idx}")
