"""Which part of every weight a rank holds, checked at plan time, and how it is read.

Layout (world = tp * ep processes, rank = ep_rank * tp + tp_rank):

* Attention is tensor parallel over ALL ranks: q/o by heads (q_proj rows, o_proj columns of
  heads/world heads), k/v by kv heads. When kv_heads < world each rank keeps the one kv head its
  q heads read (world % kv_heads == 0 required), so k/v are replicated world/kv_heads times. One
  all-reduce after o_proj. Dense MLP layers likewise: gate/up rows, down columns over all ranks.
* Experts: expert e belongs to expert group e * ep // E (contiguous chunks); inside its group it is
  split over the group's tp ranks along the intermediate dim (gate/up rows, down columns). A rank
  never reads the experts of other groups. One all-reduce over all ranks sums the partial
  outputs: the tp parts of an expert and the experts of every group at once.
* Embedding and lm_head are vocab parallel over all ranks: ceil(V/world) rows each, the last
  rank's tail padded with zero rows; masked lookup + all-reduce, logits all-gathered and trimmed.

Why attention over all ranks and not over the tp group (replicated across expert groups): no
attention / dense / vocab weight is stored twice (at TP2 x EP4 a rank holds 1/8 of them, not
1/2), the per-layer communication is the same (the MoE sum must cross expert groups anyway, so
both blocks end in one all-reduce of [T, H] either way), and it is what SGLang and vLLM do. It
needs heads % world == 0, which holds for Qwen3 (32 / 64 heads) up to 32 / 64 ranks.
EP uses an all-reduce and no all-to-all: activations are replicated after the attention
all-reduce, so dispatching tokens would add a second collective; all-to-all pays only with
data-parallel attention, which mixprec does not do.

Uneven splits (I/tp not a multiple of the group / block, e.g. Qwen3-30B-A3B I=768 at TP4 = 192
rows per rank with 128-blocks): every rank gets an EQUAL slice (same shapes on every rank, so one
kernel config and stackable experts), and the layout's `shard` (formats/*.py) refines the group
or block to gcd(G, start, length) inside the slice and replicates the scale row of a group or block
that two ranks share (768/TP4: blocks of 64, rank 1 gets scale rows [1, 2, 2]; 768/TP8 and
1536/TP8 likewise). dequant(shard) is bit-identical to the slice of dequant(whole): no padding
of weights, no approximation. Act-order int4 (GPTQ desc_act) K slices keep scales / zeros
whole (a rank's inputs reference any group) and pad each group to the shard's group size with
rows that dequantize to exactly 0; the experts of a layer are sharded as one stack so they share
that group size and stay in one bucket. Two consequences for the CUDA kernels: an fp8 K slice
whose refined block is not a multiple of 128 cannot use W8A8 (activations are quantized per 128
inputs) and runs W8A16 instead (`shard_weight`); int4 / int8 K slices must hold whole int32 words
(K/parts % (32/bits) == 0 unless act-order), else a ParallelError at plan time.

Only shapes that truly cannot be split are refused, at plan time, with every problem listed:
heads % world, kv heads that neither divide nor are divided by world, a dense intermediate size
or moe_intermediate_size that does not divide over its ranks, fewer experts than expert groups,
an int4/int8 K slice that is not whole words, a quantized lm_head whose vocab does not divide.

What a rank reads (all through the checkpoint's memory map, `Checkpoint.get_slice`):
* experts of other expert groups: nothing; its own experts, TP-split: see the next points;
* plain tensors: norms, q/k norms, router whole (small); embeddings: its vocab rows only;
* unquantized (bf16/fp16) linears: its rows (N split) or its columns (K split; a column slice
  touches every page of the row-major tensor, so the OS reads about the whole tensor);
* quantized linears: the tensor holding the codes (`CheckpointFormat.codes`) is read only on the rows / columns
  the slice needs, rounded out to whole packed words, and the rest is left zero; the small
  tensors (scales, zeros, g_idx, about 3% of an int4-g128 module) are read whole, because a
  slice that cuts groups / blocks, or act-order g_idx, can reference any of them. The module is
  then transcoded by its format's `load` at full size on the host and cut by the layout's
  `shard`: the disk read is the rank's share, the host CPU work of transcoding is that of the
  whole module (the same as a single-process load). A format whose `codes` is None is read whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..config import ModelArgs
from ..errors import MissingWeight, ParallelError
from ..formats import FORMATS
from ..formats.base import Packed, shard
from ..formats.compressed_tensors import group_actorder
from ..loader.checkpoint import Checkpoint

W8A8_ACT_GROUP = 128   # fp8 W8A8 kernels quantize activations per 128 inputs (kernels/fp8.py, kernels/moe.py)

_ATTN = re.compile(r"model\.layers\.\d+\.self_attn\.([qkvo])_proj")
_DENSE = re.compile(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj")
_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(gate|up|down)_proj")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Split(NamedTuple):
    """Part `part` of `parts` equal slices of a weight along dim "n" (rows) or "k" (columns)."""
    dim: str
    part: int
    parts: int

    def range(self, size: int) -> tuple[int, int]:
        per = size // self.parts
        return self.part * per, (self.part + 1) * per


def expert_group(e: int, num_experts: int, ep: int) -> int:
    """The expert group (ep rank) holding expert e: contiguous chunks of E/ep experts."""
    return e * ep // num_experts


class Ranks:
    """Rank arithmetic of a tp x ep run: ranks tp*g .. tp*g+tp-1 form expert group g."""
    rank: int
    tp: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp


@dataclass(frozen=True)
class ShardLayout(Ranks):
    """What rank `rank` of a tp x ep run holds of the model `args`. Build with `make_layout`."""
    args: ModelArgs
    tp: int
    ep: int
    rank: int

    @property
    def world(self) -> int:
        return self.tp * self.ep

    # -- attention ---------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.args.num_attention_heads // self.world

    @property
    def kv_split(self) -> Split:
        """k_proj / v_proj rows this rank keeps: its kv_heads/world heads, or (kv_heads < world)
        the one kv head its q heads read."""
        kv = self.args.num_key_value_heads
        if kv >= self.world:
            return Split("n", self.rank, self.world)
        return Split("n", self.rank // (self.world // kv), kv)

    @property
    def kv_heads(self) -> int:
        return max(1, self.args.num_key_value_heads // self.world)

    # -- experts -------------------------------------------------------------------------------
    @property
    def experts(self) -> tuple[int, ...]:
        E = self.args.num_experts
        return tuple(e for e in range(E) if expert_group(e, E, self.ep) == self.ep_rank)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_rows(self) -> int:
        return cdiv(self.args.vocab_size, self.world)

    @property
    def vocab_range(self) -> tuple[int, int]:
        """[start, stop) of the real vocabulary rows this rank holds (stop may equal start)."""
        start = min(self.rank * self.vocab_rows, self.args.vocab_size)
        return start, min(start + self.vocab_rows, self.args.vocab_size)

    # -- per weight ------------------------------------------------------------------------------
    def holds(self, module: str) -> bool:
        """False for the experts of other expert groups (never read)."""
        m = _EXPERT.fullmatch(module)
        return m is None or expert_group(int(m[1]), self.args.num_experts, self.ep) == self.ep_rank

    def split(self, module: str) -> Split | None:
        """How linear `module` (HF name) is cut for this rank; None = held whole."""
        W, r = self.world, self.rank
        out = None
        if m := _ATTN.fullmatch(module):
            out = {"q": Split("n", r, W), "k": self.kv_split, "v": self.kv_split, "o": Split("k", r, W)}[m[1]]
        elif m := _EXPERT.fullmatch(module):
            out = Split("k" if m[2] == "down" else "n", self.tp_rank, self.tp)
        elif m := _DENSE.fullmatch(module):
            out = Split("k" if m[1] == "down" else "n", r, W)
        elif module == "lm_head":
            out = Split("n", r, W)
        return out if out is not None and out.parts > 1 else None

    def local_args(self) -> ModelArgs:
        """The model as this rank builds it: per-rank heads, kv heads, intermediate sizes and
        vocabulary rows (experts keep their global count and ids)."""
        a = self.args
        dense = any(not a.is_moe_layer(l) for l in range(a.num_hidden_layers))
        return replace(a, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                       intermediate_size=a.intermediate_size // self.world if dense else a.intermediate_size,
                       moe_intermediate_size=a.moe_intermediate_size // self.tp, vocab_size=self.vocab_rows)


def make_layout(args: ModelArgs, tp: int, ep: int, rank: int = 0) -> ShardLayout:
    """The layout of `rank`; ParallelError listing every architectural reason it cannot exist."""
    errors = []
    for name, v in (("tp", tp), ("ep", ep)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ParallelError(f"{name}={v!r}: expected a positive integer")
    W = tp * ep
    if not 0 <= rank < W:
        raise ParallelError(f"rank {rank} outside 0..{W - 1} (tp={tp} x ep={ep})")
    heads, kv = args.num_attention_heads, args.num_key_value_heads
    if heads % W:
        errors.append(f"num_attention_heads={heads} does not split over tp*ep={W} ranks (attention is "
                      f"split over all ranks)")
    if kv % W and W % kv:
        errors.append(f"num_key_value_heads={kv} neither divides nor is divided by tp*ep={W}")
    if any(not args.is_moe_layer(l) for l in range(args.num_hidden_layers)) and args.intermediate_size % W:
        errors.append(f"intermediate_size={args.intermediate_size} (dense MLP layers) does not split over "
                      f"tp*ep={W} ranks")
    moe = any(args.is_moe_layer(l) for l in range(args.num_hidden_layers))
    if moe:
        if args.num_experts < ep:
            errors.append(f"ep={ep} expert groups but only {args.num_experts} experts")
        if args.moe_intermediate_size % tp:
            errors.append(f"moe_intermediate_size={args.moe_intermediate_size} does not split over tp={tp}")
    elif ep > 1:
        errors.append(f"ep={ep} but the model has no MoE layers")
    if errors:
        raise ParallelError(f"tp={tp} x ep={ep}: cannot split this model:\n  - " + "\n  - ".join(errors))
    return ShardLayout(args, tp, ep, rank)


def _intq_bits(scheme: dict | None) -> int | None:
    s = scheme or {}
    if s.get("quant_method") == "compressed-tensors":
        return (s.get("weights") or {}).get("num_bits")
    return s.get("bits")


def _act_order(scheme: dict | None) -> bool:
    """Whether the weight is stored act-order sorted with a g_idx (its K slices are padded, not
    cut at words). compressed-tensors' actorder 'weight' stores no g_idx: natural order."""
    s = scheme or {}
    return bool(s.get("desc_act") or group_actorder(s.get("weights") or {}))


