"""What a long prompt's prefill costs the requests already decoding, with and without chunked
prefill (Engine prefill_tokens): a synthetic model (random weights, real shapes); STREAMS requests
(128-token prompts) decode; once each has produced 64 tokens a CONTEXT-token prompt arrives. Per
engine: that prompt's time to first token and the running streams' inter-token gaps (median of
the whole run, and the largest gap each stream saw: the stall), timed on consumer threads as the
tokens arrive. The engines (prefill_tokens = each --chunks value; a value >= CONTEXT is a whole
prefill) run in one process, alternated over --reps. GPU or CPU.

    python scripts/bench_chunked.py [--model qwen3-30b-a3b] [--mix int4] [--context 16000] [--streams 8] [--chunks 2048,4096,65536]"""
import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine_model import add_model_args, build
from mixprec.runtime.engine import Engine
from mixprec.runtime.sampling import SamplingParams

ap = argparse.ArgumentParser()
add_model_args(ap)
ap.add_argument("--context", type=int, default=16000)
ap.add_argument("--streams", type=int, default=8)
ap.add_argument("--gen", type=int, default=1200, help="tokens each stream generates (must outlast the long prefill)")
ap.add_argument("--chunks", default="2048,4096,65536")
ap.add_argument("--reps", type=int, default=3)
a = ap.parse_args()
chunks = [int(c) for c in a.chunks.split(",")]
model = build(a, f"; {a.streams} streams, a {a.context}-token prompt")
V = model.args.vocab_size


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(eng: Engine, rep: int) -> tuple[float, float, list[float]]:
    """-> (long prompt's TTFT ms, median inter-token gap ms, each stream's largest gap ms)."""
    arrivals = [[] for _ in range(a.streams)]
    started = threading.Barrier(a.streams + 1)

    def consume(i: int, req) -> None:
        waiting = True
        for d in req.deltas(600):
            arrivals[i].extend([time.perf_counter()] * len(d.token_ids))
            if waiting and len(arrivals[i]) >= 64:
                waiting = False
                started.wait()

    reqs = [eng.submit(ids(128, 100 * rep + i), SamplingParams(max_new_tokens=a.gen)) for i in range(a.streams)]
    threads = [threading.Thread(target=consume, args=(i, r)) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    started.wait()
    long = eng.submit(ids(a.context, 7 + rep), SamplingParams(max_new_tokens=1)).result(600)
    for t in threads:
        t.join()
    if any(r.finished_at < long.first_token_at for r in reqs):
        raise SystemExit(f"a stream finished before the long prompt's first token: raise --gen (now {a.gen})")
    gaps = [[(b - x) * 1e3 for x, b in zip(t, t[1:])] for t in arrivals]
    return ((long.first_token_at - long.submitted_at) * 1e3, statistics.median(g for s in gaps for g in s),
            [max(s) for s in gaps])


engines = {c: Engine(model, max_batch=a.streams + 1, max_len=a.context + 16, prefill_tokens=c, prefix_reuse=False)
           for c in chunks}
for eng in engines.values():        # compile / capture outside the timings (the same prompt lengths)
    run(eng, -1)
print("| prefill_tokens | long prompt TTFT ms | streams' median gap ms | largest gap ms (median over streams) | each rep: TTFT / largest |")
print("|---:|---:|---:|---:|---|")
res = {c: [] for c in chunks}
for rep in range(a.reps):
    for c, eng in engines.items():
        res[c].append(run(eng, rep))
for c in chunks:
    ttft, med, worst = (statistics.median(x) for x in zip(*[(t, m, statistics.median(w)) for t, m, w in res[c]]))
    each = " ".join(f"{t:.0f}/{max(w):.0f}" for t, _, w in res[c])
    print(f"| {c}{' (whole)' if c >= a.context else ''} | {ttft:.1f} | {med:.2f} | {worst:.1f} | {each} |", flush=True)
for eng in engines.values():
    eng.shutdown()
