"""Time to first token of a chat's next turn with and without prefix reuse (Engine prefix_reuse):
a synthetic model (random weights, real shapes), per context length a first turn of CONTEXT random
prompt tokens (8 generated), then the next turn (that prompt, the reply and 64 new tokens; 1
generated), timed from submit to its first token. Both engines run in one process, alternated;
the next turns' first tokens are compared (greedy; bf16 kernels of different shapes may round a
near-tie apart). GPU or CPU.

    python scripts/bench_prefix.py [--model qwen3-30b-a3b] [--mix int4] [--layers N] [--contexts 3000,8000,16000]"""
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
ap.add_argument("--contexts", default="3000,8000,16000")
ap.add_argument("--reps", type=int, default=3)
a = ap.parse_args()
contexts = [int(c) for c in a.contexts.split(",")]
model = build(a)
V = model.args.vocab_size


def turns(ctx: int, rep: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(1000 * ctx + rep)
    return (torch.randint(1, V, (ctx,), generator=g).tolist(), torch.randint(1, V, (64,), generator=g).tolist())


def run(eng: Engine, ctx: int, rep: int) -> tuple[float, int, int]:
    """-> (next turn's TTFT ms, its first token, its cached tokens)."""
    first, new = turns(ctx, rep)
    out = eng.submit(first, SamplingParams(max_new_tokens=8)).result(600).output_ids
    r = eng.submit(first + out + new, SamplingParams(max_new_tokens=1)).result(600)
    return (r.first_token_at - r.submitted_at) * 1e3, r.output_ids[0], r.cached_tokens


top = max(contexts) + 8 + 64 + 16     # room for the rest of a prompt padded to 16 tokens (else a new kernel class)
engines = {flag: Engine(model, max_batch=2, max_len=top, prefix_reuse=flag) for flag in (False, True)}
for eng in engines.values():        # compile / capture outside the timings
    run(eng, min(contexts), -1)
print("| context | whole prefill TTFT ms | with reuse ms | speed-up | cached tokens | same first token | each rep, whole / reuse |")
print("|---:|---:|---:|---:|---:|---:|---|")
for ctx in contexts:
    times = {False: [], True: []}
    same, cached = 0, 0
    for rep in range(a.reps):
        res = {flag: run(eng, ctx, rep) for flag, eng in engines.items()}
        for flag, (ms, _, _) in res.items():
            times[flag].append(ms)
        same += res[False][1] == res[True][1]
        cached = res[True][2]
    off, on = statistics.median(times[False]), statistics.median(times[True])
    each = " ".join(f"{w:.0f}/{r:.0f}" for w, r in zip(times[False], times[True]))
    print(f"| {ctx} | {off:.1f} | {on:.1f} | {off / on:.2f}x | {cached} | {same}/{a.reps} | {each} |", flush=True)
for eng in engines.values():
    eng.shutdown()
