"""Weight formats: registries, per-module scheme resolution, detection and loading.

    scheme = resolve_scheme(config["quantization_config"], "model.layers.0.self_attn.q_proj")
    fmt    = detect({suffix: (dtype, shape)}, scheme, where)        # metadata only
    w      = load_module({suffix: tensor}, n, k, scheme, where)     # -> Packed in its layout
    y      = apply(x, w);  W = dequant(w)

A scheme is None (module not quantized) or a dict with "quant_method" plus that method's keys:
  gptq                {bits, group_size, desc_act, sym, checkpoint_format}
  awq                 {bits, group_size, zero_point, version}
  fp8                 {activation_scheme, weight_block_size}
  compressed-tensors  {format, group, weights, input_activations}
"""
from __future__ import annotations

import re

from ..errors import FormatError, MissingWeight
from . import awq, compressed_tensors, dense, fp8, gptq, int8, intq  # noqa: F401  (fill the registries)
from .base import (FORMATS, LAYOUTS, CheckpointFormat, Layout, Packed, apply, cat_n, dequant, shard,
                   shard_range, stack)

__all__ = ["FORMATS", "LAYOUTS", "CheckpointFormat", "Layout", "Packed", "apply", "cat_n", "dequant", "detect",
           "load_module", "resolve_scheme", "shard", "shard_range", "stack"]

