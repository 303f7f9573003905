"""Batched generation: static KV cache, right-padded prefill, decode steps as CUDA graphs.

Slot j of the KV cache holds position j of its sequence, so a right-padded prefill needs no
special mask: a padded tail writes slots that the sequence's own decode steps overwrite before
anything reads them (attention only sees slots <= the query's position).

The decode step (embed -> layers -> logits -> sample) has no host syncs; on CUDA it is captured
once per batch bucket and replayed, and small prefills are graphs too (prefill.py). The host
reads step t's tokens while step t+1 runs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import RequestError
from ..formats.base import use_kernels
from ..kernels.sampling import next_token_advance
from ..layers.attention import KVCache
from .prefill import Prefill, bucket
from .sampling import MIN_TEMPERATURE, SamplingParams, bias_rows, count_tokens, logprob_stats, penalize, sample


def _u64(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Exp(1) noise [B, V] from a counter hash (splitmix64) of (seed[b], step[b], token id).

    The draw of a request depends only on its own seed and step, never on what else is in the
    batch, and needs no generator state inside a CUDA graph."""
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    z = seed[:, None] * _u64(0xD1B54A32D192ED03) + step[:, None] * _u64(0x8CB92BA72F3D8DD7) + idx
    z = z + _u64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    u = (_shr(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))
    return (-torch.log(u)).to(torch.float32)


def sample_tokens(logits: Tensor, params, step: Tensor, sampled: bool, filtered: bool) -> Tensor:
    """Each row's next token [B] by the torch sampler (runtime.sampling.sample, noise
    counter_noise(seed, step)); greedy argmax when no row is `sampled`. `params` has the rows'
    temperature, top_k, top_p and seed tensors [B]."""
    if not sampled:
        return logits.argmax(-1)
    noise = counter_noise(params.seed, step, logits.shape[-1])
    return sample(logits.float(), params.temperature, params.top_k, params.top_p, noise, filtered)


def sampling_modes(params: Sequence[SamplingParams]) -> tuple[bool, bool, bool]:
    """(sampled, filtered, extras) of a batch's rows: some row draws with a temperature; some such
    row also has top-k / top-p (next_token takes these two); some row has a presence / frequency
    penalty, a logit bias or wants log-probabilities. A batch with extras takes the most general
    draw (sampled and filtered: greedy rows and rows without top-k / top-p draw the same tokens
    there), so the extras add one decode graph per bucket, not three."""
    if any(p.extras for p in params):
        return True, True, True
    sampled = any(p.temperature > 0 for p in params)
    filtered = any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params)
    return sampled, filtered, False


def check_vocab(ids: Sequence[int], params: Sequence[SamplingParams], vocab: int) -> None:
    """RequestError (a ValueError) naming prompt token ids or logit_bias ids outside the vocabulary [0, vocab)."""
    for what, bad in (("prompt", [t for t in ids if not 0 <= t < vocab]),
                      ("logit_bias", [t for p in params for t, _ in p.logit_bias if t >= vocab])):
        if bad:
            raise RequestError(f"{what} token ids {bad[:5]} are outside the vocabulary [0, {vocab})", what)


def decode_tail(logits: Tensor, tokens: Tensor, pos: Tensor, step: Tensor, live: Tensor | None, rows,
                modes: tuple[bool, bool, bool]) -> None:
    """next_token with the rows' extras (modes[2]): `rows` then also has presence / frequency [B],
    counts [B, V] (the tokens each row generated so far, which then count the new token), the logit
    bias [B, V], and lp [B, 1 + K] / lp_ids [B, K] that get the new tokens' log-probabilities of the
    raw logits (sampling.logprob_stats; none where lp has no columns)."""
    sampled, filtered, extras = modes
    raw = logits
    if extras:
        logits = penalize(logits, rows.counts, rows.presence, rows.frequency) + rows.bias
    next_token(logits, tokens, pos, step, live, rows, sampled, filtered)
    if extras:
        count_tokens(rows.counts, tokens, live)
        if rows.lp.shape[1]:
            logprob_stats(raw, tokens, rows.lp, rows.lp_ids)


def first_token(logits: Tensor, params, step: Tensor, sampled: bool, filtered: bool) -> Tensor:
    """A prefill's token per row [B]: next_token's draw (the kernels where use_kernels says so, so
    a top-k / top-p request's first token no longer sorts the vocabulary) without its advance (live
    0: step [B] is read for the noise, not changed)."""
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    next_token(logits, tokens, torch.zeros_like(tokens), step, torch.zeros_like(tokens), params, sampled, filtered)
    return tokens


