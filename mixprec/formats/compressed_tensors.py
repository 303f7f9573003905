"""compressed-tensors (llm-compressor) checkpoints, and AutoFP8's FP8 spelling.

    ct_fp8   `float-quantized` / AutoFP8: weight e4m3 [N, K] + weight_scale [1] (tensor),
             [N, 1] (channel) or [ceil(N/bn), ceil(K/bk)] (block); optional input_scale   -> fp8
    ct_pack  `pack-quantized` W4A16 / W8A16: weight_packed [N, ceil(K*b/32)] int32 (packed
             along K, value i of a word in bits b*i.., stored code = signed + 2^(b-1)),
             weight_shape [2], weight_scale [N, K/G] (or [N, 1]), asym weight_zero_point
             [ceil(N*b/32), K/G] int32 packed along N (signed zero + 2^(b-1)), optional
             weight_g_idx [K]                                                              -> intq
    ct_int8  `int-quantized` / `naive-quantized`: weight int8 [N, K] + weight_scale [N, 1] or
             [1], optional weight_zero_point (int8, like the scale)                        -> int8

Static activation scales (input_scale / input_zero_point) are accepted and not used: fp8
activations are quantized dynamically per token anyway; int8 with static activations runs as
w8a16 (only dynamic per-token activation schemes run as w8a8).
The packing follows compressed_tensors' pack_to_int32 / unpack_from_int32 and
PackedQuantizationCompressor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FormatError, MissingWeight, ShapeMismatch
from .base import CheckpointFormat, Packed, register_format
from .fp8 import E4M3, E4M3_MAX, SCALE_DTYPES, cdiv, check_block, check_fp8_weight, check_scale_dtype, quant_fp8
from .gptq import check_tensor
from .intq import BITS, act_order_gidx, make_intq, pack_int32, rtn_int, unpack_int32

CT_VERSION = "0.10.2"
DEFAULT_IGNORE = ("lm_head", "re:.*mlp.gate$")


def qargs(num_bits: int, type_: str, symmetric: bool, strategy: str, group_size: int | None = None,
          block_structure=None, dynamic: bool | str = False, actorder: str | None = None,
          observer: str | None = "minmax") -> dict:
    """A compressed-tensors QuantizationArgs as serialized in config.json."""
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None if block_structure is None else list(block_structure),
            "dynamic": dynamic, "actorder": actorder, "observer": observer, "observer_kwargs": {}}


def ct_config(fmt: str, weights: dict, input_activations: dict | None, ignore=DEFAULT_IGNORE,
              targets=("Linear",)) -> dict:
    """The `quantization_config` llm-compressor writes (one config group)."""
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "version": CT_VERSION, "global_compression_ratio": None, "kv_cache_scheme": None,
            "sparsity_config": {}, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": list(targets), "weights": weights,
                                          "input_activations": input_activations,
                                          "output_activations": None, "format": fmt}}}


def weight_args(q: dict) -> dict:
    return (q or {}).get("weights") or {}


def check_strategy(found: str, q: dict, where: str) -> None:
    want = weight_args(q).get("strategy")
    if want is not None and want != found:
        raise FormatError(f"{where}: weight_scale shape says strategy {found!r} but the config says {want!r}")


def check_input_scale(raw: dict, where: str) -> None:
    for name in ("input_scale", "input_zero_point"):
        if name in raw and raw[name].numel() < 1:
            raise ShapeMismatch(f"{where}.{name}: empty tensor")


def group_actorder(weights: dict) -> bool:
    """compressed-tensors' actorder that stores a g_idx: 'group', and its aliases 'dynamic' and
    true (QuantizationArgs validates both to GROUP); 'weight' / 'static' keep natural groups."""
    return weights.get("actorder") in ("group", "dynamic", True)


# --------------------------------------------------------------------------------------------
# FP8

@register_format
class CTFP8(CheckpointFormat):
    """FP8 with `weight_scale`: compressed-tensors float-quantized (tensor / channel / block,
    strategy cross-checked with the config group) or AutoFP8 (quant_method "fp8", per-tensor
    scalar scale). act: "w8a8" when the scheme quantizes input activations, else "w8a16"."""
    name = "ct_fp8"
    layout = "fp8"
    suffixes = ("weight", "weight_scale", "input_scale")
    codes = ("weight", 0, 1)
    required = ("weight", "weight_scale")

    def detect(self, tensors, qcfg) -> bool:
        return ("weight" in tensors and tensors["weight"][0] == E4M3 and "weight_scale_inv" not in tensors)

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        q = qcfg or {}
        w = check_fp8_weight(raw["weight"], n, k, f"{where}.weight")
        s = check_scale_dtype(raw["weight_scale"], f"{where}.weight_scale")
        check_input_scale(raw, where)
        if q.get("quant_method") == "fp8":            # AutoFP8 / transformers fp8 naming
            block_cfg, act = q.get("weight_block_size"), "w8a8"
        else:
            block_cfg = weight_args(q).get("block_structure")
            act = "w8a8" if q.get("input_activations") else "w8a16"
        shape = tuple(s.shape)
        if block_cfg:
            bn, bk = check_block(list(block_cfg), f"{where} block_structure")
            grid = (cdiv(n, bn), cdiv(k, bk))
        if block_cfg and shape == grid:     # first: a weight of one block has a [1, 1] grid too
            strategy, block = "block", (bn, bk)
        elif s.numel() == 1 and len(shape) <= 2:
            strategy, block, s = "tensor", (n, k), s.reshape(1, 1)
        elif shape == (n, 1):
            strategy, block = "channel", (1, k)
        elif len(shape) == 2 and block_cfg:
            raise ShapeMismatch(f"{where}.weight_scale: shape {shape}, expected {grid} for weight {(n, k)} "
                                f"in blocks [{bn}, {bk}]")
        else:
            raise ShapeMismatch(f"{where}.weight_scale: shape {shape}, expected [1] (tensor), {[n, 1]} (channel) "
                                f"or a block grid with block_structure in the config")
        if q.get("quant_method") != "fp8":
            check_strategy(strategy, q, where)
        return Packed("fp8", n, k, {"weight": w.contiguous(), "scale": s.contiguous()},
                      {"block": block, "act": act}, self.name)

    @staticmethod
    def _params(strategy="channel", block=(128, 128), static_input=False, weight_only=False,
                scale_dtype=None, producer="compressed-tensors", input_amax=8.0,
                ignore=DEFAULT_IGNORE) -> dict:
        """scale_dtype default: bf16 (compressed-tensors saves scales in the model dtype), fp32 (AutoFP8)."""
        if scale_dtype is None:
            scale_dtype = torch.float32 if producer == "autofp8" else torch.bfloat16
        if strategy not in ("tensor", "channel", "block"):
            raise FormatError(f"ct_fp8 strategy {strategy!r}, expected 'tensor', 'channel' or 'block'")
        if producer not in ("compressed-tensors", "autofp8"):
            raise FormatError(f"ct_fp8 producer {producer!r}, expected 'compressed-tensors' or 'autofp8'")
        if producer == "autofp8" and strategy != "tensor":
            raise FormatError("ct_fp8 producer 'autofp8' writes per-tensor scales only (strategy='tensor')")
        if scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"ct_fp8 scale_dtype {scale_dtype}, expected one of {SCALE_DTYPES}")
        return dict(strategy=strategy, block=check_block(tuple(block), "ct_fp8 block"), static_input=static_input,
                    weight_only=weight_only, scale_dtype=scale_dtype, producer=producer,
                    input_amax=input_amax, ignore=ignore)

    def quantize(self, W: Tensor, **params) -> dict[str, Tensor]:
        """{"codes": e4m3 [N, K], "scale": [1] / [] (autofp8) / [N, 1] / block grid}."""
        p = self._params(**params)
        n, k = W.shape
        bn, bk = {"tensor": (n, k), "channel": (1, k), "block": p["block"]}[p["strategy"]]
        codes, scale = quant_fp8(W, bn, bk, p["scale_dtype"])
        if p["strategy"] == "tensor":
            scale = scale.reshape(()) if p["producer"] == "autofp8" else scale.reshape(1)
        return {"codes": codes, "scale": scale}

    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        p = self._params(**params)
        q = self.quantize(W, **params)
        out = {"weight": q["codes"], "weight_scale": q["scale"]}
        if p["static_input"]:   # a fixed calibration amax: fixtures have no activations to observe
            out["input_scale"] = torch.full(q["scale"].shape if p["producer"] == "autofp8" else (1,),
                                            p["input_amax"] / E4M3_MAX, dtype=q["scale"].dtype)
        return out

    def config_block(self, **params) -> dict:
        p = self._params(**params)
        if p["producer"] == "autofp8":
            cfg = {"quant_method": "fp8", "activation_scheme": "static" if p["static_input"] else "dynamic"}
            if p["ignore"]:
                cfg["ignored_layers"] = [i for i in p["ignore"] if not i.startswith("re:")]
            return cfg
        block = p["block"] if p["strategy"] == "block" else None
        weights = qargs(8, "float", True, p["strategy"], block_structure=block)
        if p["weight_only"]:
            acts = None
        elif p["static_input"]:
            acts = qargs(8, "float", True, "tensor", dynamic=False)
        elif p["strategy"] == "block":
            acts = qargs(8, "float", True, "group", group_size=p["block"][1], dynamic=True, observer=None)
        else:
            acts = qargs(8, "float", True, "token", dynamic=True, observer=None)
        return ct_config("float-quantized", weights, acts, p["ignore"])


# --------------------------------------------------------------------------------------------
# pack-quantized (int4 / int8 grouped) -> intq

@register_format
class CTPack(CheckpointFormat):
    name = "ct_pack"
    layout = "intq"
    suffixes = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx")
    codes = ("weight_packed", 0, 1)
    required = ("weight_packed", "weight_shape", "weight_scale")

    def detect(self, tensors, qcfg) -> bool:
        return "weight_packed" in tensors

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        wa = weight_args(qcfg)
        wp = raw["weight_packed"]
        if wp.dtype != torch.int32:
            raise FormatError(f"{where}.weight_packed: dtype {wp.dtype}, expected torch.int32")
        bits = wa.get("num_bits")
        if bits is None:   # infer from the packed width
            bits = next((b for b in BITS if wp.dim() == 2 and wp.shape[1] == cdiv(k * b, 32)), None)
        if bits not in BITS:
            raise FormatError(f"{where}: num_bits={bits}: unsupported bits (supported: 4, 8)")
        if wa.get("type", "int") != "int":
            raise FormatError(f"{where}: pack-quantized weights of type {wa.get('type')!r}, expected 'int'")
        pf = 32 // bits
        check_tensor(wp, f"{where}.weight_packed", (torch.int32,), (n, cdiv(k, pf)))
        if k % pf:
            raise FormatError(f"{where}.weight_packed: K={k} is not a multiple of {pf}; padded rows are not supported")
        ws = check_tensor(raw["weight_shape"], f"{where}.weight_shape", (torch.int32, torch.int64), (2,))
        if ws.tolist() != [n, k]:
            raise ShapeMismatch(f"{where}.weight_shape: {ws.tolist()}, expected {[n, k]}")
        sc = raw["weight_scale"]
        strategy = wa.get("strategy") or ("channel" if tuple(sc.shape) == (n, 1) else "group")
        if strategy == "channel":
            G = k
        elif strategy == "group":
            G = wa.get("group_size")
            if not isinstance(G, int) or G <= 0:
                raise FormatError(f"{where}: group strategy without a positive group_size in the config ({G!r})")
        else:
            raise FormatError(f"{where}: pack-quantized strategy {strategy!r}, expected 'group' or 'channel'")
        ng = cdiv(k, G)
        if tuple(sc.shape) == (n, 1) and ng != 1:
            raise FormatError(f"{where}.weight_scale: shape {[n, 1]} is per-channel but the config says "
                              f"group_size {G} ({ng} groups)")
        check_tensor(sc, f"{where}.weight_scale", (torch.float16, torch.bfloat16), (n, ng))
        zeros = None
        if "weight_zero_point" in raw:
            zp = check_tensor(raw["weight_zero_point"], f"{where}.weight_zero_point", (torch.int32,), (cdiv(n, pf), ng))
            zeros = unpack_int32(zp, bits, 0, n).t()                             # [ng, N] true zeros
        elif wa.get("symmetric") is False:
            raise FormatError(f"{where}.weight_zero_point: missing, the config says symmetric: false")
        g_idx = None
        if "weight_g_idx" in raw:
            g_idx = check_tensor(raw["weight_g_idx"], f"{where}.weight_g_idx", (torch.int32, torch.int64), (k,))
        elif group_actorder(wa):                  # without it the groups would be read in natural order
            raise MissingWeight(f"{where}.weight_g_idx: missing, the config says actorder: {wa['actorder']!r}")
        codes = unpack_int32(wp, bits, 1, k).t()                                  # [K, N]
        return make_intq(codes, sc.t(), zeros, g_idx, bits, G, n, k, self.name, where, g_name="weight_g_idx")

    @staticmethod
    def _params(bits=4, group_size=128, sym=True, actorder=None, perm=None, seed=None,
                scale_dtype=torch.bfloat16, ignore=DEFAULT_IGNORE) -> dict:
        if bits not in BITS:
            raise FormatError(f"ct_pack bits={bits}: unsupported bits (supported: 4, 8)")
        if actorder not in (None, "group", "weight"):
            raise FormatError(f"ct_pack actorder {actorder!r}, expected None, 'group' or 'weight'")
        return dict(bits=bits, group_size=group_size, sym=sym, actorder=actorder, perm=perm, seed=seed,
                    scale_dtype=scale_dtype, ignore=ignore)

    def quantize(self, W: Tensor, **params) -> dict[str, Tensor]:
        """codes [K, N] uint8 (= signed code + 2^(b-1)), scales / true zeros [ceil(K/G), N],
        g_idx [K] (actorder "group": g_idx[perm[i]] = i // G). Same rule as GPTQ's RTN."""
        p = self._params(**params)
        k = W.shape[1]
        G = k if p["group_size"] in (-1, None) else p["group_size"]
        g_idx = act_order_gidx(W, G, p["perm"], p["seed"])[0] if p["actorder"] == "group" else None
        return rtn_int(W, p["bits"], G, p["sym"], g_idx, p["scale_dtype"], zero_in_range=True)

    def encode(self, q: dict[str, Tensor], **params) -> dict[str, Tensor]:
        p = self._params(**params)
        codes = q["codes"].t()                                                     # [N, K]
        out = {"weight_packed": pack_int32(codes, p["bits"], 1),
               "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
               "weight_scale": q["scales"].t().contiguous()}
        if not p["sym"]:
            out["weight_zero_point"] = pack_int32(q["zeros"].t(), p["bits"], 0)
        if p["actorder"] == "group":
            out["weight_g_idx"] = q["g_idx"].to(torch.int32).contiguous()
        return out

    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        return self.encode(self.quantize(W, **params), **params)

    def config_block(self, **params) -> dict:
        p = self._params(**params)
        channel = p["group_size"] in (-1, None)
        weights = qargs(p["bits"], "int", bool(p["sym"]), "channel" if channel else "group",
                        group_size=None if channel else p["group_size"], actorder=p["actorder"])
        return ct_config("pack-quantized", weights, None, p["ignore"])


# --------------------------------------------------------------------------------------------
# int-quantized / naive-quantized int8 -> int8

@register_format
class CTInt8(CheckpointFormat):
    name = "ct_int8"
    layout = "int8"
    suffixes = ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")
    codes = ("weight", 0, 1)
    required = ("weight", "weight_scale")

    def detect(self, tensors, qcfg) -> bool:
        return "weight" in tensors and tensors["weight"][0] == torch.int8

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        q = qcfg or {}
        wa = weight_args(q)
        if wa.get("num_bits", 8) != 8:
            raise FormatError(f"{where}: int8 weight with num_bits={wa.get('num_bits')} in the config")
        w = check_tensor(raw["weight"], f"{where}.weight", (torch.int8,), (n, k))
        s = check_scale_dtype(raw["weight_scale"], f"{where}.weight_scale")
        check_input_scale(raw, where)

        def per_row(t: Tensor, name: str) -> tuple[str, Tensor]:
            if t.numel() == 1 and t.dim() <= 2:
                return "tensor", t.reshape(1, 1).expand(n, 1)
            if tuple(t.shape) == (n, 1):
                return "channel", t
            raise ShapeMismatch(f"{where}.{name}: shape {tuple(t.shape)}, expected [1] (tensor) or {[n, 1]} "
                                f"(channel); group-wise int8 is read from pack-quantized checkpoints")

        strategy, scale = per_row(s, "weight_scale")
        check_strategy(strategy, q, where)
        tensors = {"weight": w.contiguous(), "scale": scale.float().contiguous()}
        if "weight_zero_point" in raw:
            zp = raw["weight_zero_point"]
            if zp.dtype not in (torch.int8, torch.int32):
                raise FormatError(f"{where}.weight_zero_point: dtype {zp.dtype}, expected torch.int8")
            zstrat, zero = per_row(zp, "weight_zero_point")
            if zstrat != strategy:
                raise ShapeMismatch(f"{where}.weight_zero_point: shape {tuple(zp.shape)} does not match "
                                    f"weight_scale {tuple(s.shape)}")
            if bool((zero != 0).any()):
                tensors["zero"] = zero.float().contiguous()
        ia = q.get("input_activations") or {}
        act = "w8a8" if ia.get("dynamic") is True and ia.get("strategy") == "token" else "w8a16"
        return Packed("int8", n, k, tensors, {"act": act}, self.name)

    @staticmethod
    def _params(strategy="channel", sym=True, activations="dynamic", scale_dtype=torch.bfloat16,
                input_amax=8.0, ignore=DEFAULT_IGNORE) -> dict:
        if strategy not in ("tensor", "channel"):
            raise FormatError(f"ct_int8 strategy {strategy!r}, expected 'tensor' or 'channel'")
        if activations not in ("dynamic", "static", None):
            raise FormatError(f"ct_int8 activations {activations!r}, expected 'dynamic', 'static' or None")
        if scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"ct_int8 scale_dtype {scale_dtype}, expected one of {SCALE_DTYPES}")
        return dict(strategy=strategy, sym=sym, activations=activations, scale_dtype=scale_dtype,
                    input_amax=input_amax, ignore=ignore)

    def quantize(self, W: Tensor, **params) -> dict[str, Tensor]:
        """compressed-tensors' int8 rule: sym scale = amax / 127.5, q = clamp(round(w/s), -128, 127);
        asym scale = (max-min)/255 over [min(min,0), max(max,0)], zp = -128 - round(min/s).
        -> codes int8 [N, K], scale [N, 1] or [1], zero_point int8 like scale (asym only)."""
        p = self._params(**params)
        Wf = W.float()
        dims = dict(dim=1, keepdim=True) if p["strategy"] == "channel" else {}
        mx = Wf.amax(**dims).clamp(min=0)
        mn = Wf.amin(**dims).clamp(max=0)
        if p["sym"]:
            scale = _positive((torch.maximum(mx, -mn) / 127.5).to(p["scale_dtype"]))
            zp = torch.zeros_like(scale, dtype=torch.float32)
        else:
            scale = _positive(((mx - mn) / 255).to(p["scale_dtype"]))
            zp = (-128 - torch.round(mn / scale.float())).clamp(-128, 127)
        if p["strategy"] == "tensor":
            scale, zp = scale.reshape(1), zp.reshape(1)
        s = scale.float().reshape(-1, 1) if p["strategy"] == "channel" else scale.float()
        codes = (torch.round(Wf / s) + zp.reshape(s.shape)).clamp(-128, 127).to(torch.int8)
        out = {"codes": codes, "scale": scale}
        if not p["sym"]:
            out["zero_point"] = zp.to(torch.int8)
        return out

    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        p = self._params(**params)
        q = self.quantize(W, **params)
        out = {"weight": q["codes"], "weight_scale": q["scale"]}
        if "zero_point" in q:
            out["weight_zero_point"] = q["zero_point"]
        if p["activations"] == "static":   # a fixed calibration amax: fixtures have no activations to observe
            out["input_scale"] = torch.full((1,), p["input_amax"] / 127.5, dtype=p["scale_dtype"])
        return out

    def config_block(self, **params) -> dict:
        p = self._params(**params)
        weights = qargs(8, "int", bool(p["sym"]), p["strategy"])
        if p["activations"] == "dynamic":
            acts = qargs(8, "int", True, "token", dynamic=True, observer=None)
        elif p["activations"] == "static":
            acts = qargs(8, "int", True, "tensor", dynamic=False)
        else:
            acts = None
        return ct_config("int-quantized" if acts else "naive-quantized", weights, acts, p["ignore"])


def _positive(scale: Tensor) -> Tensor:
    """Zero scales (all-zero channels) -> the scale dtype's smallest normal, after the cast: a
    clamp in fp32 underflows to 0 in fp16 and the codes of such a channel would be 0/0."""
    return scale.clamp(min=torch.finfo(scale.dtype).tiny)
