"""Linear layers over a Packed weight of any layout; fusion along N (qkv, gate+up) where layouts allow.

A layer never looks at a format name: `formats.base.apply` / `dequant` dispatch on the weight's
layout, and `formats.base.cat_n` asks that layout whether parts can be concatenated along N
(None for different layouts, params, dtypes, act-order perms, blocks straddling the seam).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import formats as _formats  # noqa: F401  (its __init__ imports every format file: registers the layouts)
from ..formats.base import Packed, apply, cat_n  # cat_n: the layout decides; None when it can't


def bucket_key(w: Packed) -> tuple:
    """Packed.key() plus buffer dtypes: a bf16 and an fp16 dense weight have equal key() but
    must not be stacked or concatenated (torch.stack/cat would silently promote)."""
    return w.key() + (tuple((nm, str(t.dtype)) for nm, t in sorted(w.tensors().items())),)


def same_scale(scales: list[Tensor | None]) -> bool:
    """Input scales agree (all absent, or all equal). Load time only: torch.equal syncs."""
    if all(s is None for s in scales):
        return True
    if any(s is None for s in scales):
        return False
    return all(s.shape == scales[0].shape and torch.equal(s, scales[0]) for s in scales[1:])


class Linear(nn.Module):
    """y = (x * input_scale) @ W.T with W a Packed of any layout, set after construction.

    `input_scale [k]` (optional) is the per-input-channel factor the loader supplies when a
    weight's source folded activation scales into its norm (AWQ / SmoothQuant, FORMATS.md)."""

    def __init__(self, n: int, k: int):
        super().__init__()
        self.n, self.k = n, k
        self.register_module("weight", None)
        self.register_buffer("input_scale", None, persistent=False)

    def set(self, w: Packed, input_scale: Tensor | None = None) -> None:
        self.weight = w
        self.input_scale = input_scale

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return apply(x, self.weight)


class FusedLinear(nn.Module):
    """Several linears reading the same input (q|k|v, gate|up). Holds one Linear over the
    N-concatenated weight when `cat_n` succeeds and input scales agree, else the parts as given.
    forward returns the list of per-part outputs either way."""

    def __init__(self, parts: list[Linear], names: list[str], fused_name: str):
        super().__init__()
        self.names, self.fused_name = list(names), fused_name
        self.sizes = [p.n for p in parts]
        scales = [p.input_scale for p in parts]
        w = cat_n([p.weight for p in parts]) if same_scale(scales) else None
        if w is not None:
            self.fused = Linear(sum(self.sizes), parts[0].k)
            self.fused.set(w, scales[0])
            self.parts = None
        else:
            self.fused = None
            self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.fused is not None:
            return list(self.fused(x).split(self.sizes, dim=-1))
        return [p(x) for p in self.parts]

    def named_packed(self, prefix: str) -> dict[str, Packed]:
        """{prefix.fused_name: W} when fused, else {prefix.name_i: W_i}."""
        if self.fused is not None:
            return {f"{prefix}.{self.fused_name}": self.fused.weight}
        return {f"{prefix}.{nm}": p.weight for nm, p in zip(self.names, self.parts)}
