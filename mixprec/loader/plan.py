"""The plan: every linear of the model -> one (source checkpoint, on-disk format), from headers only.

`make_plan(cfg)` opens each source once (headers), checks they describe the same model,
resolves the mix rules, detects each module's format from its tensors (+ the source's
quantization_config as a hint), and checks shapes. Every problem is collected and raised as
one error listing them all, so a bad mix fails before a single weight is read.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import MixConfig, ModelArgs, format_experts
from ..errors import (CheckpointError, ConfigError, FormatError, MissingWeight, MixprecError, ModelMismatch,
                      ShapeMismatch)
from ..formats import detect, resolve_scheme
from ..formats.fp8 import check_block
from ..formats.gptq import check_bits, group_size_of
from .checkpoint import Checkpoint

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MOD = re.compile(r"^model\.layers\.(\d+)\.(?:(self_attn)|mlp\.experts\.(\d+)|(mlp))\.(\w+)$")
MAX_LISTED = 60   # errors shown in the message; the exception's .errors has them all


@dataclass(frozen=True)
class Entry:
    """One linear: where its tensors are and how they are stored. `nbytes` is on-disk bytes of
    all the module's tensors (headers); `params` a short text such as 'int4 g128'."""
    module: str
    source: str
    path: Path
    fmt_name: str
    layout: str
    n: int
    k: int
    nbytes: int
    scheme: dict | None
    rule_origin: str | None
    params: str = ""


