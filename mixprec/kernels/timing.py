"""GPU timing shared by the benchmarks: the copy-bandwidth ceiling and CUDA-graph replay timing."""
from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth_gbps(nbytes: int = 1 << 30, device="cuda") -> float:
    """GB/s of a device-to-device copy of `nbytes`, counting bytes read + written (median of 10)."""
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    del a, b
    return 2 * nbytes / statistics.median(ts) / 1e9


def graph_us(fns: list, target_ms: float = 8.0) -> float:
    """Median µs per call of `fns` (run in order) captured in one CUDA graph and replayed, so
    launch overhead is what a captured decode step pays. Warm-up (compilation) happens outside
    the capture; each of 5 measurements replays the graph for about `target_ms`."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(3, min(200, int(target_ms * 1e-3 / one)))
    meas = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        meas.append(s.elapsed_time(e) * 1e3 / reps)
    del g
    return statistics.median(meas) / len(fns)
