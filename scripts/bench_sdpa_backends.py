"""Prefill attention per SDPA backend on the 30B heads (32 query, 4 kv heads, D 128, bf16): the
first call at a new shape (cuDNN builds a plan per shape) and the steady ms. fresh: is_causal, T = S
(a prefill from slot 0); reuse: T queries at the end of S slots (a prompt's rest after a reused
prefix), causal_lower_right or the bool mask. Why layers/attention.py's tail_attention avoids cuDNN
(BENCHMARKS.md session 42). GPU only.

    python scripts/bench_sdpa_backends.py"""
import time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.bias import causal_lower_right
dev = "cuda"
B = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION], "eff": [SDPBackend.EFFICIENT_ATTENTION],
     "math": [SDPBackend.MATH], "noncudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}
def timed(f):
    torch.cuda.synchronize(); t0 = time.perf_counter(); f(); torch.cuda.synchronize(); return (time.perf_counter() - t0) * 1e3
def case(label, T, S, kind, backend):
    q = torch.randn(1, 32, T, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 4, S, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    if kind == "fresh":
        kw = dict(is_causal=True)
    elif kind == "mask":
        j = torch.arange(S, device=dev); p = torch.arange(S - T, S, device=dev)
        kw = dict(attn_mask=(j[None, :] <= p[:, None])[None, None])
    else:
        kw = dict(attn_mask=causal_lower_right(T, S))
    def f():
        with sdpa_kernel(B[backend]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    try:
        first = timed(f); steady = min(timed(f) for _ in range(3))
        print(f"{label} {kind} {backend} T={T} S={S}: first {first:.1f} ms, steady {steady:.2f} ms", flush=True)
    except Exception as e:
        print(f"{label} {kind} {backend} T={T} S={S}: {type(e).__name__} {str(e)[:80]}", flush=True)
for backend in ("cudnn", "flash", "noncudnn"):
    for T in (3001, 8003, 16007):
        case("fresh", T, T, "fresh", backend)
for backend in ("cudnn", "flash", "math", "noncudnn"):
    for T, S in ((80, 16085), (81, 16091), (1000, 9000)):
        case("reuse", T, S, "lower_right" if backend != "math" else "mask", backend)
        if backend == "cudnn":
            case("reuse", T, S + 3, "mask", backend)
