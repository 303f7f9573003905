"""Token sampling on the device, without host syncs (CUDA-graph capturable).

Sampling uses the exponential-race form of the Gumbel-max trick: argmax(p / E) with E ~ Exp(1)
draws from p exactly, needs no cumulative sums over the whole vocabulary and no torch.multinomial.
Per-row parameters are tensors, so one captured graph serves any mix of requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()        # stop strings (checked on the host, on decoded text)

    def validate(self) -> "SamplingParams":
        if self.temperature < 0 or self.top_k < 0 or not (0 < self.top_p <= 1) or self.max_new_tokens < 0:
            raise ValueError(f"invalid sampling parameters: {self}")
        return self


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, noise: Tensor,
           filtered: bool = True) -> Tensor:
    """logits [B, V] float32; temperature/top_p [B] float32; top_k [B] int64 (0 = off);
    noise [B, V] iid Exp(1) draws (the caller draws them with its generator). -> token ids [B] int64.
    Rows with temperature 0 are greedy. `filtered=False` skips the vocabulary sort when the host
    knows no row uses top-k / top-p (a static choice, so no sync)."""
    greedy = logits.argmax(-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / t[:, None], dim=-1)
    if not filtered:
        drawn = (probs / noise).argmax(-1)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, probs.shape[-1]))
        # keep a token while the mass before it is < top_p (so the first token always stays)
        keep = (rank < k[:, None]) & ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])
        # noise is iid, so it may be applied in sorted order directly
        drawn = order.gather(-1, (sorted_p * keep / noise).argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)