@dataclass
class Plan:
    args: ModelArgs
    cfg: MixConfig
    sources: dict[str, Checkpoint]
    entries: dict[str, Entry]
    errors: list[str] = field(default_factory=list)
    plain_bytes: int = 0      # embeddings, norms, routers (always from the base), on disk

    # -- reports --------------------------------------------------------------------------
    def summary(self) -> dict:
        """Bytes and count per format and per source, what all-bf16 linears would take, saving."""
        by_fmt: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
        by_src: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
        total = bf16 = 0
        for e in self.entries.values():
            for d in (by_fmt[e.fmt_name], by_src[e.source]):
                d["count"] += 1
                d["bytes"] += e.nbytes
            total += e.nbytes
            bf16 += e.n * e.k * 2
        return {"count": len(self.entries), "bytes": total, "bf16_bytes": bf16,
                "saving": 1 - total / bf16 if bf16 else 0.0, "plain_bytes": self.plain_bytes,
                "by_format": dict(sorted(by_fmt.items())), "by_source": dict(sorted(by_src.items()))}

    def to_json(self) -> dict:
        return {"origin": self.cfg.origin, "model": str(self.cfg.model),
                "sources": {k: str(c.path) for k, c in self.sources.items()},
                "entries": {m: {"source": e.source, "path": str(e.path), "format": e.fmt_name, "layout": e.layout,
                                "params": e.params, "n": e.n, "k": e.k, "nbytes": e.nbytes, "scheme": e.scheme,
                                "rule": e.rule_origin} for m, e in self.entries.items()},
                "summary": self.summary(), "errors": list(self.errors)}

    def table(self, all: bool = False) -> str:   # noqa: A002  (the CLI flag's name)
        """Aligned text. Default: consecutive layers / experts with the same (source, format)
        per projection collapse into one row; all=True: one row per module."""
        if all:
            rows = [(m, e.source, e.fmt_name, e.params, f"{e.n}x{e.k}", fmt_size(e.nbytes), e.rule_origin or "default")
                    for m, e in self.entries.items()]
            head = ("module", "source", "format", "params", "NxK", "bytes", "rule")
        else:
            rows = [(where, part, ",".join(projs), src, fmt, params, str(count), fmt_size(nb))
                    for where, part, projs, (src, fmt, params), count, nb in self._groups()]
            head = ("layers", "module", "projections", "source", "format", "params", "count", "bytes")
        s = self.summary()
        lines = _align([head, *rows])
        lines.append(f"{s['count']} linears, {fmt_size(s['bytes'])} on disk (bf16: {fmt_size(s['bf16_bytes'])}, "
                     f"saving {100 * s['saving']:.1f}%); plus {fmt_size(s['plain_bytes'])} embeddings/norms/routers")
        for kind in ("by_format", "by_source"):
            lines.append(f"  {kind.replace('_', ' ')}: " + ", ".join(
                f"{k} {v['count']} ({fmt_size(v['bytes'])})" for k, v in s[kind].items()))
        if self.errors:
            lines.append(f"{len(self.errors)} errors:")
            lines += [f"  - {e}" for e in self.errors]
        return "\n".join(lines)

    def _groups(self):
        """Aggregate: experts runs per (layer, projection), then projections, then layer runs."""
        parsed, other = {}, []
        for m, e in self.entries.items():
            mm = _MOD.match(m)
            desc = (e.source, e.fmt_name, e.params)
            if mm is None:
                other.append(("", m, (), desc, 1, e.nbytes))
                continue
            layer, attn, expert, mlp, proj = mm.groups()
            part = "self_attn" if attn else "mlp" if mlp else "experts"
            parsed.setdefault((int(layer), part, proj), []).append((int(expert) if expert else -1, desc, e.nbytes))
        runs = defaultdict(list)    # (layer, part, expert range, desc) -> [(proj, count, bytes)]
        for (layer, part, proj), items in parsed.items():
            items.sort()
            i = 0
            while i < len(items):
                j = i
                while (j + 1 < len(items) and items[j + 1][1] == items[i][1]
                       and items[j + 1][0] == items[j][0] + 1):
                    j += 1
                er = (items[i][0], items[j][0]) if part == "experts" else None
                runs[(layer, part, er, items[i][1])].append((proj, j - i + 1, sum(x[2] for x in items[i:j + 1])))
                i = j + 1
        by_layers = defaultdict(list)   # (part, expert range, projections, desc) -> [(layer, count, bytes)]
        for (layer, part, er, desc), projs in runs.items():
            projs.sort(key=lambda p: _PROJ_ORDER.index(p[0]) if p[0] in _PROJ_ORDER else 99)
            by_layers[(part, er, tuple(p[0] for p in projs), desc)].append(
                (layer, sum(p[1] for p in projs), sum(p[2] for p in projs)))
        rows = []
        for (part, er, projs, desc), layers in by_layers.items():
            layers.sort()
            i = 0
            while i < len(layers):
                j = i
                while j + 1 < len(layers) and layers[j + 1][0] == layers[j][0] + 1:
                    j += 1
                l0, l1 = layers[i][0], layers[j][0]
                where = f"layer {l0}" if l0 == l1 else f"layers {l0}-{l1}"
                name = part if er is None else f"experts {format_experts(range(er[0], er[1] + 1))}"
                rows.append(((l0, part, er or (0, 0), _PROJ_ORDER.index(projs[0]) if projs[0] in _PROJ_ORDER else 99),
                             (where, name, projs, desc, sum(x[1] for x in layers[i:j + 1]),
                              sum(x[2] for x in layers[i:j + 1]))))
                i = j + 1
        rows.sort(key=lambda r: r[0])
        return [r[1] for r in rows] + other


