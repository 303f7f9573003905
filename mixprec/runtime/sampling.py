"""Token sampling on the device, without host syncs (CUDA-graph capturable).

Sampling uses the exponential-race form of the Gumbel-max trick: argmax(p / E) with E ~ Exp(1)
draws from p exactly, needs no cumulative sums over the whole vocabulary and no torch.multinomial.
Per-row parameters are tensors, so one captured graph serves any mix of requests.

Log-probabilities (`logprobs`) are the model's own (log_softmax of its logits, before penalties,
temperature and top-k / top-p, as vLLM reports them by default): the chosen token's and the top
`logprobs` tokens'.

A logit bias (OpenAI's `logit_bias`) is added to the logits before sampling, penalties and
filters, the first token's too.

Presence / frequency penalties are OpenAI's: before sampling (greedy too), each token the request
has generated so far (its prompt not counted, as in OpenAI's API and vLLM) has its logit lowered
by frequency_penalty * count + presence_penalty. Qwen3's quantized checkpoints recommend a
presence penalty (up to 1.5) against endless repetition.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
from torch import Tensor


MIN_TEMPERATURE = 1e-5     # smaller positive temperatures sample as this one (greedy in effect)
MAX_PENALTY = 2.0          # |presence_penalty|, |frequency_penalty| <= this (OpenAI's range)
MAX_LOGPROBS = 20          # top log-probabilities per token (OpenAI's chat API's bound)
MAX_BIAS = 100.0           # |logit_bias| values <= this (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()        # stop strings (checked on the host, on decoded text)
    presence_penalty: float = 0.0     # subtracted once from each generated token's logit
    frequency_penalty: float = 0.0    # subtracted per occurrence of a generated token
    logprobs: int | None = None       # each token's log-probability and this many top ones (None: off)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (Engine only; one more forward)
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit) pairs

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def extras(self) -> bool:
        """Penalties, a logit bias or log-probabilities: the decode step's extra work
        (runtime.generate.decode_tail)."""
        return self.penalized or bool(self.logit_bias) or self.logprobs is not None

    def plain(self) -> "SamplingParams":
        """A copy with plain Python numbers (numpy / torch scalars converted; ValueError for values
        that are no numbers), what a JSON message or a device tensor can take."""
        def real(v) -> float:                 # float() would also take the string "0.5"
            if isinstance(v, (str, bytes, bool)):
                raise TypeError(f"{v!r} is not a number")
            return float(v)                   # numpy / torch scalars too
        try:
            return replace(self, temperature=real(self.temperature), top_p=real(self.top_p),
                           presence_penalty=real(self.presence_penalty),
                           frequency_penalty=real(self.frequency_penalty),
                           top_k=operator.index(self.top_k), max_new_tokens=operator.index(self.max_new_tokens),
                           seed=None if self.seed is None else operator.index(self.seed),
                           logprobs=None if self.logprobs is None else operator.index(self.logprobs),
                           prompt_logprobs=None if self.prompt_logprobs is None else operator.index(self.prompt_logprobs),
                           stop_token_ids=tuple(operator.index(t) for t in self.stop_token_ids),   # sets too
                           stop=tuple(self.stop) if isinstance(self.stop, (tuple, list)) else self.stop,
                           logit_bias=tuple((operator.index(t), real(b)) for t, b in
                                            (self.logit_bias.items() if isinstance(self.logit_bias, dict)
                                             else self.logit_bias)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid sampling parameters: {self} ({e})") from None

    def validate(self) -> "SamplingParams":
        """ValueError naming every bad field. top_k and seed become int64 device tensors: a larger
        value would fail inside the engine, not here."""
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)
        checks = [("temperature", lambda t: math.isfinite(t) and t >= 0, "finite, >= 0"),
                  ("top_k", lambda k: is_int(k) and 0 <= k < 2**63, "an int in [0, 2**63)"),
                  ("top_p", lambda p: 0 < p <= 1, "in (0, 1]"),
                  ("presence_penalty", lambda v: -MAX_PENALTY <= v <= MAX_PENALTY, f"in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
                  ("frequency_penalty", lambda v: -MAX_PENALTY <= v <= MAX_PENALTY, f"in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
                  ("max_new_tokens", lambda n: is_int(n) and n >= 0, "an int >= 0"),
                  ("seed", lambda s: s is None or is_int(s) and -2**63 <= s < 2**63, "None or a 64-bit int"),
                  ("logprobs", lambda n: n is None or is_int(n) and 0 <= n <= MAX_LOGPROBS,
                   f"None or an int in [0, {MAX_LOGPROBS}]"),
                  ("prompt_logprobs", lambda n: n is None or is_int(n) and 0 <= n <= MAX_LOGPROBS,
                   f"None or an int in [0, {MAX_LOGPROBS}]"),
                  ("stop", lambda st: isinstance(st, (tuple, list)) and all(isinstance(x, str) and x for x in st),
                   "a tuple of non-empty strings"),
                  ("stop_token_ids", lambda st: isinstance(st, (tuple, list)) and all(map(is_int, st)),
                   "a tuple of token ids"),
                  ("logit_bias", lambda lb: all(is_int(t) and t >= 0 and -MAX_BIAS <= b <= MAX_BIAS for t, b in lb),
                   f"(token id, bias in [-{MAX_BIAS:g}, {MAX_BIAS:g}]) pairs")]

        def ok(check, v) -> bool:
            try:
                return bool(check(v))
            except TypeError:                  # a string where a number belongs
                return False
        bad = [f"{name}={getattr(self, name)!r} (expected {want})" for name, check, want in checks
               if not ok(check, getattr(self, name))]
        if bad:
            raise ValueError(f"invalid sampling parameters: {', '.join(bad)}")
        return self


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, noise: Tensor,
           filtered: bool = True) -> Tensor:
    """logits [B, V] float32; temperature/top_p [B] float32; top_k [B] int64 (0 = off);
    noise [B, V] iid Exp(1) draws (the caller draws them with its generator). -> token ids [B] int64.
    Rows with temperature 0 are greedy. `filtered=False` skips the vocabulary sort when the host
    knows no row uses top-k / top-p (a static choice, so no sync)."""
    greedy = logits.argmax(-1)
    # a tiny positive temperature is greedy in effect, but logits / t would overflow to inf (NaN probs)
    t = torch.where(temperature > 0, temperature.clamp_min(MIN_TEMPERATURE), torch.ones_like(temperature))
    scaled = logits / t[:, None]
    probs = torch.softmax(scaled, dim=-1)
    if not filtered:
        drawn = (probs / noise).argmax(-1)
    else:
        # the order: scaled logits descending, ties by token id (what kernels/sampling.py keeps)
        order = scaled.sort(dim=-1, descending=True, stable=True).indices
        sorted_p = probs.gather(-1, order)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, probs.shape[-1]))
        # keep a token while the mass before it is < top_p (so the first token always stays)
        keep = (rank < k[:, None]) & ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])
        # each token keeps its own noise draw, so a row without top-k / top-p draws the same token
        # here as on the unfiltered path: its tokens do not depend on its batch neighbours' params
        pick = (sorted_p * keep / noise.gather(-1, order)).argmax(-1, keepdim=True)
        drawn = order.gather(-1, pick).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)


def penalize(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """logits [B, V] minus each row's penalties on the tokens it has generated: counts [B, V]
    int32 (occurrences so far), presence / frequency [B] float32 -> [B, V] float32. No host sync."""
    c = counts.to(torch.float32)
    return logits.float() - c * frequency[:, None] - (counts > 0).to(torch.float32) * presence[:, None]


def count_tokens(counts: Tensor, tokens: Tensor, live: Tensor | None = None) -> None:
    """counts[b, tokens[b]] += live[b] (None: 1), in place: the token each row just generated (idle
    rows, live 0, count nothing). counts [B, V] int32, tokens [B] int64. No host sync."""
    inc = torch.ones_like(tokens, dtype=counts.dtype) if live is None else live.to(counts.dtype)
    counts.scatter_add_(1, tokens[:, None], inc[:, None])


def logprob_stats(logits: Tensor, tokens: Tensor, lp: Tensor, lp_ids: Tensor) -> None:
    """Into lp [B, 1 + K] float32 / lp_ids [B, K] int64 (in place): each row's log-probability of
    tokens[b] and its K most likely tokens' (log_softmax of logits [B, V]). No host sync."""
    x = logits.float()
    lse = torch.logsumexp(x, -1, keepdim=True)
    lp[:, :1] = x.gather(1, tokens[:, None]) - lse
    top = x.topk(lp_ids.shape[1], dim=-1)
    lp[:, 1:] = top.values - lse
    lp_ids.copy_(top.indices)


def bias_rows(bias: Tensor, params: list) -> None:
    """bias [n, V] (in place): row i = params[i].logit_bias as a dense row (zeros elsewhere)."""
    bias.zero_()
    pairs = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if pairs:
        rows, toks, vals = zip(*pairs)
        idx = torch.tensor(rows, dtype=torch.long), torch.tensor(toks, dtype=torch.long)
        bias.index_put_(tuple(x.to(bias.device) for x in idx), torch.tensor(vals, dtype=bias.dtype).to(bias.device))
