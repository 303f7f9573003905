"""How much a batch-1 linear gains when its weights are already in L2 (hot) instead of HBM (cold),
and a first try at prefetching them (cp.async.bulk.prefetch.L2 from a small kernel) before the
kernel ahead of it.

    PYTHONPATH=. python scripts/diag_l2_hot.py        (GPU, about a minute)

Session 21 (H100, benchmarks/linear_raw/session21_l2_prefetch_h100.log): hot weights make the
GEMV only 10-22% faster (fp8 30B qkv 7.14 -> 5.90 us), so the batch-1 linears are bound by their
own latency and instruction issue more than by HBM; and this prefetch kernel itself took ~34 us
(one bulk prefetch per thread, chunks of 4-64 KB), so its pair timings say nothing for a
prefetch issued from inside an existing kernel.
"""
import torch
import triton
import triton.language as tl

from mixprec.kernels import bench, timing

@triton.jit
def _pf_kernel(base, nbytes, dummy, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = tl.minimum(offs.to(tl.int64) * CHUNK, nbytes - CHUNK)   # clamp: a repeat is harmless
    p = base + start
    r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
                                  "=r,l,r", [p, tl.full([BLOCK], CHUNK, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(dummy + offs, r, mask=offs < 0)

def prefetch(t, dummy, chunk=16384, block=256):
    nb = t.numel() * t.element_size()
    n = -(-nb // chunk)
    _pf_kernel[(-(-n // block),)](t.view(torch.uint8), nb, dummy, CHUNK=chunk, BLOCK=block, num_warps=max(1, block // 128))

dev = "cuda"
print(torch.cuda.get_device_name(), "copy", round(timing.copy_bandwidth_gbps()), "GB/s", flush=True)
dummy = torch.zeros(1, dtype=torch.int32, device=dev)
for variant in ["fp8 blk w8a8", "int4 g128 asym"]:
    shapes = {"30B qkv": (5120, 2048), "30B o": (2048, 4096), "235B o": (4096, 8192), "235B gu": (3072, 4096)}
    W = {}
    for name, (N, K) in shapes.items():
        ts, call, ref = bench.make_variant(variant, N, K, dev)
        kind = "gemv"
        W[name] = (bench.rotate(ts), call, N, K)
    x = {K: torch.randn(1, K, device=dev, dtype=torch.bfloat16) for K in (2048, 4096, 8192)}
    def fn(name, i, hot=False):
        copies, call, N, K = W[name]
        c = None
        t = copies[0 if hot else i % len(copies)]
        return lambda: call(x[K], t, c)
    def pf(name, i, **kw):
        copies, call, N, K = W[name]
        t = copies[i % len(copies)]
        return lambda: prefetch(t[0], dummy, **kw)
    for name in shapes:
        n = len(W[name][0])
        cold = timing.graph_us([fn(name, i) for i in range(n)])
        hot = timing.graph_us([fn(name, 0, hot=True) for i in range(n)])
        # prefetch then immediately use
        pfu = timing.graph_us(sum([[pf(name, i), fn(name, i)] for i in range(n)], [])) * 2
        print(f"{variant:16s} {name:8s} cold {cold:6.2f} us  hot(L2) {hot:6.2f} us  pf+use {pfu:6.2f}", flush=True)
    for a, b in [("30B qkv", "30B o"), ("235B gu", "235B o"), ("30B o", "30B qkv")]:
        n = max(len(W[a][0]), len(W[b][0]))
        base = timing.graph_us(sum([[fn(a, i), fn(b, i)] for i in range(n)], [])) * 2
        for chunk in (4096, 16384, 65536):
            withpf = timing.graph_us(sum([[pf(b, i, chunk=chunk), fn(a, i), fn(b, i)] for i in range(n)], [])) * 3
            print(f"{variant:16s} pair {a}->{b}: plain {base:6.2f} us, prefetch {b} before {a} (chunk {chunk}) {withpf:6.2f} us", flush=True)
        # only the prefetch kernel cost
        onlypf = timing.graph_us([pf(b, i) for i in range(n)])
        print(f"   prefetch kernel alone {onlypf:5.2f} us", flush=True)
