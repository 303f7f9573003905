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


class Prefill:
    """`prefill(ids, last, cache)` -> logits [n, V] of each row's last prompt token.

    ids [n, T] (on the model's device, right-padded), last [n] the index of each row's last real
    token, cache: the rows to fill, positions 0..T-1 (a KVCache or a `rows()` view with at least
    T slots). Up to `graph_tokens` padded tokens, the forward is the graph of its (rows, length)
    bucket (captured on first use; on a CPU model the same staged forward runs eagerly, which is
    what the tests check); above, or with use_graphs=False, a plain forward into `cache`.
    The returned logits are only valid until the next call."""

    def __init__(self, model, use_graphs: bool, graph_tokens: int = GRAPH_TOKENS):
        self.model = model
        self.use_graphs = use_graphs and graph_tokens > 0
        self.graph_tokens = graph_tokens
        self.device = next(model.buffers()).device
        self._shapes: dict[tuple[int, int], _Shape] = {}
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

    @property
    def graphs(self) -> int:
        """Number of captured bucket graphs (read from other threads: list() copies the values
        in one step, while the engine's thread may be adding shapes)."""
        return sum(s.graph is not None for s in list(self._shapes.values()))

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
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):           # warm up (Triton compiles) outside the capture
                self._forward(s)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            s.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(s.graph, pool=self._pool):
                self._forward(s)
        self._shapes[(nb, Tb)] = s
        return s