GPTQ_DEFAULTS = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
AWQ_DEFAULTS = {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
LINEAR_CLASSES = ("Linear",)

# Which quant_method a format's tensors may come with (dense: none).
METHODS = {"fp8_block": ("fp8",), "ct_fp8": ("fp8", "compressed-tensors"), "gptq": ("gptq",), "awq": ("awq",),
           "ct_pack": ("compressed-tensors",), "ct_int8": ("compressed-tensors",)}
CT_FORMATS = {"ct_fp8": ("float-quantized",), "ct_pack": ("pack-quantized",),
              "ct_int8": ("int-quantized", "naive-quantized")}


def _match(pattern: str, name: str, what: str) -> bool:
    try:
        return re.match(pattern, name) is not None
    except re.error as e:
        raise FormatError(f"quantization_config {what} {pattern!r}: invalid regex ({e})") from None


def _never_quantized(module: str) -> bool:
    """Modules GPTQ / AWQ / FP8 producers (and vLLM / SGLang reading them) leave in float: the
    embedding, lm_head and the Qwen3-MoE router `mlp.gate`."""
    last = module.rsplit(".", 1)[-1]
    return last in ("lm_head", "embed_tokens") or module.endswith(".mlp.gate")


def _gptq_scheme(qc: dict, module: str) -> dict | None:
    if module.rsplit(".", 1)[-1] == "lm_head":
        if not qc.get("lm_head"):
            return None
    elif _never_quantized(module):
        return None
    s = {key: qc.get(key, d) for key, d in GPTQ_DEFAULTS.items()}
    if "checkpoint_format" not in qc and "format" in qc:   # older GPTQModel spelling
        s["checkpoint_format"] = qc["format"]
    # GPTQModel `dynamic`: ordered regex (re.match) -> overrides; "-:" = skip; first match wins
    for pattern, over in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if _match(pattern[2:], module, "dynamic"):
                return None
        elif _match(pattern.removeprefix("+:"), module, "dynamic"):
            if not isinstance(over, dict):
                raise FormatError(f"quantization_config dynamic[{pattern!r}]: {over!r}, expected a dict of overrides")
            s.update({key: v for key, v in over.items() if key in GPTQ_DEFAULTS})
            break
    return {"quant_method": "gptq", **s}


def _skipped(module: str, qc: dict) -> bool:
    """fp8 `ignored_layers` (exact names, or "re:" regex) and `modules_to_not_convert`
    (substring, as transformers and vLLM's AWQ use it)."""
    for entry in qc.get("ignored_layers") or ():
        if entry == module or (entry.startswith("re:") and _match(entry[3:], module, "ignored_layers")):
            return True
    return any(entry in module for entry in qc.get("modules_to_not_convert") or ())


def _ct_rank(target: str, module: str) -> int | None:
    """compressed-tensors target precedence: 0 exact name, 1 "re:" regex, 2 class name."""
    if target == module:
        return 0
    if target.startswith("re:"):
        return 1 if _match(target[3:], module, "target") else None
    return 2 if target in LINEAR_CLASSES else None


def _ct_format(group: dict, qc: dict) -> str:
    fmt = group.get("format") or qc.get("format")
    if fmt and fmt != "mixed-precision":
        return fmt
    w, a = group.get("weights") or {}, group.get("input_activations")
    if w.get("type") == "float":
        return "float-quantized"
    if w.get("num_bits") == 8 and a:
        return "int-quantized"
    return "pack-quantized"


def _ct_scheme(qc: dict, module: str) -> dict | None:
    # an ignore entry that matches always wins, as in compressed-tensors' apply_quantization_config
    if any(_ct_rank(t, module) is not None for t in qc.get("ignore") or ()):
        return None
    best = None
    for gname, group in (qc.get("config_groups") or {}).items():
        for t in group.get("targets") or ():
            r = _ct_rank(t, module)
            if r is not None and (best is None or r < best[0]):
                best = (r, gname, group)
    if best is None or not best[2].get("weights"):
        return None
    _, gname, group = best
    return {"quant_method": "compressed-tensors", "format": _ct_format(group, qc), "group": gname,
            "weights": dict(group["weights"]), "input_activations": group.get("input_activations")}


def resolve_scheme(quant_config: dict | None, module: str) -> dict | None:
    """The effective scheme of one linear module (HF name, no ".weight") from config.json's
    `quantization_config`; None = stored unquantized. See the module docstring for the keys."""
    if not quant_config:
        return None
    if not isinstance(quant_config, dict):
        raise FormatError(f"quantization_config: expected a JSON object, got {type(quant_config).__name__}")
    qc = dict(quant_config)
    method = str(qc.get("quant_method", "")).lower()
    try:
        return _resolve(qc, method, module)
    except (KeyError, AttributeError, TypeError, ValueError) as e:   # a list / string for a mapping, a missing key
        raise FormatError(f"quantization_config (quant_method {method!r}) is malformed where it describes "
                          f"{module}: {type(e).__name__}: {e}") from None


def _resolve(qc: dict, method: str, module: str) -> dict | None:
    if method == "gptq":
        return _gptq_scheme(qc, module)
    if method == "compressed-tensors":
        return _ct_scheme(qc, module)
    if method in ("awq", "fp8"):
        if _never_quantized(module) or _skipped(module, qc):
            return None
        if method == "awq":
            s = {key: qc.get(key, d) for key, d in AWQ_DEFAULTS.items()}
            return {"quant_method": "awq", **s, "version": str(s["version"]).lower()}
        return {"quant_method": "fp8", "activation_scheme": qc.get("activation_scheme", "dynamic"),
                "weight_block_size": qc.get("weight_block_size")}
    if method == "mixprec":   # an exported mix (planner/export.py): module -> key into its scheme table
        key = (qc.get("modules") or {}).get(module)
        return None if key is None else dict(qc["schemes"][key])
    raise FormatError(f"quantization_config: quant_method {qc.get('quant_method')!r} is not supported "
                      f"(gptq, awq, fp8, compressed-tensors)")


def _describe(meta: dict) -> str:
    return ", ".join(f"{s} {str(d).removeprefix('torch.')}{list(shape)}" for s, (d, shape) in sorted(meta.items()))


def _scheme_str(scheme: dict) -> str:
    m = scheme.get("quant_method")
    return f"{m} ({scheme['format']})" if m == "compressed-tensors" else str(m)


def detect(meta: dict, scheme: dict | None, where: str) -> CheckpointFormat:
    """The one format whose tensors these are (suffix -> (dtype, shape); no data read),
    cross-checked against the module's scheme. FormatError naming `where` otherwise."""
    found = [f for f in FORMATS.values() if f.detect(meta, scheme)]
    if not found:
        # tensors that all belong to one quantized format, short of a required one: a missing tensor
        partial = [f for f in FORMATS.values() if f.name != "dense" and meta and set(meta) <= set(f.suffixes)
                   and any(s not in meta for s in getattr(f, "required", f.suffixes))]
        if len(partial) == 1:
            f = partial[0]
            gone = [s for s in getattr(f, "required", f.suffixes) if s not in meta]
            raise MissingWeight(f"{where}.{gone[0]}: missing; the module's other tensors "
                                f"[{_describe(meta)}] are a {f.name} weight, which also needs {gone}")
        raise FormatError(f"{where}: tensors [{_describe(meta)}] are no known weight format")
    if len(found) > 1:
        raise FormatError(f"{where}: tensors [{_describe(meta)}] match several formats: {[f.name for f in found]}")
    fmt = found[0]
    required = getattr(fmt, "required", fmt.suffixes)
    missing = [s for s in required if s not in meta]
    if missing:
        raise FormatError(f"{where}.{missing[0]}: missing; a {fmt.name} weight needs {list(required)} "
                          f"(found [{_describe(meta)}])")
    extra = [s for s in meta if s not in fmt.suffixes]
    if extra:
        raise FormatError(f"{where}.{extra[0]}: unexpected tensor for a {fmt.name} weight "
                          f"(expected some of {list(fmt.suffixes)})")
    if fmt.name == "dense":
        if scheme is not None:
            raise FormatError(f"{where}: the config says {_scheme_str(scheme)}-quantized but the checkpoint "
                              f"holds only a plain {_describe(meta)}")
        return fmt
    if scheme is None:
        raise FormatError(f"{where}: tensors are {fmt.name} [{_describe(meta)}] but the config says this "
                          f"module is not quantized")
    method = scheme.get("quant_method")
    if method not in METHODS[fmt.name]:
        raise FormatError(f"{where}: tensors are {fmt.name} [{_describe(meta)}] but the config says "
                          f"quant_method {method!r}")
    if method == "compressed-tensors" and scheme.get("format") not in CT_FORMATS[fmt.name]:
        raise FormatError(f"{where}: tensors are {fmt.name} but the compressed-tensors config says format "
                          f"{scheme.get('format')!r} (expected {' or '.join(CT_FORMATS[fmt.name])})")
    return fmt


def load_module(raw: dict, n: int, k: int, scheme: dict | None, where: str, dtype=None) -> Packed:
    """Tensors of one linear module (suffix -> tensor) -> Packed. `dtype` casts dense weights."""
    fmt = detect({s: (t.dtype, tuple(t.shape)) for s, t in raw.items()}, scheme, where)
    return fmt.load(raw, n, k, {"dtype": dtype} if fmt.name == "dense" else scheme, where)
