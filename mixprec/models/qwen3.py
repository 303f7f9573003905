"""Qwen3 and Qwen3-MoE causal LM in one file. Module names mirror transformers, so the HF name
of every weight resolves: `model.layers.0.self_attn.q_proj`, `model.layers.1.mlp.gate`, `lm_head`.

Life cycle: build (normally on the meta device) -> `set_linear` / `set_tensor` for every weight
-> `finalize()` (checks completeness and devices, fuses q|k|v and gate|up where formats agree,
stacks experts into format buckets) -> `forward`.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError, MissingWeight, MixprecError, ShapeMismatch
from ..formats.base import Packed
from ..layers.attention import TAIL, Attention, KVCache, causal_mask, decode_kernel
from ..layers.linear import FusedLinear, Linear
from ..layers.moe import MoE
from ..layers.norm import RMSNorm, Rotary

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj")
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab, hidden, dtype=dtype, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class MLP(nn.Module):
    """Dense SwiGLU MLP (Qwen3MLP): down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(intermediate, hidden)
        self.up_proj = Linear(intermediate, hidden)
        self.down_proj = Linear(hidden, intermediate)
        self.gate_up: FusedLinear | None = None

    def finalize(self) -> None:
        if self.gate_up is None:
            self.gate_up = FusedLinear([self.gate_proj, self.up_proj], ["gate_proj", "up_proj"], "gate_up_proj")
            del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        g, u = self.gate_up(x)
        return self.down_proj(F.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, rotary: Rotary, dtype: torch.dtype, device):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps, dtype, device)
        self.self_attn = Attention(H, args.num_attention_heads, args.num_key_value_heads, args.head_dim, eps,
                                   rotary, dtype, device)
        self.post_attention_layernorm = RMSNorm(H, eps, dtype, device)
        if args.is_moe_layer(layer):
            self.mlp = MoE(H, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                           args.norm_topk_prob, dtype, device, name=f"model.layers.{layer}.mlp")
        else:
            self.mlp = MLP(H, args.intermediate_size)

    def forward(self, x: Tensor, residual: Tensor | None, positions: Tensor, cache: KVCache | None,
                layer_idx: int, mask: Tensor | None, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The layer's output is x_out + residual_out, returned unsummed: the next norm adds them
        in the same launch (h = x + residual, as transformers rounds it)."""
        if residual is None:
            y, residual = self.input_layernorm(x), x
        else:
            y, residual = self.input_layernorm(x, residual)
        a = self.self_attn(y, positions, cache, layer_idx, mask, rope)
        if isinstance(self.mlp, MoE):     # the add + norm may run inside the router's launch
            return self.mlp.forward_norm(self.post_attention_layernorm, a, residual)
        y, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(y), residual


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, device):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size, dtype, device)
        self.rotary = Rotary(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(args, l, self.rotary, dtype, device)
                                    for l in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)


def _check_supported(args: ModelArgs) -> None:
    x = args.extra or {}
    if args.attention_bias:
        raise ConfigError("config.json: attention_bias=true is not supported (Qwen3 has no q/k/v/o bias)")
    if x.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act={x['hidden_act']!r}, only 'silu' is supported")
    if x.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not supported")
    if args.num_experts and any(args.is_moe_layer(l) for l in range(args.num_hidden_layers)):
        if not (0 < args.num_experts_per_tok <= args.num_experts) or args.moe_intermediate_size <= 0:
            raise ConfigError(f"config.json: num_experts_per_tok={args.num_experts_per_tok}, "
                              f"moe_intermediate_size={args.moe_intermediate_size} are invalid for "
                              f"{args.num_experts} experts")


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 / Qwen3-MoE causal LM over Packed weights of any layout.

    Loading: `set_linear(hf_module_name, packed, input_scale=None)`, `set_tensor(hf_tensor_name, t)`,
    then `finalize()`. `forward(input_ids, positions, cache, attn_mask, logits_index)` -> fp32 logits.
    """

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.bfloat16, device="meta"):
        super().__init__()
        _check_supported(args)
        self.args = args
        self.model = Qwen3Model(args, dtype, device)
        self.lm_head = Linear(args.vocab_size, args.hidden_size)
        self._linear_shapes = {n: s for n, s in args.linear_shapes().items() if not _EXPERT.fullmatch(n)}
        self._plain_shapes = args.plain_tensors()
        self._plain_set: set[str] = set()
        self.finalized = False

    # -- loading ---------------------------------------------------------------------------
    def set_linear(self, name: str, w: Packed, input_scale: Tensor | None = None) -> None:
        """Weight of the linear `name` (HF module name, e.g. "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.experts.3.up_proj", "lm_head"). `input_scale [K]`: optional per-input
        -channel factor applied to x before this linear (folded-norm correction)."""
        if self.finalized:
            raise MixprecError(f"{name}: model already finalized")
        m = _EXPERT.fullmatch(name)
        if m:
            layer, e, proj = int(m[1]), int(m[2]), m[3]
            mlp = self.model.layers[layer].mlp if layer < len(self.model.layers) else None
            if not isinstance(mlp, MoE):
                raise CheckpointError(f"{name}: layer {layer} has no experts in this model")
            mlp.set_expert(e, proj, w, input_scale)
            return
        if name not in self._linear_shapes:
            raise CheckpointError(f"{name}: not a linear of this model")
        n, k = self._linear_shapes[name]
        if (w.n, w.k) != (n, k):
            raise ShapeMismatch(f"{name}: weight is [{w.n}x{w.k}], expected [{n}x{k}]")
        if input_scale is not None and tuple(input_scale.shape) != (k,):
            raise ShapeMismatch(f"{name}: input_scale shape {tuple(input_scale.shape)}, expected ({k},)")
        self.get_submodule(name).set(w, input_scale)

    def set_tensor(self, name: str, t: Tensor) -> None:
        """A plain tensor by HF name (norms, embeddings, routers; "lm_head.weight" for an
        unquantized head). Cast to the model dtype, kept on t's device."""
        if self.finalized:
            raise MixprecError(f"{name}: model already finalized")
        if name == "lm_head.weight":
            V, H = self.args.vocab_size, self.args.hidden_size
            if tuple(t.shape) != (V, H):
                raise ShapeMismatch(f"{name}: shape {tuple(t.shape)}, expected {(V, H)}")
            w = t.to(self.dtype).contiguous()
            self.set_linear("lm_head", Packed("dense", V, H, {"weight": w}, source=_DTYPE_NAME.get(t.dtype, "")))
            return
        if name not in self._plain_shapes:
            raise CheckpointError(f"{name}: not a plain tensor of this model")
        if tuple(t.shape) != tuple(self._plain_shapes[name]):
            raise ShapeMismatch(f"{name}: shape {tuple(t.shape)}, expected {tuple(self._plain_shapes[name])}")
        if not t.is_floating_point():
            raise ShapeMismatch(f"{name}: dtype {t.dtype}, expected a floating-point tensor")
        mod, attr = name.rsplit(".", 1)
        setattr(self.get_submodule(mod), attr, t.to(self.dtype).contiguous())
        self._plain_set.add(name)

    def missing(self) -> list[str]:
        """HF names of every weight not set yet (plain tensors as tensor names, linears as module names)."""
        if self.finalized:
            return []
        out = [n for n in self._plain_shapes if n not in self._plain_set]
        for name in self._linear_shapes:
            if name == "lm_head" and self.args.tie_word_embeddings:
                continue
            if self.get_submodule(name).weight is None:
                out.append(name)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                out += layer.mlp.missing()
        return out

    def finalize(self) -> None:
        """Check every weight is set and on one device, then fuse and bucket. Raises MissingWeight."""
        if self.finalized:
            return
        miss = self.missing()
        if miss:
            raise MissingWeight(f"{len(miss)} weights not set: " + ", ".join(miss))
        emb = self.model.embed_tokens.weight
        if self.lm_head.weight is None:          # tied: the head reads the embedding (no copy)
            self.lm_head.set(Packed("dense", emb.shape[0], emb.shape[1], {"weight": emb}, source="tied"))
        self.model.rotary.to(emb.device)
        for nm, b in self.named_buffers():
            if b.device != emb.device:
                raise CheckpointError(f"{nm}: on {b.device}, but model.embed_tokens.weight is on {emb.device}")
        for layer in self.model.layers:
            layer.self_attn.finalize()
            layer.mlp.finalize()
        self.finalized = True

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the embedding's, so it follows model.half() / .to(dtype) (the KV cache
        is made in it)."""
        return self.model.embed_tokens.weight.dtype

    # -- use -------------------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, max_len, a.head_dim, self.dtype,
                       device or self.model.embed_tokens.weight.device)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                attn_mask: Tensor | None = None, logits_index: Tensor | None = None,
                float_logits: bool = True, tail: bool = False) -> Tensor:
        """input_ids [B, T] -> logits [B, T, V] float32 (float_logits=False: in the lm_head's
        dtype, no cast: the decode step's next-token kernel reads them so).

        positions [B, T] int64: RoPE positions and KV-cache slots (default arange(T); required
        with a cache). attn_mask [B, T] (1 = real token): without a cache, a padding mask; with a
        cache, the prefill's padding mask, which sets `cache.start` (first valid slot of each row,
        kept for the following decode steps, which pass None). logits_index [B] or [B, n]: only
        the logits of those token indices are computed -> [B, 1, V] or [B, n, V]. tail (with a
        cache view of S slots): every row's tokens are at positions S-T .. S-1, after valid slots
        0 .. S-T-1 (a right-padded prefill: S = T; the rest of a prompt after a reused prefix):
        causal attention without a mask tensor (flash kernels). A mapped cache view
        (`cache.mapped(row_ids)`): sequence b's tokens go to row row_ids[b] at its positions and
        attend over slots 0 .. position.
        No host syncs: the decode step can be captured in a CUDA graph (given a fused MoE kernel).
        """
        if not self.finalized:
            raise MixprecError("Qwen3ForCausalLM: call finalize() after setting the weights")
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise MixprecError("forward with a KV cache needs explicit positions [B, T]")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)                         # [B, T, H]
        # cos, sin: a table [P, D] by position for a cached forward, else [B, T, D]
        rope = self.model.rotary.table(cache.max_len, h.dtype) if cache is not None else None
        rope = rope or self.model.rotary(positions, h.dtype)
        if cache is not None:
            mapped = cache.row_ids is not None
            if (attn_mask is not None) + tail + mapped > 1:
                raise MixprecError("forward: a padding mask, tail=True and a mapped cache view exclude each other "
                                   "(tail: the tokens follow the view's valid slots, no padding mask)")
            if attn_mask is not None:
                cache.set_start(positions, attn_mask)
            # the decode kernel reads cache.start and positions itself; a mapped view's attention, positions
            mask = None if mapped or decode_kernel(h, cache) else TAIL if tail else cache.mask(positions)   # [B, 1, T, S]
        else:
            mask = causal_mask(attn_mask, B, T, h.device)              # [B, 1, T, T] or None
        res = None
        for i, layer in enumerate(self.model.layers):
            h, res = layer(h, res, positions, cache, i, mask, rope)
        if logits_index is not None:
            idx = logits_index if logits_index.dim() == 2 else logits_index[:, None]
            h, res = (t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])) for t in (h, res))
        logits = self.lm_head(self.model.norm(h, res)[0])
        return logits.float() if float_logits else logits

    def linear_modules(self) -> dict[str, Packed]:
        """After finalize: every Packed the model runs, by name. Fused weights use SGLang names
        ("...self_attn.qkv_proj", "...mlp.gate_up_proj"); unfused parts keep HF names; expert
        stacks are "...mlp.buckets.<i>.<proj>" (Packed with leading [E_b]); a tied head is
        "lm_head" sharing the embedding's storage."""
        out: dict[str, Packed] = {}
        for l, layer in enumerate(self.model.layers):
            p = f"model.layers.{l}"
            out.update(layer.self_attn.qkv.named_packed(f"{p}.self_attn"))
            out[f"{p}.self_attn.o_proj"] = layer.self_attn.o_proj.weight
            if isinstance(layer.mlp, MoE):
                out.update(layer.mlp.named_packed())
            else:
                out.update(layer.mlp.gate_up.named_packed(f"{p}.mlp"))
                out[f"{p}.mlp.down_proj"] = layer.mlp.down_proj.weight
        out["lm_head"] = self.lm_head.weight
        return out
