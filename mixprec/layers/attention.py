"""Qwen3 attention (GQA, per-head q/k RMSNorm before RoPE) and a static KV cache.

Cache convention: slot j of a sequence's cache holds the token at position j, so `positions`
are both the RoPE positions and the cache slots. A query at position p sees slots
start[b] <= j <= p, where start[b] is the first valid slot of sequence b (left-padded batches;
0 otherwise). With right padding nothing special is needed: a padded tail writes slots that the
sequence's own decode steps overwrite before any query can see them.
Every query also sees its own slot, so rows that are entirely padding stay finite (no NaN that
could leak through 0 * NaN into other rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..errors import MixprecError
from ..formats.base import use_kernels
from ..kernels import pdl
from ..kernels.attention import decode_attention_new, prefill_attention, qk_norm_rope_store
from .linear import FusedLinear, Linear
from .norm import RMSNorm, Rotary, apply_rope


# attn_mask of a cached forward whose T tokens are the last T slots of the cache view in every row
# (positions S-T .. S-1, the view's S slots valid from slot 0: a right-padded prefill, or the rest
# of a prompt after a reused prefix): causal attention needs no [T, S] mask tensor. SDPA then runs
# flash kernels, not cuDNN's: cuDNN builds a plan for every new shape (40-95 ms, once 1.1 s, H200;
# every prompt length is one), and inside a graph capture it fails unless an eager call at that
# shape came first. H200, 30B heads, ms per layer (scripts/bench_sdpa_prefill.py, BENCHMARKS.md
# session 42): with the mask 3.36 / 14.39 at 8K / 16K tokens; without: flash 1.78 / 6.15 (cuDNN
# 0.98 / 3.38 plus the plan)
TAIL = "tail"
_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def tail_attention(q: Tensor, k: Tensor, v: Tensor, gqa: bool) -> Tensor:
    """SDPA of q [B, h, T, D] as the last T of k / v's S positions [B, kvh, S, D], causal (also a
    forward without cache: S = T; a prompt's log-probabilities are one, of any length)."""
    T, S = q.shape[2], k.shape[2]
    kw = dict(is_causal=True) if S == T else dict(attn_mask=causal_lower_right(T, S))
    with sdpa_kernel(_SDPA):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kw)


