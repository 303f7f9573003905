"""The decode step's last part on its own: the next token (greedy argmax, the sampler's
exponential race with a temperature, or that race among the tokens top-k / top-p keep), the token
copy and the position / step advance, as `kernels.sampling.next_token_advance` does it in one
launch (columns: its MIN_CHUNK x BLOCK settings; "rule" is the library's pick) against the torch
chain the engine runs otherwise (greedy: cast the logits to fp32, argmax, copy, two adds; sampled
and filtered: counter_noise, runtime.sampling.sample, copy, two adds). Qwen3 vocabulary (151936),
bf16 logits, CUDA graphs, µs per call. The logits are written by a copy just before (as the
lm_head writes them: in L2). Modes: greedy; sampled (temperature 0.7); top_p (0.9) and top_kp
(top-k 20, top-p 0.8: Qwen3's recommended settings) on peaked logits (50 tokens 6-16 nats above a
N(0, 1) background: a few dozen candidates); top_p_wide (0.9 on N(0, 9) logits: ~1000
candidates, binned and narrowed by the last program); top_p_flat (0.9 on N(0, 1) logits: tens of
thousands kept, the refining launch, then ~1400 candidates binned).

    python scripts/bench_greedy.py [--batch 1,8,64] [--modes greedy,top_p] [--tiles 4096x2048,2048x1024]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import sampling, timing    # noqa: E402
from mixprec.runtime.generate import counter_noise    # noqa: E402
from mixprec.runtime.sampling import MIN_TEMPERATURE, sample    # noqa: E402

V = 151936
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batch", default="1,8,64")
p.add_argument("--modes", default="greedy,sampled,top_p,top_kp,top_p_wide,top_p_flat")
p.add_argument("--tiles", default="4096x2048,2048x2048,2048x1024,8192x2048,4096x4096",
               help="MIN_CHUNKxBLOCK settings of kernels/sampling.py")
a = p.parse_args()

print(f"{torch.cuda.get_device_name()}; µs per call (the logits copy that precedes each is subtracted)")
for mode in a.modes.split(","):
    for B in (int(b) for b in a.batch.split(",")):
        src = torch.randn(B, V, device="cuda") * (3 if mode == "top_p_wide" else 1)
        if mode in ("top_p", "top_kp"):           # peaked: 50 tokens well above the background
            src[:, torch.randperm(V, device="cuda")[:50]] = torch.linspace(16, 6, 50, device="cuda")
        src = src.to(torch.bfloat16)
        logits = torch.empty_like(src)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        pos = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        step = torch.zeros(B, dtype=torch.long, device="cuda")
        live = torch.ones(B, dtype=torch.long, device="cuda")
        temp = torch.full((B,), 0.7, device="cuda")
        seed = torch.arange(B, device="cuda") + 11
        off, ones = torch.zeros(B, dtype=torch.long, device="cuda"), torch.ones(B, device="cuda")
        top_k = off + 20 if mode == "top_kp" else off
        top_p = ones * {"top_p": 0.9, "top_kp": 0.8, "top_p_wide": 0.9, "top_p_flat": 0.9}.get(mode, 1.0)
        filtered = mode.startswith("top")
        filters = (top_k, top_p) if filtered else None
        race = (temp, seed, MIN_TEMPERATURE) if mode != "greedy" else None

        def torch_chain():
            logits.copy_(src)
            if mode == "greedy":
                nxt = logits.float().argmax(-1)
            else:
                nxt = sample(logits.float(), temp, top_k, top_p, counter_noise(seed, step, V), filtered)
            tok.copy_(nxt[:, None])
            pos.add_(live[:, None])
            step.add_(live)

        base = timing.graph_us([lambda: logits.copy_(src)])
        row = [f"{mode:7s} B={B:3d} torch {timing.graph_us([torch_chain]) - base:6.2f}"]
        for t in ["rule"] + a.tiles.split(","):
            tiles = None if t == "rule" else tuple(int(v) for v in t.split("x"))

            def fused():
                logits.copy_(src)
                sampling.next_token_advance(logits, tok[:, 0], pos[:, 0], step, live, race, filters, tiles)
            step.zero_()
            fused()
            want = (src.float().argmax(-1) if race is None else
                    sample(src.float(), temp, top_k, top_p, counter_noise(seed, step - 1, V), filtered))
            assert torch.equal(tok[:, 0], want), (mode, B, t)
            row.append(f"{t} {timing.graph_us([fused]) - base:6.2f}")
        print("  ".join(row), flush=True)
