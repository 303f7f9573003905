"""Model arguments from config.json, and the mix configuration (both YAML forms)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a Qwen3 / Qwen3-MoE model, read from config.json (both spellings)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int            # dense MLP
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": ..., "original_max_position_embeddings": ...}
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, cfg: dict | str | Path) -> "ModelArgs":
        """From a config.json dict or path. Reads the published spelling (num_experts, rope_theta,
        torch_dtype) and the transformers>=5 one (num_local_experts, rope_parameters, dtype)."""
        where = ""
        if not isinstance(cfg, dict):
            p = Path(cfg)
            p = p / "config.json" if p.is_dir() else p
            where = str(p)
            try:
                cfg = json.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{p}: config.json not found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
        cfg = dict(cfg.get("text_config", cfg)) if "hidden_size" not in cfg else dict(cfg)
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6))
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") not in ("default", None):
            scaling = rope
        try:
            heads = cfg["num_attention_heads"]
            args = cls(
                vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                intermediate_size=cfg.get("intermediate_size", 0),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 40960),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                num_experts=cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0,
                num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
                moe_intermediate_size=cfg.get("moe_intermediate_size", 0) or 0,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
                mlp_only_layers=tuple(cfg.get("mlp_only_layers", ()) or ()),
                attention_bias=bool(cfg.get("attention_bias", False)),
                torch_dtype=str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))),
                extra=cfg,
            )
        except KeyError as e:
            raise ConfigError(f"{where or 'config.json'}: missing key {e.args[0]!r}") from None
        return args

    def identity(self) -> dict:
        """The fields two sources must agree on to describe the same model."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    intermediate_size=self.intermediate_size if any(
                        not self.is_moe_layer(l) for l in range(self.num_hidden_layers)) else None,
                    num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                    moe_intermediate_size=self.moe_intermediate_size,
                    mlp_only_layers=tuple(self.mlp_only_layers), decoder_sparse_step=self.decoder_sparse_step)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every linear module of the model (HF names) -> (N, K). The units a mix config assigns."""
        H, D = self.hidden_size, self.head_dim
        out: dict[str, tuple[int, int]] = {}
        for l in range(self.num_hidden_layers):
            p = f"model.layers.{l}"
            out[f"{p}.self_attn.q_proj"] = (self.num_attention_heads * D, H)
            out[f"{p}.self_attn.k_proj"] = (self.num_key_value_heads * D, H)
            out[f"{p}.self_attn.v_proj"] = (self.num_key_value_heads * D, H)
            out[f"{p}.self_attn.o_proj"] = (H, self.num_attention_heads * D)
            if self.is_moe_layer(l):
                I = self.moe_intermediate_size
                for e in range(self.num_experts):
                    q = f"{p}.mlp.experts.{e}"
                    out[f"{q}.gate_proj"] = (I, H)
                    out[f"{q}.up_proj"] = (I, H)
                    out[f"{q}.down_proj"] = (H, I)
            else:
                I = self.intermediate_size
                out[f"{p}.mlp.gate_proj"] = (I, H)
                out[f"{p}.mlp.up_proj"] = (I, H)
                out[f"{p}.mlp.down_proj"] = (H, I)
        out["lm_head"] = (self.vocab_size, H)
        return out

    def plain_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors that are never quantized (embeddings, norms, routers) -> shape."""
        H, D = self.hidden_size, self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, H),
                                           "model.norm.weight": (H,)}
        for l in range(self.num_hidden_layers):
            p = f"model.layers.{l}"
            out[f"{p}.input_layernorm.weight"] = (H,)
            out[f"{p}.post_attention_layernorm.weight"] = (H,)
            out[f"{p}.self_attn.q_norm.weight"] = (D,)
            out[f"{p}.self_attn.k_norm.weight"] = (D,)
            if self.is_moe_layer(l):
                out[f"{p}.mlp.gate.weight"] = (self.num_experts, H)
        return out
