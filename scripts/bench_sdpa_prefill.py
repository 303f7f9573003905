"""Prefill attention on the 30B / 235B heads (32 / 64 query heads, 4 kv heads, D 128, bf16), T = S
tokens: SDPA with the explicit bool mask [1, 1, T, S] (what the cached prefill passed before session
42) against is_causal (no mask); ms per layer, the first kernels each launches, max difference.
GPU only (default backend choice: cuDNN on an H200).

    python scripts/bench_sdpa_prefill.py"""
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
dev = "cuda"
for HQ in (32, 64):
    for T in (2048, 8192, 16384):
        q = torch.randn(1, HQ, T, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 4, T, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        i = torch.arange(T, device=dev)
        mask = (i[None, :] <= i[:, None])[None, None]
        def masked():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        def causal():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        a, b = masked(), causal()
        err = (a.float() - b.float()).abs().max().item()
        res = {}
        for name, f in (("mask", masked), ("causal", causal)):
            for _ in range(3):
                f()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
            e0.record()
            for _ in range(10):
                f()
            e1.record(); torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                f(); torch.cuda.synchronize()
            kern = [ev.name[:70] for ev in p.events() if ev.device_type.name == "CUDA"][:2]
            res[name] = (e0.elapsed_time(e1) / 10, kern)
        print(f"HQ={HQ} T={T}: mask {res['mask'][0]:.2f} ms {res['mask'][1]} | causal {res['causal'][0]:.2f} ms "
              f"{res['causal'][1]} | x{res['mask'][0] / res['causal'][0]:.2f} maxdiff {err:.2e}", flush=True)
