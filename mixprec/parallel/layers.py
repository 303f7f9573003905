"""The modules that end in a collective. Each subclasses the single-process module it replaces, so
the loader's `set_linear` / `set_tensor` and the model's forward use them unchanged; a world-1
model never contains them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.linear import Linear
from ..layers.moe import MoE
from ..models.qwen3 import Embedding
from .context import ParallelContext, all_gather_last, all_reduce


class RowParallelLinear(Linear):
    """o_proj / dense down_proj over this rank's K slice: y = sum over ranks of x_r @ W_r.T."""

    def __init__(self, n: int, k: int, ctx: ParallelContext):
        super().__init__(n, k)
        self.ctx = ctx

    def forward(self, x: Tensor) -> Tensor:
        return all_reduce(super().forward(x), self.ctx)


class VocabParallelHead(Linear):
    """lm_head rows [r*n, (r+1)*n) of a `vocab`-row head (zero rows past the vocabulary):
    the logits of all ranks are gathered and trimmed to `vocab`."""

    def __init__(self, n: int, k: int, vocab: int, ctx: ParallelContext):
        super().__init__(n, k)
        self.vocab, self.ctx = vocab, ctx

    def forward(self, x: Tensor) -> Tensor:
        return all_gather_last(super().forward(x), self.ctx)[..., : self.vocab]     # [..., V]


class VocabParallelEmbedding(Embedding):
    """Embedding rows [start, stop) (weight [rows, H], zero-padded): ids outside give zero rows,
    and the sum over ranks is the full lookup."""

    def __init__(self, rows: int, hidden: int, start: int, stop: int, ctx: ParallelContext,
                 dtype: torch.dtype, device):
        super().__init__(rows, hidden, dtype, device)
        self.start, self.stop, self.ctx = start, stop, ctx

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.stop - self.start)                      # [B, T]
        h = F.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce(h.masked_fill(~mine[..., None], 0), self.ctx)


class ParallelMoE(MoE):
    """The experts of this rank's expert group, each cut to this rank's slice of the intermediate
    dim (`intermediate` is the per-rank size). Routing runs on every rank over all E experts;
    tokens routed to experts held elsewhere add nothing here, and one all-reduce sums it all."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renorm: bool,
                 dtype: torch.dtype, device, name: str, experts: tuple[int, ...], ctx: ParallelContext):
        super().__init__(hidden, intermediate, num_experts, top_k, renorm, dtype, device, name=name)
        self.local_experts = tuple(experts)
        self.ctx = ctx

    def finish(self, y: Tensor) -> Tensor:
        return all_reduce(y, self.ctx)
