"""What `serve --warmup` buys: time to first token of a burst of requests on a fresh engine,
without and with capturing every CUDA graph first, and what the warm-up costs.

A burst of requests of mixed prompt lengths arrives at a fresh Engine (synthetic full-size model,
real packed formats). Without warm-up, each new decode (batch bucket, length bucket, sampling
mode) and prefill (rows, length) bucket is captured when first needed, while every running
request waits; with Engine(warmup=True) they were all captured before the first request.

    python scripts/bench_warmup.py --synthetic qwen3-30b-a3b --mix int4 [--layers 48]
           [--max-batch 16] [--max-len 1024] [--requests 24]       (GPU)

Prints per engine: warm-up seconds and graphs, then the burst's time to first token (median /
max over the requests) and its total time, and the Triton kernels first specialized in this process
during the burst (after a warm-up: what it missed; each is a compile, or a disk-cache load). The
Triton cache is whatever the machine has: run once before to take compilation out of both (the
first engine of a process also pays it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.runtime.engine import Engine  # noqa: E402
from mixprec.runtime.sampling import SamplingParams  # noqa: E402
from mixprec.runtime.synthetic import build_synthetic, synthetic_args  # noqa: E402


SPECIALIZED: list[str] = []   # Triton kernels specialized (first launch of a signature) in this process


def _track_specializations() -> None:
    try:
        import triton
        triton.knobs.runtime.jit_cache_hook = lambda *, repr, **kw: SPECIALIZED.append(repr) and False
    except AttributeError:      # a Triton without knobs: no tracking
        pass


def burst(engine: Engine, n: int, seed: int) -> tuple[list[float], float]:
    """n requests submitted in waves of 4, 5 ms apart; -> (time to first token of each, total s)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 300, (n,), generator=g).tolist()
    firsts = [0.0] * n
    t0 = time.perf_counter()

    def consume(i, req, t_sub):
        for _ in req:
            firsts[i] = time.perf_counter() - t_sub
            break
        req.result()

    threads = []
    for i, L in enumerate(lens):
        params = SamplingParams(max_new_tokens=32 + 8 * (i % 4), temperature=0.0 if i % 3 else 0.8, seed=i)
        t_sub = time.perf_counter()
        req = engine.submit(torch.randint(0, min(1000, engine.vocab), (L,), generator=g).tolist(), params)
        th = threading.Thread(target=consume, args=(i, req, t_sub))
        th.start()
        threads.append(th)
        if i % 4 == 3:
            time.sleep(0.005)
    for th in threads:
        th.join()
    return firsts, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", default="qwen3-30b-a3b", choices=["qwen3-30b-a3b", "qwen3-235b-a22b"])
    ap.add_argument("--mix", default="int4")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=24)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    model = build_synthetic(synthetic_args(a.synthetic, a.layers), a.mix, progress=False)
    print(f"{torch.cuda.get_device_name()}  {a.synthetic} layers={model.args.num_hidden_layers} mix={a.mix} "
          f"max_batch={a.max_batch} max_len={a.max_len} requests={a.requests}")
    _track_specializations()
    for warm in (False, True, False, True):   # alternated; the first engine also meets cold Triton caches
        t0 = time.perf_counter()
        with Engine(model, max_batch=a.max_batch, max_len=a.max_len, warmup=warm) as eng:
            eng.ready.wait()
            ready_s = time.perf_counter() - t0
            graphs = eng.metrics()["cuda_graphs"]
            seen = len(SPECIALIZED)
            firsts, total = burst(eng, a.requests, seed=1)
            after = eng.metrics()["cuda_graphs"]
            new = SPECIALIZED[seen:]
        print(f"warmup={warm!s:5}  ready after {ready_s:6.1f} s ({graphs} graphs)  burst: TTFT median "
              f"{1e3 * statistics.median(firsts):7.1f} ms, max {1e3 * max(firsts):7.1f} ms, total {total:6.2f} s, "
              f"graphs captured during it {after - graphs}, Triton specializations during it {len(new)}", flush=True)
        for r in new:
            print("    " + " ".join(r.split())[:400])   # the signature spans lines
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
