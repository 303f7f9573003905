"""Target for Nsight Compute: one eager decode step of a synthetic Qwen3-30B-A3B-shaped model,
after a warm-up, inside a profiled region, so that

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
        python scripts/ncu_step.py MIX [LAYERS] [BATCH] [MODEL] > step.csv
    python scripts/ncu_step.py --summary step.csv

times every kernel of the step on its own (serialised, caches flushed before each: no overlap from
programmatic dependent launch, which makes the graph profile of scripts/profile_decode.py add up to
more than the step); --summary prints µs per kernel name per layer."""
import csv
import os
import sys

if len(sys.argv) > 2 and sys.argv[1] == "--summary":
    rows = [r for r in csv.reader(l for l in open(sys.argv[2]) if l.startswith('"'))]
    head = rows[0]
    kn, mn, mv = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    per: dict[str, list[float]] = {}
    for r in rows[1:]:
        if r[mn] == "gpu__time_duration.sum":     # ns (usecond when ncu scales it: see the unit column)
            unit = r[head.index("Metric Unit")]
            v = float(r[mv].replace(",", "")) * {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[unit]
            per.setdefault(r[kn], []).append(v)
    total = sum(sum(v) for v in per.values())
    print(f"{sum(len(v) for v in per.values())} kernels, {total:.1f} µs summed")
    for name, v in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(v):9.1f} µs {len(v):4d}x {sum(v) / len(v):8.2f} µs  {name[:100]}")
    sys.exit(0)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.runtime.generate import Generator  # noqa: E402
from mixprec.runtime.sampling import SamplingParams  # noqa: E402
from mixprec.runtime.synthetic import profile_target  # noqa: E402

model, prompts, label = profile_target(sys.argv[1:], "int4", 4)
gen = Generator(model, use_cuda_graphs=False)
steps = gen.stream(prompts, SamplingParams(max_new_tokens=8))
for _ in range(4):      # prefill and decode steps: every kernel compiled and warm
    next(steps)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
next(steps)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
for _ in steps:
    pass
print(f"profiled one decode step: {label}", file=sys.stderr)
