"""One rank's shard of a synthetic full-size model (runtime/synthetic.py), for benchmarking tensor
and expert parallelism without checkpoints:

    torchrun --nproc-per-node 2 scripts/bench_parallel.py --tp 2 ...
    model = build_synthetic_shard(synthetic_args("qwen3-30b-a3b"), "mixed", tp=2, ep=1)

Every weight is seeded by its name, so each rank builds exactly the weights of the single-GPU
`build_synthetic` model, generates only the modules it holds, and cuts them with the same
`shard_weight` a checkpoint load uses: a TP/EP run can be checked token for token against the
single-GPU run.
"""
from __future__ import annotations

import torch

from ..config import ModelArgs
from ..formats.base import Packed
from ..runtime.synthetic import synthetic_linear, synthetic_linears, synthetic_plain
from .context import init
from .load import build_model
from .shard import make_layout, pad_rows, shard_weight


@torch.inference_mode()
def build_synthetic_shard(args: ModelArgs, mix: str, tp: int, ep: int, dtype=torch.bfloat16, seed: int = 0,
                          backend: str | None = None):
    """This process's shard (torchrun / env:// launch with tp*ep processes) of
    build_synthetic(args, mix, seed=seed), on cuda:LOCAL_RANK (cpu without CUDA)."""
    lay = make_layout(args, tp, ep)           # architectural checks before any process group
    ctx = init(tp, ep, None, backend)
    lay = make_layout(args, tp, ep, ctx.rank)
    dev = ctx.device
    model = build_model(lay, ctx, dtype)
    start, stop = lay.vocab_range
    for name, t in synthetic_plain(args, dev, dtype, seed):
        model.set_tensor(name, pad_rows(t[start:stop], lay.vocab_rows) if name == "model.embed_tokens.weight" else t)
    for module, (n, k, spec) in synthetic_linears(args, mix).items():
        if not lay.holds(module):
            continue
        w = synthetic_linear(module, n, k, spec, dev, dtype, seed)
        if module == "lm_head":      # vocab parallel: padded rows, like the embedding
            w = Packed("dense", lay.vocab_rows, k, {"weight": pad_rows(w.weight[start:stop], lay.vocab_rows)},
                       source=w.source)
        else:
            w = shard_weight(w, lay.split(module))
        model.set_linear(module, w)
    model.finalize()
    return model.eval()