def check_plan(plan, tp: int, ep: int) -> ShardLayout:
    """make_layout plus the per-weight checks of the mix's formats, for every rank (the splits
    are equal, so rank 0's shapes are every rank's). ParallelError listing all problems;
    reads headers only."""
    lay = make_layout(plan.args, tp, ep)
    errors = []
    for module, e in plan.entries.items():
        sp = lay.split(module)
        if sp is None:
            continue
        size = e.n if sp.dim == "n" else e.k
        per = size // sp.parts
        if module == "lm_head" and e.layout != "dense" and size % sp.parts:
            errors.append(f"{module} ({e.fmt_name} from {e.path}): vocab {size} does not split over {sp.parts} "
                          f"ranks; only an unquantized lm_head is padded")
        bits = _intq_bits(e.scheme) if e.layout == "intq" else None
        if sp.dim == "k" and bits and per % (32 // bits) and not _act_order(e.scheme):
            errors.append(f"{module} ({e.fmt_name} {e.params} from {e.path}): K={size} over {sp.parts} ranks is "
                          f"{per} inputs per rank, not whole int32 words of {32 // bits} {bits}-bit codes")
    if errors:
        raise ParallelError(f"tp={tp} x ep={ep}: {len(errors)} weight(s) cannot be split:\n  - "
                            + "\n  - ".join(errors))
    return lay


def rank_bytes(plan, tp: int, ep: int) -> list[int]:
    """On-disk bytes of the weights each rank of a tp x ep run of `plan` holds (ParallelError if
    the mix cannot be split): its linears or its slices of them (scales counted pro rata), its
    vocabulary rows of the embedding and the replicated norms / routers. KV cache and activations
    are not counted."""
    check_plan(plan, tp, ep)
    a = plan.args
    embed = plan.sources["model"].nbytes("model.embed_tokens.weight")   # part of plan.plain_bytes
    out = []
    for rank in range(tp * ep):
        lay = make_layout(a, tp, ep, rank)
        held = sum(e.nbytes // (sp.parts if (sp := lay.split(m)) else 1)
                   for m, e in plan.entries.items() if lay.holds(m))
        out.append(held + (plan.plain_bytes - embed) + embed * lay.vocab_rows // a.vocab_size)
    return out


# -- reading ---------------------------------------------------------------------------------
def read_module(ckpt: Checkpoint, module: str, fmt_name: str, n: int, k: int, sp: Split | None) -> dict[str, Tensor]:
    """Tensors of linear `module` (suffix -> tensor) as its format's `load` takes them, with the
    codes tensor read only where slice `sp` needs it (zero elsewhere; see the module docstring)."""
    meta = ckpt.module_meta(module)
    if not meta:
        raise MissingWeight(f"{ckpt.path}: no tensors for module {module!r}")
    codes = getattr(FORMATS.get(fmt_name), "codes", None)
    raw = {}
    for suffix, (dtype, shape) in meta.items():
        name = f"{module}.{suffix}"
        if sp is None or codes is None or suffix != codes[0]:
            raw[suffix] = ckpt.get(name)
            continue
        dim = codes[1] if sp.dim == "n" else codes[2]
        size = n if sp.dim == "n" else k
        if size % shape[dim]:       # not a whole number of elements per stored index: read all
            raw[suffix] = ckpt.get(name)
            continue
        unit = size // shape[dim]   # e.g. 8 int4 codes per int32 word along the packed dim
        a, b = sp.range(size)
        lo, hi = a // unit, cdiv(b, unit)
        t = torch.zeros(shape, dtype=dtype)
        t.narrow(dim, lo, hi - lo).copy_(ckpt.get_slice(name, dim, lo, hi))
        raw[suffix] = t
    return raw


def read_dense(ckpt: Checkpoint, name: str, sp: Split | None, n: int, k: int, rows: int | None = None) -> Tensor:
    """An unquantized [N, K] tensor's slice, read alone. `rows` (N splits only): pad the slice with
    zero rows to this many (a vocabulary that does not divide over the ranks)."""
    if sp is None:
        return ckpt.get(name)
    if sp.dim == "k":
        a, b = sp.range(k)
        return ckpt.get_slice(name, 1, a, b)
    per = rows if rows is not None else n // sp.parts
    a = min(sp.part * per, n)
    b = min(a + per, n)
    return pad_rows(ckpt.get_slice(name, 0, a, b), per)


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """t [n, ...] with zero rows appended up to `rows` (the last vocab-parallel rank's tail)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def shard_weight(w: Packed, sp: Split | None) -> Packed:
    """The layout's `shard` (formats/*.py); an fp8 K slice whose refined block no longer holds whole
    128-input activation groups runs W8A16 (see the module docstring)."""
    if sp is None:
        return w
    s = shard(w, sp.dim, sp.part, sp.parts)
    if s.layout == "fp8" and sp.dim == "k" and s.params.get("act") == "w8a8":
        bk = s.params["block"][1]
        if bk < s.k and bk % W8A8_ACT_GROUP:
            s = Packed(s.layout, s.n, s.k, s.tensors(), {**s.params, "act": "w8a16"}, s.source)
    return s