def next_token(logits: Tensor, tokens: Tensor, pos: Tensor, step: Tensor, live: Tensor | None, params,
               sampled: bool, filtered: bool) -> None:
    """A decode step's tail, no host sync: each row's next token into tokens [B] (greedy; with
    `sampled`, rows with a temperature draw; with `filtered`, among the tokens their top-k / top-p
    keep), then pos / step [B] += live (None: 1). `params` has the rows' temperature, top_k, top_p
    and seed tensors [B]. One kernel launch where use_kernels says so, else the torch chain."""
    if use_kernels(logits):
        race = (params.temperature, params.seed, MIN_TEMPERATURE) if sampled else None
        next_token_advance(logits, tokens, pos, step, live, race, (params.top_k, params.top_p) if filtered else None)
        return
    tokens.copy_(sample_tokens(logits, params, step, sampled, filtered))
    inc = 1 if live is None else live
    pos.add_(inc)
    step.add_(inc)


@dataclass
class _Batch:
    """Per-row state of a running batch; every field is a device tensor."""
    tokens: Tensor        # [B, 1] last sampled token (decode input)
    pos: Tensor           # [B, 1] position of that token
    temperature: Tensor   # [B]
    top_k: Tensor         # [B]
    top_p: Tensor         # [B]
    seed: Tensor          # [B]
    step: Tensor          # [B]
    presence: Tensor      # [B] float32
    frequency: Tensor     # [B] float32
    counts: Tensor        # [B, V] int32: tokens generated so far ([B, 0] without extras)
    bias: Tensor          # [B, V] float32: logit bias ([B, 0] without extras)
    lp: Tensor            # [B, 0]: the Generator returns no log-probabilities (decode_tail skips them)
    lp_ids: Tensor        # [B, 0]


def to_host(t: Tensor) -> tuple[Tensor, "torch.cuda.Event | None"]:
    """Start copying `t` to the host: (buffer, event to wait on before reading it). On CUDA the
    copy goes into pinned memory asynchronously, so the host can queue the next step first."""
    if t.device.type != "cuda":
        return t.clone(), None
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return buf, ev


