"""Where a decode step's time goes: torch.profiler over a few CUDA-graph-free decode steps of
a synthetic Qwen3-30B-A3B-shaped model (reduced layers). Prints the top kernels."""
import sys

import torch

from mixprec.runtime.generate import Generator
from mixprec.runtime.sampling import SamplingParams
from mixprec.runtime.synthetic import build_synthetic, synthetic_args

mix = sys.argv[1] if len(sys.argv) > 1 else "bf16"
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
model = build_synthetic(synthetic_args("qwen3-30b-a3b", layers), mix, progress=False)
gen = Generator(model, use_cuda_graphs=False)
prompt = [list(range(1, 129))]
for _ in gen.stream(prompt, SamplingParams(max_new_tokens=4)):
    pass
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in gen.stream(prompt, SamplingParams(max_new_tokens=9)):
        pass
    torch.cuda.synchronize()
print(f"mix={mix} layers={layers}: top CUDA kernels over 8 decode steps + 1 prefill")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
