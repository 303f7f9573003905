"""`python -m mixprec inspect DIR`: what format every module of one checkpoint is in.

Reads headers only (tensor names, dtypes, shapes) and the config's quantization block, so it
is instant on a 235B checkpoint. Modules with identical (format, parameters) in consecutive
layers / experts are shown as one row.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

from .errors import MixprecError
from .formats import detect, resolve_scheme
from .loader.checkpoint import Checkpoint

_PARAM_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "weight_block_size", "strategy")


def describe(scheme: dict | None) -> str:
    if not scheme:
        return ""
    return " ".join(f"{k}={scheme[k]}" for k in _PARAM_KEYS if scheme.get(k) is not None)


def inspect_rows(ckpt: Checkpoint) -> list[dict]:
    rows = []
    for module in ckpt.args.linear_shapes():
        meta = ckpt.module_meta(module)
        if not meta:
            if module == "lm_head" and ckpt.args.tie_word_embeddings:
                continue
            rows.append(dict(module=module, format="MISSING", params="", bytes=0))
            continue
        scheme = resolve_scheme(ckpt.quant_config, module)
        fmt = detect(meta, scheme, where=f"{ckpt.path}: {module}")
        nbytes = sum(ckpt.nbytes(f"{module}.{s}") for s in meta)
        rows.append(dict(module=module, format=fmt.name, params=describe(scheme), bytes=nbytes))
    return rows


def _collapse(rows: list[dict]) -> list[tuple[str, str, str, int, int]]:
    """Group by (module pattern with numbers replaced, format, params) -> ranges of layers/experts.
    A row means every listed layer x every listed expert: experts are grouped per layer first,
    then layers with the same expert set are merged."""
    per_layer: dict[tuple, dict] = defaultdict(lambda: {"experts": set(), "count": 0, "bytes": 0})
    for r in rows:
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", r["module"])
        layer, rest = (int(m.group(1)), m.group(2)) if m else (None, r["module"])
        e = re.match(r"mlp\.experts\.(\d+)\.(.*)$", rest)
        expert, rest = (int(e.group(1)), "mlp.experts.*." + e.group(2)) if e else (None, rest)
        g = per_layer[(rest, r["format"], r["params"], layer)]
        if expert is not None:
            g["experts"].add(expert)
        g["count"] += 1
        g["bytes"] += r["bytes"]
    groups: dict[tuple, dict] = defaultdict(lambda: {"layers": set(), "count": 0, "bytes": 0})
    for (rest, fmt, params, layer), g in per_layer.items():
        merged = groups[(rest, fmt, params, frozenset(g["experts"]))]
        if layer is not None:
            merged["layers"].add(layer)
        merged["count"] += g["count"]
        merged["bytes"] += g["bytes"]
    out = []
    for (rest, fmt, params, experts), g in groups.items():
        where = ""
        if g["layers"]:
            where += f"layers {ranges(g['layers'])} "
        if experts:
            where += f"experts {ranges(experts)} "
        out.append((where + rest, fmt, params, g["count"], g["bytes"]))
    return out


def ranges(xs) -> str:
    """{0,1,2,5,7,8} -> '0-2,5,7-8'."""
    xs = sorted(xs)
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def inspect_checkpoint(path, as_json: bool = False, out=None) -> int:
    out = out or sys.stdout          # looked up per call: sys.stdout may be replaced (tests, servers)
    try:
        ckpt = Checkpoint(path)
        rows = inspect_rows(ckpt)
    except MixprecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        totals[r["format"]][0] += 1
        totals[r["format"]][1] += r["bytes"]
    if as_json:
        json.dump({"checkpoint": str(ckpt.path), "quantization_config": ckpt.quant_config, "modules": rows,
                   "totals": {k: {"count": c, "bytes": b} for k, (c, b) in totals.items()}}, out, indent=1)
        out.write("\n")
        return 0
    print(f"{ckpt.path}", file=out)
    print(f"{'modules':<58} {'format':<10} {'params':<36} {'count':>6} {'MiB':>9}", file=out)
    for where, fmt, params, count, nbytes in _collapse(rows):
        print(f"{where:<58} {fmt:<10} {params:<36} {count:>6} {nbytes / 2**20:>9.2f}", file=out)
    print("totals:", file=out)
    for fmt, (c, b) in sorted(totals.items()):
        print(f"  {fmt:<10} {c:>7} modules {b / 2**20:>10.2f} MiB", file=out)
    return 0