class Generator:
    """Runs `model` (a finalized Qwen3ForCausalLM) for batches of token-id prompts.

    >>> gen = Generator(model)
    >>> for step_tokens in gen.stream([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=8)): ...
    """

    def __init__(self, model, use_cuda_graphs: bool | None = None):
        self.model = model
        self.args = model.args
        p = next(model.buffers())
        self.device, self.dtype = p.device, model.dtype
        self.use_graphs = (self.device.type == "cuda") if use_cuda_graphs is None else use_cuda_graphs
        self._graphs: dict[tuple, tuple] = {}
        self._cache: KVCache | None = None
        self._prefill = Prefill(model, self.use_graphs)

    # -- cache -------------------------------------------------------------------------
    def _get_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        c = self._cache
        if c is None or c.batch < batch or c.max_len < max_len:
            self._graphs.clear()    # graphs captured on the old cache point at freed memory
            self._cache = None
            c = self._cache = KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, max_len,
                                      a.head_dim, self.dtype, self.device)
        return c

    # -- one decode step: forward + sample, no host sync ---------------------------------------
    def _step(self, st: _Batch, cache: KVCache, modes: tuple[bool, bool, bool]) -> Tensor:
        logits = self.model(st.tokens, positions=st.pos, cache=cache, float_logits=False)[:, -1]    # [B, V]
        decode_tail(logits, st.tokens[:, 0], st.pos[:, 0], st.step, None, st, modes)
        return st.tokens[:, 0]

    def _decode_fn(self, st: _Batch, cache: KVCache, modes: tuple[bool, bool, bool]) -> Callable[[], Tensor]:
        if not self.use_graphs:
            return lambda: self._step(st, cache, modes)
        key = (st.tokens.shape[0], modes, id(cache))
        if key not in self._graphs:
            # static copies the graph reads and writes; the caller copies state in/out
            static = _Batch(**{k: v.clone() for k, v in vars(st).items()})
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):          # warm up (Triton compiles) outside the capture
                for _ in range(2):
                    snapshot = {k: v.clone() for k, v in vars(static).items()}
                    self._step(static, cache, modes)
                    for k, v in snapshot.items():
                        getattr(static, k).copy_(v)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self._step(static, cache, modes)
            self._graphs[key] = (g, static, out)
        g, static, out = self._graphs[key]
        for k, v in vars(st).items():
            getattr(static, k).copy_(v)

        def run() -> Tensor:
            g.replay()
            return out
        # the graph advances `static`; the caller keeps using `st`, so alias them
        for k in vars(st):
            setattr(st, k, getattr(static, k))
        return run

    # -- public ----------------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
               ) -> Iterator[list[int | None]]:
        """Yields, per step, one token per prompt (None once that prompt has finished)."""
        B = len(prompts)
        if B == 0:
            return
        plist = [params] * B if isinstance(params, SamplingParams) else list(params)
        if len(plist) != B:
            raise ValueError(f"{len(plist)} sampling parameter sets for {B} prompts")
        plist = [p.plain().validate() for p in plist]     # numpy scalars as the engine takes them
        if any(p.logprobs is not None or p.prompt_logprobs is not None for p in plist):
            raise ValueError("the Generator returns token ids only: log-probabilities come from the Engine "
                             "(mixprec.Engine, Delta.logprobs)")
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError("empty prompt")
        check_vocab([t for p in prompts for t in p], plist, self.args.vocab_size)
        max_new = max(p.max_new_tokens for p in plist)
        if max_new == 0:
            return
        need = max(lens) + max_new          # every row runs until the longest request is done
        if need > self.args.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens = {need} exceeds the model's context "
                             f"{self.args.max_position_embeddings}")
        Bp = bucket(B) if self.use_graphs else B
        cache = self._get_cache(Bp, bucket(max(need, 64)))
        cache.reset()                       # rows start at slot 0 (right padding)
        dev = self.device

        # prefill, right-padded; padding rows (Bp > B) repeat the last prompt
        T = max(lens)
        rows = list(prompts) + [prompts[-1]] * (Bp - B)
        ids = torch.zeros(Bp, T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        ids = ids.to(dev)
        last = torch.tensor([len(r) - 1 for r in rows], device=dev)
        # the rows' sampling state before the prefill is queued: torch.tensor(..., device=cuda)
        # synchronizes with the stream, so after it the host would wait for the whole prefill
        # before queuing the first token's launches
        prow = plist + [plist[-1]] * (Bp - B)
        modes = sampling_modes(plist)
        st = _Batch(
            tokens=torch.zeros(Bp, 1, dtype=torch.long, device=dev),
            pos=(last + 1)[:, None].clone(),
            temperature=torch.tensor([p.temperature for p in prow], dtype=torch.float32, device=dev),
            top_k=torch.tensor([p.top_k for p in prow], dtype=torch.long, device=dev),
            top_p=torch.tensor([p.top_p for p in prow], dtype=torch.float32, device=dev),
            seed=self._seeds(prow, dev),
            step=torch.zeros(Bp, dtype=torch.long, device=dev),
            presence=torch.tensor([p.presence_penalty for p in prow], dtype=torch.float32, device=dev),
            frequency=torch.tensor([p.frequency_penalty for p in prow], dtype=torch.float32, device=dev),
            counts=torch.zeros(Bp, self.args.vocab_size if modes[2] else 0, dtype=torch.int32, device=dev),
            bias=torch.zeros(Bp, self.args.vocab_size if modes[2] else 0, device=dev),
            lp=torch.zeros(Bp, 0, device=dev), lp_ids=torch.zeros(Bp, 0, dtype=torch.long, device=dev),
        )
        logits = self._prefill(ids, last, cache)                                 # [Bp, V] fp32
        if modes[2]:
            bias_rows(st.bias, prow)
            logits = logits + st.bias
        first = first_token(logits, st, st.step, *modes[:2])     # nothing generated yet: no penalty
        st.tokens.copy_(first[:, None])
        st.step.add_(1)
        if modes[2]:
            count_tokens(st.counts, first)

        stops = [set(p.stop_token_ids) for p in plist]
        done = [p.max_new_tokens == 0 for p in plist]     # beside longer requests: no token at all
        produced = [0] * B
        step_fn = self._decode_fn(st, cache, modes) if max_new > 1 else None
        inflight = [to_host(first)]
        for t in range(max_new):
            if t + 1 < max_new:          # queue step t+1 before reading step t's tokens
                inflight.append(to_host(step_fn()))
            buf, ev = inflight.pop(0)
            if ev is not None:
                ev.synchronize()
            toks = buf.tolist()
            out: list[int | None] = []
            for i in range(B):
                if done[i]:
                    out.append(None)
                    continue
                tok = toks[i]
                out.append(tok)
                produced[i] += 1
                if tok in stops[i] or produced[i] >= plist[i].max_new_tokens:
                    done[i] = True
            yield out
            if all(done):
                break

    def _seeds(self, params: list[SamplingParams], dev) -> Tensor:
        """[B] int64: each row's seed, or a fresh draw for rows without one (as the engine does), so
        equal prompts sample apart. A parallel model's ranks must sample alike: rank 0's draws."""
        seeds = torch.tensor([p.seed if p.seed is not None else random.getrandbits(63) for p in params],
                             dtype=torch.long, device=dev)
        ctx = getattr(self.model, "parallel", None)
        if ctx is not None and ctx.collective and any(p.seed is None for p in params):
            import torch.distributed as dist
            dist.broadcast(seeds, src=dist.get_global_rank(ctx.group, 0) if ctx.group is not None else 0,
                           group=ctx.group)
        return seeds

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params):
            for i, tok in enumerate(step):
                if tok is not None:
                    outs[i].append(tok)
        return outs
