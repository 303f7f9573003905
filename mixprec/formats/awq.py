"""AutoAWQ "GEMM" checkpoints (the layout vLLM / SGLang read) -> the canonical `intq` layout.

    qweight [K, N/8] int32   packed along N, interleaved: nibble i of word c holds column
                             8c + [0,2,4,6,1,3,5,7][i]
    qzeros  [K/G, N/8] int32 same interleave, true zero points (no -1)
    scales  [K/G, N] fp16
    W[n, k] = scales[k // G, n] * (q[k, n] - z[k // G, n])

`version` gemv / gemv_fast / marlin are other layouts and raise FormatError naming the version.
AWQ folds activation scales into the preceding norm / linear; correcting for that when mixing
sources is the loader's job (see FORMATS.md), not this file's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from .base import CheckpointFormat, Packed, register_format
from .gptq import check_tensor, check_zero_bias, group_size_of
from .intq import cdiv, make_intq, pack_int32, rtn_int, unpack_int32

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def check_version(version, where: str) -> None:
    v = str(version).lower()
    if v != "gemm":
        raise FormatError(f"{where}: AWQ version {version!r} is a different packing; only 'gemm' is supported "
                          f"(gemv, gemv_fast and marlin are not)")


@register_format
class AWQ(CheckpointFormat):
    name = "awq"
    layout = "intq"
    suffixes = ("qweight", "qzeros", "scales", "bias")
    codes = ("qweight", 1, 0)
    required = ("qweight", "qzeros", "scales")

    def detect(self, tensors, qcfg) -> bool:
        if "qweight" not in tensors or "g_idx" in tensors:
            return False
        if "scales" in tensors:
            return tensors["qweight"][1][-1] != tensors["scales"][1][-1]
        return (qcfg or {}).get("quant_method") == "awq"

    def load(self, raw, n, k, qcfg=None, where="") -> Packed:
        q = qcfg or {}
        check_version(q.get("version", "gemm"), where)
        if q.get("bits", 4) != 4:
            raise FormatError(f"{where}: AWQ bits={q.get('bits')}: unsupported bits (AWQ GEMM is 4-bit)")
        if q.get("zero_point", True) is False:
            raise FormatError(f"{where}: AWQ zero_point=false is not a layout AutoAWQ GEMM writes")
        G = group_size_of(q, k, where)
        if n % 8:
            raise ShapeMismatch(f"{where}.qweight: N={n} is not a multiple of 8 (AWQ packs 8 columns per int32)")
        ng = cdiv(k, G)
        qw = check_tensor(raw["qweight"], f"{where}.qweight", (torch.int32,), (k, n // 8))
        qz = check_tensor(raw["qzeros"], f"{where}.qzeros", (torch.int32,), (ng, n // 8))
        sc = check_tensor(raw["scales"], f"{where}.scales", (torch.float16, torch.bfloat16), (ng, n))
        check_zero_bias(raw, n, where)
        codes = unpack_int32(qw, 4, 1, n, AWQ_ORDER)                              # [K, N]
        zeros = unpack_int32(qz, 4, 1, n, AWQ_ORDER)                              # [ng, N]
        return make_intq(codes, sc, zeros, None, 4, G, n, k, self.name, where)

    @staticmethod
    def _params(bits=4, group_size=128, version="gemm", zero_point=True, scale_dtype=torch.float16,
                modules_to_not_convert=None) -> dict:
        if bits != 4:
            raise FormatError(f"awq pack bits={bits}: unsupported bits (AWQ GEMM is 4-bit)")
        check_version(version, "awq pack")
        if zero_point is not True:
            raise FormatError("awq pack zero_point=False: AutoAWQ GEMM always writes zero points")
        return dict(bits=bits, group_size=group_size, version=version, zero_point=zero_point,
                    scale_dtype=scale_dtype, modules_to_not_convert=modules_to_not_convert)

    def quantize(self, W: Tensor, **params) -> dict[str, Tensor]:
        """AutoAWQ's RTN (asymmetric, [min, max] not widened to 0): codes [K, N] uint8, scales
        [K/G, N] fp16, zeros [K/G, N] uint8 (true zeros). AWQ's activation-aware scale search
        is not run: fixtures fold their scales separately."""
        p = self._params(**params)
        k = W.shape[1]
        G = k if p["group_size"] == -1 else p["group_size"]
        return rtn_int(W, 4, G, False, None, p["scale_dtype"], zero_in_range=False)

    def encode(self, q: dict[str, Tensor], **params) -> dict[str, Tensor]:
        """Codes / zeros -> AutoAWQ GEMM tensors (interleaved nibbles along N)."""
        self._params(**params)
        return {"qweight": pack_int32(q["codes"], 4, 1, AWQ_ORDER), "qzeros": pack_int32(q["zeros"], 4, 1, AWQ_ORDER),
                "scales": q["scales"].contiguous()}

    def pack(self, W: Tensor, **params) -> dict[str, Tensor]:
        return self.encode(self.quantize(W, **params), **params)

    def config_block(self, **params) -> dict:
        p = self._params(**params)
        return {"quant_method": "awq", "bits": 4, "group_size": p["group_size"], "zero_point": True,
                "version": "gemm", "modules_to_not_convert": p["modules_to_not_convert"]}