class KVCache(nn.Module):
    """k, v: [L, B, kv_heads, S, D]; start: [B] int64, first valid slot of each sequence.

    A forward may use the first B' <= B rows (a smaller batch in a bigger cache). `start` persists
    across forwards: a new batch either passes its padding mask at prefill or calls `reset()`.
    row_ids (a `mapped` view): sequence b is row row_ids[b], not row b."""

    row_ids: Tensor | None = None

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        super().__init__()
        self.num_layers, self.batch, self.kv_heads, self.max_len, self.head_dim = (
            num_layers, batch, kv_heads, max_len, head_dim)
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("start", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    def set_start(self, positions: Tensor, valid: Tensor) -> None:
        """start[b] = smallest position of a valid token in row b (valid [B, T], 1 = real token).
        A prefill with a left-padding mask calls this; decode steps keep it. In place, no sync."""
        big = torch.full_like(positions, self.max_len)
        self.start[: positions.shape[0]].copy_(torch.where(valid.bool(), positions, big).amin(dim=1))

    def reset(self) -> None:
        """New batch: every slot valid from 0 again (old K/V need no clearing: masks hide them)."""
        self.start.zero_()

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, kv_heads, T, D] at slots `positions` [B, T]; return the layer's full
        cache k, v [B, kv_heads, S, D]. Positions must be < max_len (not checked: no host sync)."""
        B, Hk, T, D = k.shape
        if self.row_ids is not None:
            b, h, p = self.row_ids[:, None, None], torch.arange(Hk, device=k.device)[None, :, None], positions[:, None]
            self.k[layer][b, h, p] = k.to(self.k.dtype)                # [B, Hk, T] index -> [B, Hk, T, D]
            self.v[layer][b, h, p] = v.to(self.v.dtype)
            return self.k[layer][self.row_ids], self.v[layer][self.row_ids]
        idx = positions[:, None, :, None].expand(B, Hk, T, D)
        ck, cv = self.k[layer, :B], self.v[layer, :B]
        ck.scatter_(2, idx, k.to(ck.dtype))
        cv.scatter_(2, idx, v.to(cv.dtype))
        return ck, cv

    def mask(self, positions: Tensor) -> Tensor:
        """[B, 1, T, S] bool: query (b, t) may read slot j."""
        B = positions.shape[0]
        j = self.slots[None, None, :]                                  # [1, 1, S]
        p = positions[:, :, None]                                      # [B, T, 1]
        ok = ((j >= self.start[:B, None, None]) & (j <= p)) | (j == p)
        return ok[:, None]

    def rows(self, first: int, end: int, length: int | None = None) -> "KVCache":
        """A cache over rows [first, end) and slots [:length] of this one, sharing its storage
        (writes land here): lets a forward fill rows at an offset, and attend over only the
        slots in use (continuous batching). Positions must stay < length (not checked)."""
        L = self.max_len if length is None else length
        return KVCache.over(self.k[:, first:end, :, :L], self.v[:, first:end, :, :L], self.start[first:end],
                            self.slots[:L])

    def mapped(self, row_ids: Tensor) -> "KVCache":
        """A view of all rows in which sequence b is row row_ids[b] ([B] int64 on the device), every
        slot valid from 0: a forward through it is the same launches whichever rows (one CUDA graph
        serves any row: Prefill's tail graphs). The attention then reads slots 0 .. position of
        each query, never more (no view of exactly the slots in use needed)."""
        view = KVCache.over(self.k, self.v, torch.zeros_like(row_ids), self.slots)
        view.row_ids = row_ids
        return view

    @staticmethod
    def over(k: Tensor, v: Tensor, start: Tensor, slots: Tensor) -> "KVCache":
        """A cache over given storage: k, v [L, B, kv_heads, S, D], start [B], slots = arange(S)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.num_layers, view.batch, view.kv_heads, view.max_len, view.head_dim = k.shape
        for name, t in (("k", k), ("v", v), ("start", start), ("slots", slots)):
            view.register_buffer(name, t, persistent=False)
        return view


def causal_mask(valid: Tensor | None, B: int, T: int, device) -> Tensor | None:
    """Mask for a forward without cache: [B, 1, T, T] bool (key s visible from query t when
    s <= t and s is a real token, plus the diagonal), or None for plain causal."""
    if valid is None:
        return None
    i = torch.arange(T, device=device)
    ok = (i[None, :] <= i[:, None])[None] & valid.bool()[:, None, :]   # [B, T, T]
    ok = ok | torch.eye(T, dtype=torch.bool, device=device)[None]
    return ok[:, None]


def decode_kernel(x: Tensor, cache: KVCache | None) -> bool:
    """Whether a cached forward of x [B, T, H] takes the decode-attention kernel (one new token per
    sequence, kernels on): it needs no mask tensor."""
    return cache is not None and x.shape[1] == 1 and use_kernels(x)


class Attention(nn.Module):
    """`self_attn` of a Qwen3 decoder layer; HF names q_proj/k_proj/v_proj/o_proj/q_norm/k_norm.

    After `finalize()`, q/k/v run through `qkv` (FusedLinear: one launch when the three weights
    have one layout and compatible params, else three)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 rotary: Rotary, dtype: torch.dtype, device):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.kernels_fit = head_dim & (head_dim - 1) == 0    # the Triton kernels take power-of-two head dims
        self.rotary = rotary            # shared by all layers (the model computes cos/sin once)
        self.q_proj = Linear(heads * head_dim, hidden)
        self.k_proj = Linear(kv_heads * head_dim, hidden)
        self.v_proj = Linear(kv_heads * head_dim, hidden)
        self.o_proj = Linear(hidden, heads * head_dim)
        self.q_norm = RMSNorm(head_dim, eps, dtype, device)
        self.k_norm = RMSNorm(head_dim, eps, dtype, device)
        self.qkv: FusedLinear | None = None

    def finalize(self) -> None:
        if self.qkv is None:
            self.qkv = FusedLinear([self.q_proj, self.k_proj, self.v_proj],
                                   ["q_proj", "k_proj", "v_proj"], "qkv_proj")
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, positions: Tensor, cache: KVCache | None = None, layer_idx: int = 0,
                attn_mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, T, H], positions [B, T] int64 (RoPE positions = cache slots).
        attn_mask: None (no cache: plain causal; with cache: `cache.mask(positions)`), a padding
        mask [B, T] (no cache; 1 = real token), a ready [B, 1, T, S] bool mask, or TAIL (with a
        cache view of S slots: the tokens are at positions S-T .. S-1 in every row).
        rope: (cos, sin) [B, T, D] for `positions`, or tables [P, D] by position (Rotary.table),
        when the caller computed them once for all layers; else computed here."""
        B, T, _ = x.shape
        D = self.head_dim
        tail = attn_mask is TAIL
        if tail and cache is None:
            raise MixprecError("attn_mask=TAIL needs a KV cache (the tokens are its view's last T slots)")
        if not tail and attn_mask is not None and attn_mask.dim() == 2:
            if cache is not None:
                raise MixprecError("a [B, T] padding mask with a KV cache: call cache.set_start(positions, "
                                   "mask) and pass attn_mask=None")
            attn_mask = causal_mask(attn_mask, B, T, x.device)
        if cache is not None and use_kernels(x) and self.kernels_fit:
            return self._forward_cached_kernels(x, positions, cache, layer_idx, attn_mask, rope)
        q, k, v = self.qkv(x)
        q = self.q_norm(q.view(B, T, self.heads, D))
        k = self.k_norm(k.view(B, T, self.kv_heads, D))
        cos, sin = rope if rope is not None else self.rotary(positions, x.dtype)
        if cos.dim() == 2:                                              # a table by position
            cos, sin = cos[positions], sin[positions]
        q = apply_rope(q, cos, sin).transpose(1, 2)                     # [B, h, T, D]
        k = apply_rope(k, cos, sin).transpose(1, 2)                     # [B, kvh, T, D]
        v = v.view(B, T, self.kv_heads, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_idx, positions, k, v)             # [B, kvh, S, D]
            if attn_mask is None:
                attn_mask = cache.mask(positions)
        gqa = self.heads != self.kv_heads
        if tail or attn_mask is None:     # no cache, no mask: causal over the T tokens (S = T)
            o = tail_attention(q, k, v, gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * D))

    def _forward_cached_kernels(self, x: Tensor, positions: Tensor, cache: KVCache, layer_idx: int,
                                attn_mask: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Same as the readable path. Decode (T == 1, no explicit mask): q/k norm + RoPE + cache
        write + attention in one launch; prefill: the norm + RoPE + cache write launch, then SDPA."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        cos, sin = rope if rope is not None else self.rotary(positions, x.dtype)
        table = cos.dim() == 2                                          # by position, not per token
        kc, vc = cache.k[layer_idx], cache.v[layer_idx]                  # [B', kvh, S, D]
        nw = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        if cache.row_ids is not None:       # a mapped view: rows and prefix lengths read on the device
            q = qk_norm_rope_store(q, k, v, cos, sin, *nw, kc, vc, positions, rope_table=table, rows=cache.row_ids)
            o = prefill_attention(q, kc, vc, cache.row_ids, positions)
        elif T == 1 and attn_mask is None:
            o = decode_attention_new(q.view(B, -1), k.view(B, -1), v.view(B, -1), cos, sin, *nw, kc[:B], vc[:B],
                                     cache.start[:B], positions.reshape(B), rope_table=table)
        else:
            q = qk_norm_rope_store(q, k, v, cos, sin, *nw, kc, vc, positions, rope_table=table)   # [B, T, h, D]
            gqa = self.heads != self.kv_heads
            if attn_mask is TAIL:
                o = tail_attention(q.transpose(1, 2), kc[:B], vc[:B], gqa)
            else:
                mask = cache.mask(positions) if attn_mask is None else attn_mask
                o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:B], vc[:B], attn_mask=mask, enable_gqa=gqa)
            o = o.transpose(1, 2)
        with pdl.early_trigger(T == 1):   # decode: the norm / router after it reads only weights before its wait
            return self.o_proj(o.reshape(B, T, self.heads * self.head_dim))
