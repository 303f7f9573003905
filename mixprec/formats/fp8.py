"""FP8 (e4m3fn) weights with block / channel / tensor scales: the `fp8` layout, and the
`fp8_block` checkpoint format of Qwen3-*-FP8 and DeepSeek (`weight` + `weight_scale_inv`).

The compressed-tensors / AutoFP8 spelling (`weight_scale`) is `ct_fp8` in compressed_tensors.py;
both load into this layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from .base import (CheckpointFormat, Layout, Packed, register_format, register_layout, shard_range, sub_blocks,
                   use_kernels)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expand_blocks(scale: Tensor, bn: int, bk: int, n: int, k: int) -> Tensor:
    """scale [..., ceil(n/bn), ceil(k/bk)] -> per-element [..., n, k] (float32)."""
    s = scale.float().repeat_interleave(bn, dim=-2)[..., :n, :]
    return s.repeat_interleave(bk, dim=-1)[..., :k]


def block_amax(W: Tensor, bn: int, bk: int) -> Tensor:
    """max |W| per (bn x bk) block of W [N, K] -> [ceil(N/bn), ceil(K/bk)]; zero padding is harmless."""
    n, k = W.shape
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    Wp = torch.nn.functional.pad(W.float().abs(), (0, kb * bk - k, 0, nb * bn - n))
    return Wp.reshape(nb, bn, kb, bk).amax(dim=(1, 3))


def quant_fp8(W: Tensor, bn: int, bk: int, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """RTN FP8 of W [N, K] with one scale per (bn x bk) block: (codes e4m3 [N, K], scale
    [ceil(N/bn), ceil(K/bk)] in scale_dtype) such that W ~= codes * scale. Codes are computed
    from the scale as stored (e.g. bf16-rounded), so dequant with the stored scale is exact to fp8."""
    n, k = W.shape
    scale = (block_amax(W, bn, bk) / E4M3_MAX).to(scale_dtype)
    scale = scale.clamp(min=torch.finfo(scale_dtype).tiny)    # after the cast: 1e-12 is 0 in fp16 (0/0 codes)
    codes = (W.float() / expand_blocks(scale, bn, bk, n, k)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def check_block(block, where: str) -> tuple[int, int]:
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(f"{where}: block size {block!r}, expected two positive ints [rows of N, cols of K]")
    return int(block[0]), int(block[1])


def check_scale_dtype(t: Tensor, name: str) -> Tensor:
    if t.dtype not in SCALE_DTYPES:
        raise FormatError(f"{name}: dtype {t.dtype}, expected float32, bfloat16 or float16")
    return t.float()


def check_fp8_weight(w: Tensor, n: int, k: int, name: str) -> Tensor:
    if w.dtype != E4M3:
        raise FormatError(f"{name}: dtype {w.dtype}, expected float8_e4m3fn")
    if tuple(w.shape) != (n, k):
        raise ShapeMismatch(f"{name}: shape {tuple(w.shape)}, expected {(n, k)}")
    return w


@register_layout
class FP8Layout(Layout):
    """`weight [..., N, K]` e4m3 + `scale [..., ceil(N/bn), ceil(K/bk)]` fp32; params block, act."""
    name = "fp8"

    def dequant(self, w: Packed) -> Tensor:
        bn, bk = w.params["block"]
        return w.weight.float() * expand_blocks(w.scale, bn, bk, w.n, w.k)

    def apply(self, x: Tensor, w: Packed) -> Tensor:
        if use_kernels(x):
            from ..kernels.fp8 import ACT_BLOCK, fp8_linear
            bn, bk = w.params["block"]
            act = w.params["act"]
            if act == "w8a8" and bk < w.k and bk % ACT_BLOCK:
                # weight blocks narrower than the 128-wide activation groups (small fixtures, TP
                # shards of I=768 at TP4): keep the activations in 16 bit for this weight
                act = "w8a16"
            y = fp8_linear(x.reshape(-1, w.k), w.weight, w.scale, w.params["block"], act)
            return y.reshape(*x.shape[:-1], w.n)
        return torch.nn.functional.linear(x, self.dequant(w).to(x.dtype))

    def cat_n(self, ws: list[Packed]) -> Packed | None:
        ws = [per_channel(w) if w.params["block"] == (w.n, w.k) and len(ws) > 1 else w for w in ws]
        p0 = ws[0].params
        if any(w.k != ws[0].k or w.params != p0 for w in ws):
            return None
        bn = p0["block"][0]
        if any(w.n % bn for w in ws[:-1]):  # a block would straddle the seam
            return None
        return Packed("fp8", sum(w.n for w in ws), ws[0].k,
                      {"weight": torch.cat([w.weight for w in ws], dim=-2),
                       "scale": torch.cat([w.scale for w in ws], dim=-2)}, p0, ws[0].source)

    def shard(self, w: Packed, dim: str, rank: int, world: int) -> Packed:
        """Equal slices of N or K. A block straddling two ranks is split into sub-blocks of
        gcd(block, start, length) rows/cols whose scale rows are replicated from the original
        block (e.g. N=768, bn=128, TP4 -> 192 rows per rank, block 64, rank 1 gets scale rows
        [1, 2, 2]); dequant of the shard is then bit-identical to the slice of the full dequant."""
        a, b = shard_range(w, dim, rank, world)
        bn, bk = w.params["block"]
        if dim == "n":
            nb, idx = sub_blocks(bn, w.n, a, b - a)
            weight, scale, block = w.weight[..., a:b, :], w.scale[..., idx, :], (nb, bk)
            n, k = b - a, w.k
        else:
            nb, idx = sub_blocks(bk, w.k, a, b - a)
            weight, scale, block = w.weight[..., :, a:b], w.scale[..., :, idx], (bn, nb)
            n, k = w.n, b - a
        return Packed("fp8", n, k, {"weight": weight.contiguous(), "scale": scale.contiguous()},
                      {**w.params, "block": block}, w.source)


def per_channel(w: Packed) -> Packed:
    """A per-tensor fp8 weight (block (N, K)) as the equivalent per-channel one (block (1, K))."""
    scale = w.scale.expand(*w.scale.shape[:-2], w.n, 1).contiguous()
    return Packed("fp8", w.n, w.k, {"weight": w.weight, "scale": scale}, {**w.params, "block": (1, w.k)}, w.source)


@register_format
class FP8Block(CheckpointFormat):
    """Qwen3-*-FP8 / DeepSeek-V3: `weight [N, K]` e4m3 + `weight_scale_inv [ceil(N/bn), ceil(K/bk)]`
    (a multiplier despite the name; fp32, bf16 or fp16). Block from `weight_block_size`
    (default [128, 128]). Activations are quantized dynamically per token and 128-wide K slice
    ("w8a8"); with activation_scheme "static" a stored `input_scale` is accepted but not used
    (dynamic scales are at least as accurate)."""
    name = "fp8_block"
    layout = "fp8"
    suffixes = ("weight", "weight_scale_inv", "input_scale")
    codes = ("weight", 0, 1)
    required = ("weight", "weight_scale_inv")

    def detect(self, tensors, qcfg) -> bool:
        return "weight_scale_inv" in tensors and "weight" in tensors and tensors["weight"][0] == E4M3

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        q = qcfg or {}
        bn, bk = check_block(q.get("weight_block_size") or [128, 128], f"{where} weight_block_size")
        w = check_fp8_weight(raw["weight"], n, k, f"{where}.weight")
        s = check_scale_dtype(raw["weight_scale_inv"], f"{where}.weight_scale_inv")
        if tuple(s.shape) != (cdiv(n, bn), cdiv(k, bk)):
            raise ShapeMismatch(f"{where}.weight_scale_inv: shape {tuple(s.shape)}, expected "
                                f"{(cdiv(n, bn), cdiv(k, bk))} for weight {(n, k)} in blocks [{bn}, {bk}]")
        scheme = q.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise FormatError(f"{where}: activation_scheme {scheme!r}, expected 'dynamic' or 'static'")
        return Packed("fp8", n, k, {"weight": w.contiguous(), "scale": s.contiguous()},
                      {"block": (bn, bk), "act": "w8a8"}, self.name)

    @staticmethod
    def _params(block=(128, 128), scale_dtype=torch.float32, activation_scheme="dynamic",
                ignored_layers=None) -> dict:
        bn, bk = check_block(tuple(block), "fp8_block block")
        if scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"fp8_block scale_dtype {scale_dtype}, expected one of {SCALE_DTYPES}")
        return dict(block=(bn, bk), scale_dtype=scale_dtype, activation_scheme=activation_scheme,
                    ignored_layers=ignored_layers)

    def quantize(self, W: Tensor, **params) -> dict[str, Tensor]:
        """{"codes": e4m3 [N, K], "scale": [ceil(N/bn), ceil(K/bk)] in scale_dtype}."""
        p = self._params(**params)
        codes, scale = quant_fp8(W, *p["block"], p["scale_dtype"])
        return {"codes": codes, "scale": scale}

    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        q = self.quantize(W, **params)
        return {"weight": q["codes"], "weight_scale_inv": q["scale"]}

    def config_block(self, **params) -> dict:
        p = self._params(**params)
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": p["activation_scheme"],
               "weight_block_size": list(p["block"])}
        if p["ignored_layers"]:
            cfg["ignored_layers"] = list(p["ignored_layers"])
        return cfg
