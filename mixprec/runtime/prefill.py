"""Prefill forwards, replayed as CUDA graphs up to a few thousand tokens.

An eager forward launches about ten kernels per layer from Python, and below a few thousand
prompt tokens the GPU waits on those launches: on an H100 a 30B int4 prefill of 128 tokens took
62 ms and one of 8 x 128 tokens 63 ms (BENCHMARKS.md, session 18 table). So small prefills run
as graphs, one per (rows, length) bucket: the prompts, right-padded to the bucket, go through the
model into a staging KV cache of the bucket's shape, and their K/V are then copied into the
caller's cache rows. The staging cache makes the graph independent of which rows are filled
(an engine admits requests into any free slot); its copy reads a few MB.

Padding changes nothing a real token sees: attention is causal, and the padded tail's cache
slots are rewritten by the sequence's own decode steps before any query reads them. Only the
tile shapes the kernels pick for the padded token count may round differently, as they do for
any other batch composition.

The rest of a prompt after a prefix its cache row holds already (a reused prefix, a chunk after
earlier chunks: `tail`) is a graph per length bucket too, one that serves any row and any prefix
length: it runs through the caller's cache mapped to a row given on the device
(`KVCache.mapped`), whose attention kernel reads each query's slots 0 .. position of that row,
so the prefix is never copied. An eager forward of the 30B costs ~60 ms of host time whatever
its length (BENCHMARKS.md, session 42); the graph runs in the GPU time of the tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.ints import next_power_of_2
from ..layers.attention import KVCache

GRAPH_TOKENS = 2048    # rows x length bucket up to which a prefill is a graph (the staging cache's size)
MIN_LENGTH = 16        # smallest length bucket (also keeps a one-token prompt off the decode kernel)


def bucket(n: int, least: int = 1) -> int:
    """The power of two >= max(n, least) (least: a power of two)."""
    return max(least, next_power_of_2(n))


def buckets(top: int, first: int = 1) -> list[int]:
    """first, 2 first, 4 first, ... below top, then top: the shapes that bucketing up to top gives."""
    out, b = [], first
    while b < top:
        out.append(b)
        b *= 2
    return out + [top]


def eager_shapes(max_rows: int, max_len: int, prefill_tokens: int, graph_tokens: int) -> list[tuple[int, int]]:
    """(rows, length) of admissible prefills (rows x length <= prefill_tokens) that run eagerly,
    their padded bucket being above graph_tokens, for a warm-up to run once each: Triton compiles
    a kernel per class of each int argument (1, a multiple of 16, other), so one row and the
    largest odd row count, each at lengths 0, 8 and 15 mod 16 (token totals of every class).
    [] when no admissible prefill is eager."""
    out = []
    for n in sorted({1, max_rows if max_rows % 2 else max_rows - 1}):
        T = min(max_len, prefill_tokens // n)
        top = T - T % 16
        for t in (top, top - 8, top - 1):
            if t >= 1 and bucket(n) * bucket(t, MIN_LENGTH) > graph_tokens:     # n t <= prefill_tokens: t <= T
                out.append((n, t))
    return out


@dataclass
class _Shape:
    ids: Tensor                               # [nb, Tb] static input, right-padded with token 0
    last: Tensor                              # [nb] index of each row's last prompt token
    cache: KVCache                            # the staging cache [layers, nb, kv_heads, Tb, D]
    out: Tensor | None = None                 # [nb, 1, V] fp32 logits (the graph's output)
    graph: "torch.cuda.CUDAGraph | None" = None


@dataclass
class _Tail:
    ids: Tensor                               # [1, Rb] static input, right-padded with token 0
    first: Tensor                             # [1] position of token 0 (the row holds slots before it)
    last: Tensor                              # [1] index of the last real token
    row: Tensor                               # [1] the cache row
    cache: KVCache                            # the caller's cache, mapped to `row`
    out: Tensor | None = None                 # [1, 1, V] fp32 logits
    graph: "torch.cuda.CUDAGraph | None" = None


class Prefill:
    """`prefill(ids, last, cache)` -> logits [n, V] of each row's last prompt token.

    ids [n, T] (on the model's device, right-padded), last [n] the index of each row's last real
    token, cache: the rows to fill, positions 0..T-1 (a KVCache or a `rows()` view with at least
    T slots). Up to `graph_tokens` padded tokens, the forward is the graph of its (rows, length)
    bucket (captured on first use; on a CPU model the same staged forward runs eagerly, which is
    what the tests check); above, or with use_graphs=False, a plain forward into `cache`.
    `prefill.tail(ids, first, row, cache)`: the same for the rest of one prompt whose first
    tokens' K/V row `row` holds. The returned logits are only valid until the next call."""

    def __init__(self, model, use_graphs: bool, graph_tokens: int = GRAPH_TOKENS):
        self.model = model
        self.use_graphs = use_graphs and graph_tokens > 0
        self.graph_tokens = graph_tokens
        self.device = next(model.buffers()).device
        self._shapes: dict[tuple[int, int], _Shape] = {}
        self._tails: dict[int, _Tail] = {}
        self._tail_cache: KVCache | None = None   # the cache the tail graphs write (one per engine)
        self._stage: tuple[Tensor, Tensor] | None = None    # flat K / V storage of every staging cache
        self._pool = None

    def __call__(self, ids: Tensor, last: Tensor, cache: KVCache) -> Tensor:
        n, T = ids.shape
        nb, Tb = bucket(n), bucket(T, MIN_LENGTH)
        if not self.use_graphs or nb * Tb > self.graph_tokens:
            positions = torch.arange(T, device=ids.device)[None, :].expand(n, T)
            # the view of exactly T slots: the tokens are its tail (model.forward's `tail`)
            return self.model(ids, positions=positions, cache=cache.rows(0, n, T), logits_index=last,
                              tail=True)[:, -1]
        s = self._shape(nb, Tb)
        s.ids.zero_()
        s.ids[:n, :T].copy_(ids)
        s.last.zero_()
        s.last[:n].copy_(last)
        if s.graph is not None:
            s.graph.replay()
        else:
            self._forward(s)
        cache.k[:, :n, :, :T].copy_(s.cache.k[:, :n, :, :T])
        cache.v[:, :n, :, :T].copy_(s.cache.v[:, :n, :, :T])
        return s.out[:n, -1]

    def tail(self, ids: Tensor, first: int, row: int, cache: KVCache) -> Tensor:
        """logits [1, V] of the last of ids [1, R] (on the model's device): a prompt's tokens at
        positions first .. first + R - 1, the K/V of those before in slots 0 .. first - 1 of cache
        row `row`; theirs are written after. Up to `graph_tokens` (R padded to its bucket) the
        graph of that bucket (the padding's positions clamped to the cache's last slot, which
        only a decode step can fill); above, an eager forward through the row's first + R slots."""
        R = ids.shape[1]
        Rb = bucket(R, MIN_LENGTH)
        if not self.use_graphs or Rb > self.graph_tokens:
            positions = torch.arange(first, first + R, device=ids.device)[None]
            last = torch.full((1,), R - 1, device=ids.device)
            return self.model(ids, positions=positions, cache=cache.rows(row, row + 1, first + R), logits_index=last,
                              tail=True)[:, -1]
        if self._tail_cache is None:
            self._tail_cache = cache
        elif cache.k.data_ptr() != self._tail_cache.k.data_ptr():
            raise ValueError("Prefill.tail: its graphs write one cache; this call passed another")
        s = self._tails.get(Rb)
        if s is None:
            return self._tail_shape(Rb, ids, first, row)[:, -1]
        self._tail_inputs(s, ids, first, row)
        if s.graph is not None:
            s.graph.replay()
        else:
            self._tail_forward(s)
        return s.out[:, -1]

    @property
    def graphs(self) -> int:
        """Number of captured bucket graphs (read from other threads: list() copies the values
        in one step, while the engine's thread may be adding shapes)."""
        return sum(s.graph is not None for s in list(self._shapes.values()) + list(self._tails.values()))

    def warm_up(self, max_rows: int, max_len: int) -> int:
        """Capture now the graph of every bucket that a prefill of up to max_rows prompts of up to
        max_len tokens can take (else each bucket's first prefill pays an eager forward and the
        capture); -> the number of buckets. Nothing to do without graphs."""
        if not self.use_graphs:
            return 0
        shapes = [(nb, Tb) for nb in buckets(bucket(max_rows))
                  for Tb in buckets(bucket(max_len, MIN_LENGTH), MIN_LENGTH) if nb * Tb <= self.graph_tokens]
        for nb, Tb in shapes:
            self._shape(nb, Tb)
        return len(shapes)

    def warm_up_tails(self, cache: KVCache, max_len: int) -> int:
        """Capture now the tail graph of every bucket a prompt's rest of up to max_len tokens can
        take (with row 0 of `cache`, which must hold nothing to keep); -> the number of buckets."""
        if not self.use_graphs:
            return 0
        sizes = [Rb for Rb in buckets(bucket(max_len, MIN_LENGTH), MIN_LENGTH) if Rb <= self.graph_tokens]
        for Rb in sizes:
            if Rb not in self._tails:
                self.tail(torch.zeros(1, Rb, dtype=torch.long, device=self.device), 0, 0, cache)
        return len(sizes)

    def _tail_inputs(self, s: _Tail, ids: Tensor, first: int, row: int) -> None:
        s.ids.zero_()
        s.ids[:, : ids.shape[1]].copy_(ids)
        s.first.fill_(first)
        s.last.fill_(ids.shape[1] - 1)
        s.row.fill_(row)

    def _tail_forward(self, s: _Tail) -> None:
        Rb, S = s.ids.shape[1], s.cache.max_len
        positions = (s.first[:, None] + torch.arange(Rb, device=self.device)).clamp_(max=S - 1)
        s.out = self.model(s.ids, positions=positions, cache=s.cache, logits_index=s.last)

    def _tail_shape(self, Rb: int, ids: Tensor, first: int, row: int) -> Tensor:
        """The bucket's static inputs, set to this call's; its first forward runs eagerly on them
        (Triton compiles; the row's K/V are this call's) and then the graph is captured (a capture
        runs nothing): no forward writes a row the caller did not name. -> this call's logits."""
        z = lambda n: torch.zeros(n, dtype=torch.long, device=self.device)   # noqa: E731
        row_t = z(1)
        s = _Tail(ids=z((1, Rb)), first=z(1), last=z(1), row=row_t, cache=self._tail_cache.mapped(row_t))
        self._tail_inputs(s, ids, first, row)
        self._tails[Rb] = s
        return self._run_and_capture(s, self._tail_forward)

    def _run_and_capture(self, s, forward) -> Tensor:
        """forward(s) once eagerly (on a side stream, for the capture's sake), then, on CUDA, its
        graph. -> the eager forward's logits (the graph's s.out holds nothing until a replay)."""
        if self.device.type != "cuda":
            forward(s)
            return s.out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):           # warm up (Triton compiles) outside the capture
            forward(s)
        torch.cuda.current_stream().wait_stream(side)
        eager = s.out
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph, pool=self._pool):
            forward(s)
        return eager

    def _forward(self, s: _Shape) -> None:
        nb, Tb = s.ids.shape
        positions = torch.arange(Tb, device=self.device)[None, :].expand(nb, Tb)
        s.out = self.model(s.ids, positions=positions, cache=s.cache, logits_index=s.last, tail=True)

    def _shape(self, nb: int, Tb: int) -> _Shape:
        s = self._shapes.get((nb, Tb))
        if s is not None:
            return s
        a, dev = self.model.args, self.device
        if self._stage is None:
            per_token = a.num_hidden_layers * a.num_key_value_heads * a.head_dim
            self._stage = tuple(torch.empty(self.graph_tokens * per_token, dtype=self.model.dtype, device=dev)
                                for _ in range(2))
        shape = (a.num_hidden_layers, nb, a.num_key_value_heads, Tb, a.head_dim)
        k, v = (t[: math.prod(shape)].view(shape) for t in self._stage)
        cache = KVCache.over(k, v, torch.zeros(nb, dtype=torch.long, device=dev), torch.arange(Tb, device=dev))
        s = _Shape(ids=torch.zeros(nb, Tb, dtype=torch.long, device=dev),
                   last=torch.zeros(nb, dtype=torch.long, device=dev), cache=cache)
        if dev.type == "cuda":
            self._run_and_capture(s, self._forward)
        self._shapes[(nb, Tb)] = s
        return s
