"""RMSNorm and rotary position embeddings (default, linear, YaRN), as transformers computes them."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..formats.base import use_kernels
from ..kernels import norm as kernels_norm


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen3RMSNorm: normalise in fp32, cast back, then scale (in that order, like transformers)."""
    if use_kernels(x):
        return kernels_norm.rms_norm(x, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h = x + residual; returns (rms_norm(h), h). One launch on the kernel path."""
    if use_kernels(x):
        return kernels_norm.rms_norm(x, weight, eps, residual=residual)
    h = x + residual
    return rms_norm(h, weight, eps), h


class RMSNorm(nn.Module):
    """`weight [dim]` is a buffer, set by the loader (`Qwen3ForCausalLM.set_tensor`)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor, residual: Tensor | None = None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_parameters(head_dim: int, rope_theta: float, rope_scaling: dict | None,
                    max_position_embeddings: int) -> tuple[Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention_factor) for the model's rope config.

    Mirrors transformers' `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`
    and `_compute_yarn_parameters` (modeling_rope_utils.py). The attention factor multiplies both
    cos and sin, so attention logits scale by its square, as in transformers.
    """
    s = dict(rope_scaling or {})
    kind = s.get("rope_type", s.get("type", "default")) or "default"
    if float(s.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"rope_scaling: partial_rotary_factor={s['partial_rotary_factor']} is not supported "
                          f"(Qwen3 rotates the whole head)")
    dim = head_dim
    base = float(rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)   # [dim/2]
    if kind == "default":
        return 1.0 / pos_freqs, 1.0
    if kind == "linear":
        return 1.0 / pos_freqs / float(s["factor"]), 1.0
    if kind != "yarn":
        raise ConfigError(f"rope_scaling: rope_type {kind!r} is not supported (expected default, linear or yarn)")

    orig = int(s.get("original_max_position_embeddings") or max_position_embeddings)
    factor = s.get("factor")
    if factor is None:
        factor = max_position_embeddings / orig
    factor = float(factor)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                       # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp                # 1 for high-frequency dims (kept), 0 for interpolated ones
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin tables computed from positions on the fly (no cache to outgrow, graph friendly)."""

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        inv_freq, self.attention_factor = rope_parameters(head_dim, rope_theta, rope_scaling,
                                                          max_position_embeddings)
        # always a real (CPU) tensor, even for a meta-device model; moved with the model
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """Follow device moves, not dtype casts: model.half() would round the frequencies to fp16
        (the angle error grows with position: cos off by 1.8 at 30k tokens)."""
        f32 = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = f32.to(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] long -> cos, sin [B, T, head_dim] in `dtype` (transformers casts too)."""
        freqs = positions[..., None].float() * self.inv_freq           # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

    def table(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """cos, sin [P, head_dim] for positions 0..P-1 (P >= n, a power of two), row p bit-equal to
        forward(p) (the same elementwise ops on the same values), built once and kept: a cached
        decode step reads its rows by position instead of recomputing them (~7 small launches per
        step). None while a CUDA graph is being captured and no table is long enough (building one
        inside a capture would tie it to the graph's memory); the caller then takes forward()."""
        have = self.__dict__.setdefault("_tables", [])
        dev = self.inv_freq.device
        for t in reversed(have):
            if t[0].shape[0] >= n and t[0].dtype == dtype and t[0].device == dev:
                return t
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        P = 1 << max(n - 1, 1).bit_length()
        cos, sin = self(torch.arange(P, device=dev)[None], dtype)
        # every table stays alive: captured graphs hold the address of the one they read
        have.append((cos[0], sin[0]))
        return have[-1]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, heads, D]; cos/sin [B, T, D]. Rotate-half convention (first half pairs with second)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