def fmt_size(n: int) -> str:
    """Decimal units, as disk sizes are given: 1.5 GB, 269.3 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _align(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


# -- checks ----------------------------------------------------------------------------------
def _light_check(fmt: str, meta: dict, n: int, k: int, scheme: dict | None) -> str | None:
    """Shape and scheme problems visible from headers and config.json (what load() would refuse).
    The format's load() does the full check later."""
    def shp(s):
        return list(meta[s][1])
    try:
        if fmt in ("gptq", "awq"):
            check_bits((scheme or {}).get("bits", 4), "")
            group_size_of(scheme or {}, k)
        elif fmt == "fp8_block":
            check_block((scheme or {}).get("weight_block_size") or [128, 128], "")
    except FormatError as e:
        return str(e).removeprefix(": ")
    def dims2(s):   # a 2-D tensor's (rows, columns); another rank matches no size
        d = shp(s)
        return (d[0], d[1]) if len(d) == 2 else (-1, -1)
    if fmt == "gptq":
        r, c = dims2("qweight")
        if c != n or not any(r * 32 == k * b for b in (2, 3, 4, 8)):
            return f"qweight {shp('qweight')}, expected [K*bits/32, N] = [{k}*bits/32, {n}]"
    elif fmt == "awq":
        if shp("qweight") != [k, n // 8] or n % 8:
            return f"qweight {shp('qweight')}, expected [K, N/8] = [{k}, {n / 8:g}]"
    elif fmt == "ct_pack":
        r, c = dims2("weight_packed")
        if r != n or not any(c == -(-k * b // 32) for b in (2, 4, 8)):
            return f"weight_packed {shp('weight_packed')}, expected [N, ceil(K*bits/32)] with N={n}, K={k}"
    elif "weight" in meta and shp("weight") != [n, k]:
        return f"weight {shp('weight')}, expected [N, K] = {[n, k]}"
    return None


def _params(fmt: str, meta: dict, scheme: dict | None, k: int) -> str:
    """Short description for tables, from the module's scheme: 'bf16', 'int4 g128 act-order',
    'e4m3 block 128x128', 'int8 channel w8a8'."""
    sc = scheme or {}
    w = sc.get("weights") or {}     # compressed-tensors QuantizationArgs
    if "weight" in meta and meta["weight"][0] in _FLOATS:
        return _DT[meta["weight"][0]]
    if fmt in ("gptq", "awq"):
        g = sc.get("group_size", 128)
        text = f"int{sc.get('bits', 4)} " + ("channel" if g in (-1, None, k) else f"g{g}")
        return text + (" asym" if fmt == "gptq" and not sc.get("sym", True) else "") + (
            " act-order" if sc.get("desc_act") else "")
    if fmt == "fp8_block":
        bn, bk = sc.get("weight_block_size") or (128, 128)
        return f"e4m3 block {bn}x{bk}"
    if w:
        strategy = w.get("strategy")
        if strategy == "group":
            strategy = f"g{w.get('group_size')}"
        elif strategy == "block" and w.get("block_structure"):
            strategy = "block {}x{}".format(*w["block_structure"])
        kind = "e4m3" if w.get("type") == "float" else f"int{w.get('num_bits')}"
        extra = (" asym" if w.get("symmetric") is False else "") + (" act-order" if w.get("actorder") else "")
        act = " w8a8" if fmt in ("ct_int8", "ct_fp8") and sc.get("input_activations") else ""
        return f"{kind} {strategy}{extra}{act}"
    return ""


def _identity_diff(a: ModelArgs, b: ModelArgs) -> list[str]:
    ia, ib = a.identity(), b.identity()
    return [f"{k} {ia[k]} vs {ib[k]}" for k in ia if ia[k] != ib[k]]


def _raise(origin: str, errors: list[MixprecError]):
    """One error listing all; its type is the most specific class every error shares."""
    cls = next(c for c in type(errors[0]).__mro__ if all(isinstance(e, c) for e in errors))
    if not issubclass(cls, MixprecError):
        cls = MixprecError
    shown = [str(e) for e in errors[:MAX_LISTED]]
    more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    err = cls(f"{origin}: {len(errors)} problem{'s' * (len(errors) > 1)} in the mix:\n  - "
              + "\n  - ".join(shown) + more)
    err.errors = [str(e) for e in errors]
    raise err


# -- the planner -----------------------------------------------------------------------------
def make_plan(cfg: MixConfig, strict: bool = True) -> Plan:
    """Resolve every linear of the model to (source, format) from headers only.
    strict: raise one error listing every problem; otherwise return the plan with `.errors`
    (entries then hold only the modules that resolved cleanly)."""
    errors: list[MixprecError] = []
    opened: dict[Path, Checkpoint] = {}
    sources: dict[str, Checkpoint] = {}
    for name, p in cfg.sources.items():
        try:
            if p not in opened:
                opened[p] = Checkpoint(p)
            sources[name] = opened[p]
        except CheckpointError as e:
            errors.append(type(e)(f"source {name!r}: {e}"))
    if "model" not in sources:
        _raise(cfg.origin, errors)
    base = sources["model"]
    try:
        args = base.args
    except MixprecError as e:
        _raise(cfg.origin, [*errors, e])

    usable = {"model"}
    for name, ck in sources.items():
        if ck is base:
            usable.add(name)
            continue
        try:
            diff = _identity_diff(args, ck.args)
        except MixprecError as e:
            errors.append(e)
            continue
        if diff:
            errors.append(ModelMismatch(f"source {name!r} ({ck.path}) is not the same model as model ({base.path}): "
                                        + ", ".join(diff)))
        else:
            usable.add(name)

    plain_bytes = 0
    for t, shape in args.plain_tensors().items():
        if t not in base:
            errors.append(MissingWeight(f"{base.path}: no tensor {t!r} (embeddings, norms and routers come from "
                                        "the model checkpoint)"))
            continue
        try:
            dt, sh = base.meta(t)
        except CheckpointError as e:
            errors.append(e)
            continue
        if sh != tuple(shape) or dt not in _FLOATS:
            errors.append(ShapeMismatch(f"{base.shard_of(t)}: {t} is {_DT.get(dt, dt)}{list(sh)}, expected a "
                                        f"float tensor of shape {list(shape)}"))
        plain_bytes += base.nbytes(t)

    shapes = args.linear_shapes()   # without lm_head when tied to model.embed_tokens
    problems: list[str] = []
    assign = cfg.resolve(list(shapes), problems)   # best effort on errors, so the rest is checked too
    errors += [ConfigError(f"{cfg.origin}: {s}") for s in problems]

    entries: dict[str, Entry] = {}
    missing = 0
    for m, (src, rule) in assign.items():
        if src not in usable:   # its source failed to open or is another model: reported above
            continue
        ck, (n, k) = sources[src], shapes[m]
        why = f"source {src!r}, " + (f"chosen by {rule.origin}" if rule else "the default")
        try:
            meta = ck.module_meta(m)
            if not meta:
                missing += 1   # hints scan the names: only for the first few
                near = ck.near(m + ".weight") if missing <= 8 else []
                hint = f"; nearby: {', '.join(near)}" if near else ""
                raise MissingWeight(f"{ck.path}: no tensors for {m} ({why}{hint})")
            scheme = resolve_scheme(ck.quant_config, m)
            fmt = detect(meta, scheme, f"{ck.path}: {m}")
        except MixprecError as e:
            errors.append(e)
            continue
        bad = _light_check(fmt.name, meta, n, k, scheme)
        if bad:
            errors.append(ShapeMismatch(f"{ck.path}: {m} ({fmt.name}, {why}): {bad}"))
            continue
        entries[m] = Entry(m, src, ck.path, fmt.name, fmt.layout, n, k,
                           sum(ck.nbytes(f"{m}.{s}") for s in meta), scheme,
                           rule.origin if rule else None, _params(fmt.name, meta, scheme, k))
    if errors and strict:
        _raise(cfg.origin, errors)
    used = {"model"} | {e.source for e in entries.values()}
    for name in sorted(used & usable):
        _warn_unclaimed(sources[name], args, shapes)
    return Plan(args, cfg, sources, entries, [str(e) for e in errors], plain_bytes)


def _warn_unclaimed(ck: Checkpoint, args: ModelArgs, shapes: dict) -> None:
    """Warn about tensors of a checkpoint that no module of the architecture reads: layers or
    experts beyond the config, modules the model does not have (a shared expert), an lm_head
    beside tied embeddings. They are not loaded; a checkpoint with them is likely not the model
    its config.json describes."""
    rescales = set(((ck.config.get("mixprec") or {}).get("input_rescale") or {}).values())   # exported mixes
    plain = args.plain_tensors()
    extra = [n for n in ck.names() if n not in plain and n.rsplit(".", 1)[0] not in shapes and n not in rescales]
    if extra:
        warnings.warn(f"{ck.path}: {len(extra)} tensors belong to no module of this model "
                      f"({args.num_hidden_layers} layers, {args.num_experts} experts per MoE layer, tied "
                      f"embeddings: {args.tie_word_embeddings}) and are not loaded: {', '.join(extra[:6])}"
                      + (", ..." if len(extra) > 6 else ""), stacklevel=3)
