"""Time to first token of a burst of requests that share a long system prompt, with and without
prefix reuse (Engine prefix_reuse; with it the shared tokens are prefilled once and copied): a
synthetic model (random weights, real shapes), per system-prompt length N requests (the prompt +
64 tokens of their own, 1 generated) submitted at once; mean and largest TTFT, and the first
tokens compared (greedy). The engines run in one process, alternated over --reps. GPU or CPU.

    python scripts/bench_burst.py [--model qwen3-30b-a3b] [--mix int4] [--system 1000,4000] [--n 8]"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine_model import add_model_args, build
from mixprec.runtime.engine import Engine
from mixprec.runtime.sampling import SamplingParams

ap = argparse.ArgumentParser()
add_model_args(ap)
ap.add_argument("--system", default="1000,4000")
ap.add_argument("--n", type=int, default=8)
ap.add_argument("--reps", type=int, default=2)
a = ap.parse_args()
systems = [int(c) for c in a.system.split(",")]
model = build(a, f"; bursts of {a.n} requests")
V = model.args.vocab_size


def burst(eng: Engine, system: int, rep: int) -> tuple[list[float], list[int], list[int]]:
    """-> (each request's TTFT ms, first tokens, cached tokens)."""
    g = torch.Generator().manual_seed(1000 * system + rep)
    shared = torch.randint(1, V, (system,), generator=g).tolist()
    prompts = [shared + torch.randint(1, V, (64,), generator=g).tolist() for _ in range(a.n)]
    reqs = [eng.submit(p, SamplingParams(max_new_tokens=1)) for p in prompts]
    done = [r.result(600) for r in reqs]
    return ([(r.first_token_at - r.submitted_at) * 1e3 for r in done], [r.output_ids[0] for r in done],
            [r.cached_tokens for r in done])


engines = {flag: Engine(model, max_batch=a.n, max_len=max(systems) + 64 + 16, prefix_reuse=flag) for flag in (False, True)}
for eng in engines.values():        # compile / capture outside the timings (the same prompt lengths)
    for system in systems:
        burst(eng, system, -1)
print("| system prompt | reuse | mean TTFT ms | largest TTFT ms | cached tokens (sum) | same first tokens |")
print("|---:|---|---:|---:|---:|---:|")
for system in systems:
    res = {False: [], True: []}
    for rep in range(a.reps):
        for flag, eng in engines.items():
            res[flag].append(burst(eng, system, rep))
    same = sum(x == y for (_, f0, _), (_, f1, _) in zip(res[False], res[True]) for x, y in zip(f0, f1))
    for flag in (False, True):
        mean = statistics.median(statistics.mean(t) for t, _, _ in res[flag])
        top = statistics.median(max(t) for t, _, _ in res[flag])
        print(f"| {system} | {'on' if flag else 'off'} | {mean:.1f} | {top:.1f} | {sum(res[flag][-1][2])} | "
              f"{same}/{a.n * a.reps} |", flush=True)
for eng in engines.values():
    eng.shutdown()
