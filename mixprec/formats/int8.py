"""The `int8` layout: `weight [N, K]` int8, `scale [N, 1]` fp32, optional `zero [N, 1]` fp32
(per-output-channel; per-tensor checkpoints are expanded to [N, 1] at load).
Checkpoint formats that land here: compressed-tensors `int-quantized` / `naive-quantized`
(`ct_int8`, in compressed_tensors.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Layout, Packed, register_layout, shard_range, use_kernels


@register_layout
class Int8Layout(Layout):
    name = "int8"

    def dequant(self, w: Packed) -> Tensor:
        q = w.weight.float()
        if "zero" in w.tensors():
            q = q - w.zero
        return w.scale * q

    def apply(self, x: Tensor, w: Packed) -> Tensor:
        if use_kernels(x):
            from ..kernels.int8 import int8_linear
            t = w.tensors()
            y = int8_linear(x.reshape(-1, w.k), w.weight, w.scale, t.get("zero"), w.params["act"])
            return y.reshape(*x.shape[:-1], w.n)
        return torch.nn.functional.linear(x, self.dequant(w).to(x.dtype))

    def cat_n(self, ws: list[Packed]) -> Packed | None:
        if any(w.k != ws[0].k or w.params != ws[0].params for w in ws):
            return None
        out = {"weight": torch.cat([w.weight for w in ws], dim=-2),
               "scale": torch.cat([w.scale for w in ws], dim=-2)}
        if any("zero" in w.tensors() for w in ws):  # a symmetric part gets explicit zeros 0 (exact)
            out["zero"] = torch.cat([w.tensors().get("zero", torch.zeros_like(w.scale)) for w in ws], dim=-2)
        return Packed("int8", sum(w.n for w in ws), ws[0].k, out, ws[0].params, ws[0].source)

    def shard(self, w: Packed, dim: str, rank: int, world: int) -> Packed:
        """N split slices rows of weight/scale/zero; K split slices columns, scale/zero whole."""
        a, b = shard_range(w, dim, rank, world)
        t = w.tensors()
        if dim == "n":
            out = {name: x[..., a:b, :].contiguous() for name, x in t.items()}
            return Packed("int8", b - a, w.k, out, w.params, w.source)
        out = {name: (x[..., :, a:b].contiguous() if name == "weight" else x) for name, x in t.items()}
        return Packed("int8", w.n, b - a, out, w.params, w.source)
