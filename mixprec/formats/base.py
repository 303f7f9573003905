"""The format interface, the packed-weight container, and the registries.

Two kinds of objects live in `formats/`:

* A **layout** is how a weight sits in memory for its kernel. There are four, and every
  checkpoint format lands in one of them at load time:

  ==========  ==========================================================================
  ``dense``   ``weight [N, K]`` in the compute dtype (bf16 / fp16 / fp32)
  ``fp8``     ``weight [N, K]`` float8_e4m3fn, ``scale [ceil(N/bn), ceil(K/bk)]`` fp32;
              params ``block=(bn, bk)`` (per-channel = (1, K), per-tensor = (N, K)),
              ``act`` = "w8a8" | "w8a16"
  ``intq``    ``qweight [R/pf, N]`` int32 (pf = 32/bits; unsigned codes, row r holds stored
              rows r*pf .. r*pf+pf-1, row r*pf+i in bits bits*i..bits*i+bits-1),
              ``scales [ceil(R/G), N]`` fp16/bf16, optional ``zeros [ceil(R/G), N]`` uint8 (true
              zero points; absent = symmetric, zero 2^(bits-1)), optional ``perm [R]`` int32
              (act-order: rows are stored sorted by group, stored row j multiplies ``x[:, perm[j]]``);
              params ``bits`` (4|8), ``group_size`` (G; K when the checkpoint says -1).
              R = K, except in a tensor-parallel K shard of an act-order weight: there every
              group is padded to the shard's G (a multiple of pf) with rows whose codes equal
              their zero point (they dequantize to exactly 0) and whose ``perm`` entry is 0, so
              R >= K; always R = perm.numel() when perm is present, else K
  ``int8``    ``weight [N, K]`` int8, ``scale [N, 1]`` fp32, optional ``zero [N, 1]`` fp32;
              params ``act`` = "w8a8" | "w8a16"
  ==========  ==========================================================================

  Tensor-parallel shards (``Layout.shard``) may refine ``block`` / ``group_size`` to a divisor
  of the original (e.g. 128 -> 64 for 192 rows per rank, 32 for 96) with scale rows replicated,
  and act-order intq K shards use any multiple of pf; kernels must take such sizes, not only 128.

  dequant (the readable spec every kernel is tested against):
  dense: W; fp8: W * scale[n//bn, k//bk]; intq: scales[g, n] * (q[k, n] - z[g, n]) with g the
  group of stored row k, then un-permuted; int8: scale[n] * (q - zero[n]).

* A **checkpoint format** (GPTQ, AWQ, FP8 block, compressed-tensors, ...) knows the tensor names
  and quirks of one producer: `detect`, `load` (raw tensors -> Packed in its layout), `pack`
  (float weight -> exactly the tensors the producer writes, plus its config.json block).

`Packed` is an nn.Module holding the layout's tensors as buffers, so `.to(device)`,
`named_buffers()` and byte accounting work without special cases.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ParallelError


class Packed(nn.Module):
    """One linear weight (or a stack of E expert weights) in a kernel layout.

    `layout` picks the Layout object (see LAYOUTS); `params` are static, hashable settings
    (bits, group_size, block, act). `source` names the checkpoint format it came from
    (e.g. "gptq", "awq", "fp8_block") for stats and `inspect`. For an expert stack every
    buffer has a leading [E] dimension and `n`, `k` describe one expert.
    """

    def __init__(self, layout: str, n: int, k: int, tensors: dict[str, Tensor],
                 params: dict[str, Any] | None = None, source: str = ""):
        super().__init__()
        self.layout, self.n, self.k = layout, int(n), int(k)
        self.params = dict(params or {})
        self.source = source or layout
        for name, t in tensors.items():
            if t is not None:
                self.register_buffer(name, t, persistent=False)

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.named_buffers(recurse=False))

    def key(self) -> tuple:
        """Bucket key: weights with equal keys can be stacked and run by one kernel launch."""
        return (self.layout, self.n, self.k, tuple(sorted((k, _hashable(v)) for k, v in self.params.items())),
                tuple(sorted((name, t.dtype) for name, t in self.tensors().items())))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select(self, i: int) -> "Packed":
        """Expert i of a stack, as a view (no copy)."""
        return Packed(self.layout, self.n, self.k, {k: t[i] for k, t in self.tensors().items()},
                      self.params, self.source)

    def extra_repr(self) -> str:
        return f"{self.layout}[{self.n}x{self.k}] {self.params} from {self.source}"


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


class Layout(ABC):
    """Stateless operations on one layout. Subclasses live in the format files."""
    name: ClassVar[str]

    @abstractmethod
    def dequant(self, w: Packed) -> Tensor:
        """Pure-torch reference: float32 [N, K] (or [E, N, K] for a stack)."""

    def apply(self, x: Tensor, w: Packed) -> Tensor:
        """y = x @ W.T for x [..., K] -> [..., N]. Fast kernel on CUDA, dequant+matmul elsewhere."""
        W = self.dequant(w).to(x.dtype)
        return torch.nn.functional.linear(x, W)

    @abstractmethod
    def cat_n(self, ws: list[Packed]) -> Packed | None:
        """Weights with equal K concatenated along N (qkv, gate+up fusion): one Packed whose
        dequant is torch.cat([dequant(w) for w in ws]), or None when the layout cannot express
        it (different params, act-order perms, blocks straddling the seam)."""

    @abstractmethod
    def shard(self, w: Packed, dim: str, rank: int, world: int) -> Packed:
        """Tensor-parallel slice: dim "n" -> rows n0:n1 of W (column parallel), "k" -> columns
        k0:k1 (row parallel), equal ranges of size/world. dequant(shard) == dequant(w)[range]
        exactly, so sum_r x[:, k_r] @ W_r.T == x @ W.T (k) and cat_r == x @ W.T (n)."""


class CheckpointFormat(ABC):
    """One producer's on-disk format. Subclasses live in the format files."""
    name: ClassVar[str]           # e.g. "gptq", "awq", "fp8_block"
    layout: ClassVar[str]         # layout it loads into
    suffixes: ClassVar[tuple[str, ...]]  # tensor names under the module prefix, e.g. ("qweight", ...)
    # (tensor holding the weight codes, its dim along N, its dim along K): a tensor-parallel rank
    # reads only its slice of it (parallel/shard.py); None: read whole
    codes: ClassVar[tuple[str, int, int] | None] = None

    @abstractmethod
    def detect(self, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], qcfg: dict | None) -> bool:
        """True when the module's tensors (suffix -> (dtype, shape); metadata only) are this format."""

    @abstractmethod
    def load(self, raw: dict[str, Tensor], n: int, k: int, qcfg: dict | None, where: str = "") -> Packed:
        """Checkpoint tensors of one module (suffix -> tensor) -> Packed in `self.layout`.
        `where` names file/module for error messages."""

    @abstractmethod
    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        """Float weight [N, K] -> exactly the tensors the producer writes (suffix -> tensor)."""

    @abstractmethod
    def config_block(self, **params) -> dict:
        """The `quantization_config` the producer writes into config.json."""


