"""GPTQ (AutoGPTQ / GPTQModel) checkpoints -> the canonical `intq` layout.

    qweight [K*b/32, N] int32   input rows packed along K, natural order
    qzeros  [ceil(K/G), N*b/32] int32   zero points packed along N
    scales  [ceil(K/G), N]      fp16 (bf16 accepted)
    g_idx   [K] int32           group of each input (optional; non-monotonic with desc_act)
    W[n, k] = scales[g(k), n] * (q[k, n] - z[g(k), n]),  g(k) = g_idx[k] (or k // G)

Zero points: checkpoint_format "gptq" (v1, also when the key is absent) stores zero - 1,
"gptq_v2" the true zero. v1 words are turned into v2 by adding 1 to every field with one
word-wide addition (carry included), the exact inverse of how GPTQModel writes v1 (v2 words
minus 0x11111111); so a v1 file from GPTQModel round-trips even where a zero was 0. Older
AutoGPTQ wrote v1 zero 0 as -1 OR-ed into the word, which corrupts the neighbouring fields and
cannot be undone (asymmetric v1 cannot encode zero 0); vLLM reads such a field as 2^b.
Symmetric layers are checked by value (all stored zeros 2^(b-1)-1 -> v1, all 2^(b-1) -> v2):
when the label disagrees we warn, naming the module, and follow the values.
Only 4 and 8 bits are supported; 2/3-bit raise FormatError "unsupported bits".
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import FormatError, MissingWeight, ShapeMismatch
from .base import CheckpointFormat, Packed, register_format
from .intq import BITS, act_order_gidx, cdiv, make_intq, pack_int32, rtn_int, unpack_int32

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def ones_word(bits: int) -> int:
    """A word with 1 in every field: 0x11111111 (4-bit), 0x01010101 (8-bit)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def word_add(words: Tensor, delta: int) -> Tensor:
    """(words + delta) mod 2^32 on int32 words read as unsigned."""
    w = ((words.to(torch.int64) & 0xFFFFFFFF) + delta) & 0xFFFFFFFF
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def check_bits(bits, where: str) -> int:
    if bits not in BITS:
        raise FormatError(f"{where}: bits={bits}: unsupported bits (supported: 4, 8)")
    return int(bits)


def group_size_of(q: dict, k: int, where: str = "") -> int:
    g = q.get("group_size", 128)
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or g > 0):
        raise FormatError(f"{where}: group_size {g!r}: expected a positive integer or -1 (one group)")
    return k if g == -1 else g


