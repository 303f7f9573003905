"""The decode step's last part on its own: the next token (greedy argmax, or the sampler's
exponential race with a temperature and no top-k / top-p), the token copy and the position / step
advance, as `kernels.sampling.next_token_advance` does it in one launch (columns: its
MIN_CHUNK x BLOCK settings; "rule" is the library's pick) against the torch chain the engine runs
otherwise (greedy: cast the logits to fp32, argmax, copy, two adds; sampled: counter_noise,
runtime.sampling.sample, copy, two adds; top_p: the same with top-p 0.9, torch only: the kernel
does not filter). Qwen3 vocabulary (151936), bf16 logits, CUDA graphs, µs
per call. The logits are written by a copy just before (as the lm_head writes them: in L2).

    python scripts/bench_greedy.py [--batch 1,8,64] [--tiles 4096x2048,2048x2048,2048x1024]"""
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
p.add_argument("--tiles", default="4096x2048,2048x2048,2048x1024,8192x2048,4096x4096",
               help="MIN_CHUNKxBLOCK settings of kernels/sampling.py")
a = p.parse_args()

print(f"{torch.cuda.get_device_name()}; µs per call (the logits copy that precedes each is subtracted)")
for mode in ("greedy", "sampled", "top_p"):     # top_p (0.9): the torch sampler only (no kernel yet)
    for B in (int(b) for b in a.batch.split(",")):
        src = torch.randn(B, V, device="cuda").to(torch.bfloat16)
        logits = torch.empty_like(src)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        pos = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        step = torch.zeros(B, dtype=torch.long, device="cuda")
        live = torch.ones(B, dtype=torch.long, device="cuda")
        temp = torch.full((B,), 0.7, device="cuda")
        seed = torch.arange(B, device="cuda") + 11
        off, ones = torch.zeros(B, dtype=torch.long, device="cuda"), torch.ones(B, device="cuda")
        race = (temp, seed, MIN_TEMPERATURE) if mode == "sampled" else None
        top_p = ones * 0.9 if mode == "top_p" else ones

        def torch_chain():
            logits.copy_(src)
            if mode == "greedy":
                nxt = logits.float().argmax(-1)
            else:
                nxt = sample(logits.float(), temp, off, top_p, counter_noise(seed, step, V), mode == "top_p")
            tok.copy_(nxt[:, None])
            pos.add_(live[:, None])
            step.add_(live)

        base = timing.graph_us([lambda: logits.copy_(src)])
        row = [f"{mode:7s} B={B:3d} torch {timing.graph_us([torch_chain]) - base:6.2f}"]
        for t in (["rule"] + a.tiles.split(",")) if mode != "top_p" else []:
            tiles = None if t == "rule" else tuple(int(v) for v in t.split("x"))

            def fused():
                logits.copy_(src)
                sampling.next_token_advance(logits, tok[:, 0], pos[:, 0], step, live, race, tiles)
            step.zero_()
            fused()
            want = (src.float().argmax(-1) if race is None else
                    sample(src.float(), temp, off, ones, counter_noise(seed, step - 1, V), False))
            assert torch.equal(tok[:, 0], want), (mode, B, t)
            row.append(f"{t} {timing.graph_us([fused]) - base:6.2f}")
        print("  ".join(row), flush=True)
