"""Host (Python) time of an eager forward, without a GPU: a small Qwen3-MoE-shaped model on CPU
tensors takes the kernel path with every Triton launch stubbed out (nothing runs on a device), so
what is timed is mixprec's launch code and the torch ops between launches (tiny widths keep their
CPU compute small; SDPA of the prefill attention is the largest part). Compare two trees on the same
machine, in alternating runs: single runs vary by tens of percent.

    python scripts/host_time.py [MIX] [TOKENS,...]      # MIX: a bench preset (int4, mixed, ...)

Prints per token count: µs per layer and stubbed launches per layer. Triton's own launcher
(argument binding, cache lookup) is stubbed too, so it is not in the number."""
import gc
import os
import sys
import time

import torch
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.config import ModelArgs  # noqa: E402
from mixprec.formats import base  # noqa: E402
from mixprec.kernels import moe  # noqa: E402
from mixprec.runtime.synthetic import build_synthetic  # noqa: E402

LAYERS, REPS = 4, 20
launches = [0]


def stub(self, *args, grid=None, warmup=False, **kwargs):
    launches[0] += 1


def main() -> None:
    mix = sys.argv[1] if len(sys.argv) > 1 else "int4"
    tokens = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "1,16").split(",")]
    torch.set_flush_denormal(True)      # stubbed kernels leave garbage that the torch ops then read
    args = ModelArgs.from_hf(dict(vocab_size=1024, hidden_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=128, intermediate_size=512, num_experts=128,
                                  num_experts_per_tok=8, moe_intermediate_size=128, rope_theta=1e6,
                                  max_position_embeddings=4096))
    model = build_synthetic(args, mix, device="cpu", progress=False)
    JITFunction.run = stub
    base._KERNELS["cpu"] = True         # the kernel path for CPU tensors
    moe._triton_ok = lambda t: True
    for T in tokens:
        ids = torch.randint(0, args.vocab_size, (1, T))
        with torch.inference_mode():
            model(ids)
            gc.collect()
            gc.disable()
            launches[0] = 0
            t0 = time.perf_counter()
            for _ in range(REPS):
                model(ids)
            dt = (time.perf_counter() - t0) / REPS
            gc.enable()
        print(f"{mix} tokens={T}: {dt / LAYERS * 1e6:.0f} µs per layer (embedding and head included), "
              f"{launches[0] / REPS / LAYERS:.1f} launches per layer")


if __name__ == "__main__":
    main()