def check_tensor(t: Tensor, name: str, dtypes: tuple, shape: tuple) -> Tensor:
    if t.dtype not in dtypes:
        raise FormatError(f"{name}: dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatch(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def check_zero_bias(raw: dict, n: int, where: str) -> None:
    """Some exports write an all-zero `.bias` for bias-free layers: ignore it; a real bias is an error."""
    if "bias" in raw:
        b = raw["bias"]
        if tuple(b.shape) != (n,):
            raise ShapeMismatch(f"{where}.bias: shape {tuple(b.shape)}, expected {(n,)}")
        if bool(b.float().abs().max() > 0):
            raise FormatError(f"{where}.bias: non-zero bias on a quantized linear; Qwen3 linears have none")


@register_format
class GPTQ(CheckpointFormat):
    name = "gptq"
    layout = "intq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx", "bias")
    codes = ("qweight", 1, 0)
    required = ("qweight", "qzeros", "scales")

    def detect(self, tensors, qcfg) -> bool:
        if "qweight" not in tensors:
            return False
        if "g_idx" in tensors:
            return True
        if "scales" in tensors:   # GPTQ: qweight [K*b/32, N], scales [.., N]; AWQ: qweight [K, N/8]
            return tensors["qweight"][1][-1] == tensors["scales"][1][-1]
        return (qcfg or {}).get("quant_method") == "gptq"

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        q = qcfg or {}
        bits = check_bits(q.get("bits", 4), where)
        G = group_size_of(q, k, where)
        pf, ng = 32 // bits, cdiv(k, G)
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in CHECKPOINT_FORMATS:
            raise FormatError(f"{where}: GPTQ checkpoint_format {fmt!r} unsupported (expected 'gptq' or 'gptq_v2')")
        if k % pf:
            raise ShapeMismatch(f"{where}.qweight: K={k} is not a multiple of {pf} ({bits}-bit rows per int32)")
        qw = check_tensor(raw["qweight"], f"{where}.qweight", (torch.int32,), (k // pf, n))
        qz = check_tensor(raw["qzeros"], f"{where}.qzeros", (torch.int32,), (ng, cdiv(n, pf)))
        sc = check_tensor(raw["scales"], f"{where}.scales", (torch.float16, torch.bfloat16), (ng, n))
        g_idx = None
        if "g_idx" in raw:
            g_idx = check_tensor(raw["g_idx"], f"{where}.g_idx", (torch.int32, torch.int64), (k,))
        elif q.get("desc_act"):                    # without it the groups would be read in natural order
            raise MissingWeight(f"{where}.g_idx: missing, the config says desc_act: true")
        check_zero_bias(raw, n, where)

        stored = unpack_int32(qz, bits, 1, n)                                   # [ng, N]
        half = 2 ** (bits - 1)
        if q.get("sym", True):
            by_value = ("gptq" if bool((stored == half - 1).all()) else
                        "gptq_v2" if bool((stored == half).all()) else None)
            if by_value and by_value != fmt:
                warnings.warn(f"{where}: checkpoint_format says {fmt!r} but every stored zero point is "
                              f"{half - 1 if by_value == 'gptq' else half}, which is {by_value!r} for a "
                              f"symmetric {bits}-bit layer; following the values", stacklevel=2)
                fmt = by_value
        zeros = unpack_int32(word_add(qz, ones_word(bits)), bits, 1, n) if fmt == "gptq" else stored
        # qweight already is the canonical row packing: passed through unless act-order re-sorts rows
        return make_intq(None, sc, zeros, g_idx, bits, G, n, k, self.name, where, qweight=qw)

    @staticmethod
    def _params(bits=4, group_size=128, sym=True, desc_act=False, checkpoint_format="gptq", perm=None,
                seed=None, scale_dtype=torch.float16, dynamic=None, lm_head=False) -> dict:
        check_bits(bits, "gptq pack")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise FormatError(f"gptq checkpoint_format {checkpoint_format!r}, expected one of {CHECKPOINT_FORMATS}")
        return dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                    checkpoint_format=checkpoint_format, perm=perm, seed=seed, scale_dtype=scale_dtype,
                    dynamic=dynamic, lm_head=lm_head)

    def quantize(self, W: Tensor, **params) -> dict[str, Tensor]:
        """RTN codes as GPTQ stores them: codes [K, N] uint8 (natural input order), scales /
        true zeros [ceil(K/G), N], g_idx [K] int32. desc_act: g_idx[perm[i]] = i // G with `perm`
        given, random from `seed`, or (default) inputs by descending column norm of W."""
        p = self._params(**params)
        n, k = W.shape
        G = k if p["group_size"] == -1 else p["group_size"]
        g_idx = act_order_gidx(W, G, p["perm"], p["seed"])[0] if p["desc_act"] else None
        return rtn_int(W, p["bits"], G, p["sym"], g_idx, p["scale_dtype"], zero_in_range=True)

    def encode(self, q: dict[str, Tensor], **params) -> dict[str, Tensor]:
        """quantize()'s codes -> the tensors GPTQModel writes (v1 zeros: v2 words - 0x11111111)."""
        p = self._params(**params)
        bits = p["bits"]
        qzeros = pack_int32(q["zeros"], bits, 1)
        if p["checkpoint_format"] == "gptq":
            qzeros = word_add(qzeros, -ones_word(bits))
        return {"qweight": pack_int32(q["codes"], bits, 0), "qzeros": qzeros,
                "scales": q["scales"].contiguous(), "g_idx": q["g_idx"].to(torch.int32).contiguous()}

    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        return self.encode(self.quantize(W, **params), **params)

    def config_block(self, **params) -> dict:
        p = self._params(**params)
        cfg = {"quant_method": "gptq", "bits": p["bits"], "group_size": p["group_size"],
               "desc_act": bool(p["desc_act"]), "sym": bool(p["sym"]), "checkpoint_format": p["checkpoint_format"],
               "lm_head": bool(p["lm_head"]), "static_groups": False, "true_sequential": True,
               "damp_percent": 0.01, "pack_dtype": "int32"}
        if p["dynamic"]:
            cfg["dynamic"] = dict(p["dynamic"])
        return cfg