LAYOUTS: dict[str, Layout] = {}
FORMATS: dict[str, CheckpointFormat] = {}


def register_layout(cls):
    LAYOUTS[cls.name] = cls()
    return cls


def register_format(cls):
    FORMATS[cls.name] = cls()
    return cls


def stack(ws: list[Packed]) -> Packed:
    """E packed weights with equal key() -> one stack with a leading [E] dim on every buffer."""
    k0 = ws[0].key()
    for w in ws[1:]:
        if w.key() != k0:
            raise ValueError(f"cannot stack {w.extra_repr()} with {ws[0].extra_repr()}")
    names = list(ws[0].tensors())
    return Packed(ws[0].layout, ws[0].n, ws[0].k,
                  {nm: torch.stack([w.tensors()[nm] for w in ws]) for nm in names},
                  ws[0].params, ws[0].source)


_KERNELS = {"on": True, "cpu": False}


def use_kernels(x: Tensor) -> bool:
    """Whether `apply` takes the fast kernel for x: on CUDA, unless inside `reference_path()`
    (and on CPU inside `interpreter_kernels()`)."""
    return (x.is_cuda or _KERNELS["cpu"]) and _KERNELS["on"]


@contextmanager
def interpreter_kernels():
    """Tests: take the kernel path for CPU tensors too, run by Triton's interpreter (needs
    TRITON_INTERPRET=1 before triton is imported; fp16/fp32 only: its bf16 is wrong)."""
    prev = _KERNELS["cpu"]
    _KERNELS["cpu"] = True
    try:
        yield
    finally:
        _KERNELS["cpu"] = prev


@contextmanager
def reference_path():
    """Run every layout by its readable dequant+matmul path (on any device), e.g. to check the
    kernels of a whole model against the spec."""
    prev = _KERNELS["on"]
    _KERNELS["on"] = False
    try:
        yield
    finally:
        _KERNELS["on"] = prev


def dequant(w: Packed) -> Tensor:
    return LAYOUTS[w.layout].dequant(w)


def apply(x: Tensor, w: Packed) -> Tensor:
    return LAYOUTS[w.layout].apply(x, w)


def cat_n(ws: list[Packed]) -> Packed | None:
    """Concatenate along N (see Layout.cat_n); None when the weights differ in layout."""
    if not ws or any(w.layout != ws[0].layout for w in ws):
        return None
    return LAYOUTS[ws[0].layout].cat_n(ws)


def shard(w: Packed, dim: str, rank: int, world: int) -> Packed:
    """Tensor-parallel slice of one weight (see Layout.shard), owning its memory: an N slice of a
    row-major tensor is a view, which would keep the whole weight alive (a TP4 rank building
    235B-shaped weights on the GPU then held every full gate/up projection and ran out of memory)."""
    s = LAYOUTS[w.layout].shard(w, dim, rank, world)
    owned = {name: t.clone() if t.untyped_storage().nbytes() > t.nbytes else t for name, t in s.tensors().items()}
    return Packed(s.layout, s.n, s.k, owned, s.params, s.source)


def shard_range(w: Packed, dim: str, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's equal share of N (dim "n") or K (dim "k"); ParallelError when the
    size does not divide."""
    if dim not in ("n", "k"):
        raise ParallelError(f"shard dim {dim!r}: expected 'n' or 'k'")
    if not (isinstance(world, int) and world >= 1 and 0 <= rank < world):
        raise ParallelError(f"shard rank {rank} of world {world}: expected 0 <= rank < world")
    size = w.n if dim == "n" else w.k
    if size % world:
        raise ParallelError(f"{w.extra_repr()}: {dim.upper()}={size} does not split over {world} ranks")
    per = size // world
    return rank * per, (rank + 1) * per


def sub_blocks(block: int, size: int, start: int, length: int) -> tuple[int, Tensor]:
    """Scale blocks of width `block` along an axis of `size`, restricted to [start, start+length).

    Returns the block width to use inside the slice and, per new block, the index of the
    original block holding it. The width divides `block` and `start` (gcd), so no new block
    straddles an original border: a block shared by two ranks has its scale row replicated.
    A slice inside one original block keeps one block of width `length`.
    """
    if start // block == (start + length - 1) // block:
        return length, torch.tensor([start // block])
    nb = math.gcd(block, start, length)
    return nb, (start + torch.arange(-(-length // nb)) * nb) // block
