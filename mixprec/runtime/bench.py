"""`python -m mixprec bench`: prefill and decode speed of a mix against the bandwidth roofline.

    python -m mixprec bench mix.yaml --batch 1,8,32 --prompt-len 128 --gen-len 256
    python -m mixprec bench --synthetic qwen3-30b-a3b --mix int4 --batch 1,8,32,64

TTFT is the time from the call to the first token of every prompt (prefill + one sample), the
median of nine; prefill tok/s = batch x prompt length / TTFT.

The roofline of a decode step is the weight bytes it must read (attention, dense MLP, lm_head,
and the experts the batch actually routes to: E * (1 - (1 - k/E)^B) per layer on average for
uniform routing) over the device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from ..argtypes import at_least, list_of
from .generate import Generator
from .sampling import SamplingParams

PREFILL_REPS = 8   # extra timed prefills per row (the median of 9 is reported; 5 varied up to 14% between runs)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy, counting read + write."""
    from ..kernels.timing import copy_bandwidth_gbps
    return copy_bandwidth_gbps() * 1e9


def step_bytes(model, batch: int) -> float:
    """Expected weight bytes one decode step reads (uniform routing)."""
    args = model.args
    total = 0.0
    for name, w in model.linear_modules().items():
        if ".mlp.buckets." in name:      # expert stacks: counted below by routing
            continue
        total += w.nbytes()
    if args.num_experts:
        E, k = args.num_experts, args.num_experts_per_tok
        touched = E * (1 - (1 - k / E) ** batch)
        expert_bytes = sum(w.nbytes() for n, w in model.linear_modules().items() if ".mlp.buckets." in n)
        total += expert_bytes * touched / E     # expert bytes are spread over E experts per layer
    total += batch * model.args.hidden_size * 2 * 2   # embedding rows in, negligible
    return total


def bench_model(model, batches, prompt_len, gen_len, bw, warm_steps=8, sampling: SamplingParams = SamplingParams()):
    gen = Generator(model)
    V = model.args.vocab_size
    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, V, (B, prompt_len), generator=g).tolist()
        params = replace(sampling, max_new_tokens=gen_len)   # no stop tokens: fixed length
        # warm-up (compiles kernels, captures the decode graph) on the cache the timed run uses:
        # the cache size follows prompt + max_new_tokens, and a new cache means a new capture
        for i, _ in enumerate(gen.stream(prompts, params)):
            if i + 1 >= warm_steps:
                break
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        it = gen.stream(prompts, params)
        next(it)                               # prefill + first token
        t1 = time.perf_counter()
        n = 1
        for _ in it:
            n += 1
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        step = (t2 - t1) / max(n - 1, 1)
        peak = torch.cuda.max_memory_allocated() / 2**30
        sb = step_bytes(model, B)
        ttft = prefill_seconds(gen, prompts, replace(params, max_new_tokens=1), t1 - t0)
        rows.append(dict(batch=B, ttft_ms=ttft * 1e3, prefill_tok_s=B * prompt_len / ttft,
                         decode_tok_s=B / step, ms_per_step=step * 1e3, weight_GBps=sb / step / 1e9,
                         roofline_pct=100 * (sb / bw) / step, roofline_tok_s=B / (sb / bw), peak_mem_GiB=peak))
    return rows


def prefill_seconds(gen: Generator, prompts, params: SamplingParams, first: float, reps: int = PREFILL_REPS) -> float:
    """Median time of a prefill + first token over `first` (the timed run's) and `reps` more
    (one timed call varied up to 2x between runs), drawn with the timed run's sampling `params`
    (max_new_tokens 1). The cache of the decode run is reused."""
    ts = [first]
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in gen.stream(prompts, params):
            pass
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def print_rows(title, rows):
    print(f"\n{title}")
    print("| batch | TTFT ms | prefill tok/s | decode tok/s | ms/step | weight GB/s | % roofline | roofline tok/s | peak GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['ms_per_step']:.2f} | "
              f"{r['weight_GBps']:.0f} | {r['roofline_pct']:.0f}% | {r['roofline_tok_s']:.0f} | {r['peak_mem_GiB']:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mixprec bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="mix YAML or checkpoint dir (or use --synthetic)")
    p.add_argument("--synthetic", choices=["qwen3-30b-a3b", "qwen3-235b-a22b"])
    p.add_argument("--mix", default="bf16", help="synthetic: preset (bf16, fp8, int4, int4-all, int8, mixed), a mix YAML "
                   "whose sources are format names (as `mixprec plan --profile <synthetic>` writes), or "
                   "'regex=fmt;...' with fmt in bf16, fp8, int4, int4-asym, int8; several: a,b")
    p.add_argument("--layers", type=at_least(1), default=None, help="synthetic: fewer layers (extrapolate)")
    p.add_argument("--batch", type=list_of(1), default=[1, 8, 32, 64], help="batch sizes, e.g. 1,8,32,64")
    p.add_argument("--prompt-len", type=at_least(1), default=128)
    p.add_argument("--gen-len", type=at_least(2), default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling (default greedy); with --top-k / --top-p")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="time the decode step with penalties")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--json", default=None, help="write all rows here")
    a = p.parse_args(argv)
    try:
        sampling = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                  presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty).validate()
    except ValueError as err:
        p.error(str(err))
    if a.synthetic:
        from .synthetic import split_mixes, synthetic_args, synthetic_linears
        args = synthetic_args(a.synthetic, a.layers)
        try:    # every mix is checked before the first one is built and timed
            mixes = split_mixes(a.mix)
            for mix in mixes:
                synthetic_linears(args, mix)
        except (ValueError, OSError) as err:
            p.error(str(err))
    if not torch.cuda.is_available():
        print("bench needs a CUDA GPU")
        return 2
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read+write)  "
          f"sampling: {'greedy' if not a.temperature else f'temperature {a.temperature} top_k {a.top_k} top_p {a.top_p}'}"
          + (f", presence {a.presence_penalty} frequency {a.frequency_penalty}" if sampling.penalized else ""))
    results = {}
    if a.synthetic:
        from .synthetic import build_synthetic
        for mix in mixes:
            torch.cuda.empty_cache()
            t0 = time.perf_counter()
            model = build_synthetic(args, mix, progress=False)
            print(f"built {a.synthetic} ({args.num_hidden_layers} layers) mix={mix} in "
                  f"{time.perf_counter() - t0:.0f}s: {sum(w.nbytes() for w in model.linear_modules().values()) / 2**30:.2f} GiB of linears")
            rows = bench_model(model, a.batch, a.prompt_len, a.gen_len, bw, sampling=sampling)
            print_rows(f"{a.synthetic} layers={args.num_hidden_layers} mix={mix}", rows)
            results[mix] = rows
            del model
    else:
        from ..api import load
        model = load(a.config, device="cuda")
        print(model.stats)
        rows = bench_model(model, a.batch, a.prompt_len, a.gen_len, bw, sampling=sampling)
        print_rows(a.config, rows)
        results[a.config] = rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "results": results}, f, indent=1)
    return 0
