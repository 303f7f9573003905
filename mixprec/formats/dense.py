"""Plain floating-point weights (bf16 / fp16 / fp32): `weight [N, K]`."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from .base import CheckpointFormat, Layout, Packed, register_format, register_layout, shard_range

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@register_layout
class DenseLayout(Layout):
    name = "dense"

    def dequant(self, w: Packed) -> Tensor:
        return w.weight.float()

    def apply(self, x: Tensor, w: Packed) -> Tensor:
        return torch.nn.functional.linear(x, w.weight.to(x.dtype))

    def cat_n(self, ws: list[Packed]) -> Packed | None:
        if any(w.k != ws[0].k or w.weight.dtype != ws[0].weight.dtype for w in ws):
            return None
        return Packed("dense", sum(w.n for w in ws), ws[0].k,
                      {"weight": torch.cat([w.weight for w in ws], dim=-2)}, ws[0].params, ws[0].source)

    def shard(self, w: Packed, dim: str, rank: int, world: int) -> Packed:
        a, b = shard_range(w, dim, rank, world)
        t = w.weight[..., a:b, :] if dim == "n" else w.weight[..., :, a:b]
        n, k = (b - a, w.k) if dim == "n" else (w.n, b - a)
        return Packed("dense", n, k, {"weight": t.contiguous()}, w.params, w.source)


@register_format
class Dense(CheckpointFormat):
    """Unquantized weight. Loaded in the dtype the model computes in (`dtype` in qcfg, else as stored)."""
    name = "dense"
    layout = "dense"
    suffixes = ("weight",)
    codes = ("weight", 0, 1)

    def detect(self, tensors, qcfg) -> bool:
        return set(tensors) <= {"weight", "bias"} and "weight" in tensors and tensors["weight"][0] in FLOAT_DTYPES

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        w = raw["weight"]
        if w.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{where}.weight: dtype {w.dtype}, expected one of bf16/fp16/fp32")
        if tuple(w.shape) != (n, k):
            raise ShapeMismatch(f"{where}.weight: shape {tuple(w.shape)}, expected {(n, k)}")
        dtype = (qcfg or {}).get("dtype")
        src = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[w.dtype]
        return Packed("dense", n, k, {"weight": w.to(dtype) if dtype else w}, {}, src)

    def pack(self, W: Tensor, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
        return {"weight": W.to(dtype).contiguous()}

    def config_block(self, **params) -> dict:
        return {}
