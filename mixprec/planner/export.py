"""Export an assembled mix as ONE checkpoint directory that mixprec (and, where expressible,
compressed-tensors readers) load without the original sources.

Every tensor is copied byte for byte from its source checkpoint's safetensors file (never
dequantized, never re-encoded): a module keeps its source's tensor names and dtypes (a GPTQ
module keeps qweight/qzeros/scales/g_idx, an FP8 one weight/weight_scale_inv, ...). Embeddings,
norms and routers come from the base, as when loading the mix. Copying is streamed in chunks of
COPY_CHUNK bytes, so memory stays bounded whatever the shard size.

config.json = the base's config.json with
  "quantization_config": every module's scheme. When all quantized modules come from
      compressed-tensors sources, a real compressed-tensors config (one config group per scheme,
      exact module names as targets); otherwise {"quant_method": "mixprec", "schemes": {key:
      scheme}, "modules": {module: key}} (modules absent = unquantized) -- the loader's
      `resolve_scheme` reads it.
  "mixprec": the manifest: the mix's compute dtype, per module its source name, format and params,
      the scheme table, the source paths, and "input_rescale": {module: tensor name} for modules whose source folded
      activation scales into its norms (AWQ, SmoothQuant). The factors (norm_src / norm_base,
      float32, exactly what the loader computes from the sources) are stored as tensors
      "mixprec.input_rescale.<module>", since the exported checkpoint has only the base's norms.

Writing goes to a temporary directory next to OUT_DIR, renamed into place at the end, so an
interrupted export never leaves a directory that looks like a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import DTYPE_NAMES, load_config
from ..errors import CheckpointError, ConfigError, ShapeMismatch
from ..formats import resolve_scheme
from ..loader.assemble import input_rescales
from ..loader.checkpoint import INDEX, SINGLE, Checkpoint, read_header
from ..loader.plan import make_plan

MANIFEST_VERSION = 1
DEFAULT_SHARD = 5 * 10**9
COPY_CHUNK = 64 << 20
RESCALE_PREFIX = "mixprec.input_rescale."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_TAGS = {torch.float32: "F32"}


@dataclass
class _Item:
    """One output tensor: copied from (file, byte offset) of a source shard, or a host tensor."""
    name: str
    tag: str
    shape: list
    nbytes: int
    src_file: Path | None = None
    src_offset: int = 0
    tensor: torch.Tensor | None = None

    def write(self, f, bar) -> None:
        if self.tensor is not None:
            f.write(self.tensor.contiguous().numpy().tobytes())
            bar.update(self.nbytes)
            return
        with open(self.src_file, "rb") as src:
            src.seek(self.src_offset)
            left = self.nbytes
            while left:
                chunk = src.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{self.src_file}: ended while copying {self.name} "
                                          f"({left} of {self.nbytes} bytes missing)")
                f.write(chunk)
                left -= len(chunk)
                bar.update(len(chunk))


class _Headers:
    """Parsed safetensors headers of source shards, cached: tensor -> (tag, shape, file offset)."""

    def __init__(self):
        self.cache: dict[Path, tuple[int, dict]] = {}

    def locate(self, ck: Checkpoint, name: str) -> _Item:
        shard = ck.shard_of(name)
        if shard not in self.cache:
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
            self.cache[shard] = (8 + n, read_header(shard))
        start, header = self.cache[shard]
        info = header[name]
        a, b = info["data_offsets"]
        return _Item(name, info["dtype"], list(info["shape"]), b - a, shard, start + a)


def _order(name: str) -> tuple:
    """Embedding first, then layer by layer, then the final norm and lm_head."""
    m = _LAYER.match(name.removeprefix(RESCALE_PREFIX))
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("model.embed_tokens") else 2, 0, name)


def _schemes(plan) -> tuple[dict[str, dict], dict[str, str]]:
    """Unique schemes -> keys "s0", "s1", ...; module -> key (quantized modules only)."""
    table, keys, mods = {}, {}, {}
    for m, e in plan.entries.items():
        if e.scheme is None:
            continue
        j = json.dumps(e.scheme, sort_keys=True)
        if j not in keys:
            keys[j] = f"s{len(keys)}"
            table[keys[j]] = e.scheme
        mods[m] = keys[j]
    return table, mods


def _ct_config(plan, table: dict, mods: dict) -> dict | None:
    """A compressed-tensors quantization_config giving every module its scheme, or None when some
    quantized module is not compressed-tensors or the config would not resolve back identically."""
    if not mods or any(s.get("quant_method") != "compressed-tensors" for s in table.values()):
        return None
    first = next(e for e in plan.entries.values() if e.scheme is not None)
    qc0 = plan.sources[first.source].quant_config or {}
    groups: dict[str, dict] = {}
    for i, key in enumerate(table):
        s = table[key]
        targets = sorted(m for m, k in mods.items() if k == key)
        groups[f"group_{i}"] = {"targets": targets, "weights": s["weights"],
                                "input_activations": s.get("input_activations"), "output_activations": None,
                                "format": s["format"]}
    fmts = {g["format"] for g in groups.values()}
    qc = {k: v for k, v in qc0.items() if k not in ("config_groups", "ignore", "format")}
    qc.update({"quant_method": "compressed-tensors", "format": fmts.pop() if len(fmts) == 1 else "mixed-precision",
               "ignore": [], "config_groups": groups})
    strip = lambda s: None if s is None else {k: v for k, v in s.items() if k != "group"}  # noqa: E731
    for m, e in plan.entries.items():
        if strip(resolve_scheme(qc, m)) != strip(e.scheme):
            return None
    return qc


def export_mix(config, out_dir: str | Path, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD,
               progress: bool = True) -> Path:
    """Write the mix `config` as one checkpoint in out_dir (see module docstring). A non-empty
    out_dir is refused unless `force` (then replaced once the new one is complete)."""
    cfg = load_config(config)
    out = Path(out_dir).expanduser().resolve()
    plan = make_plan(cfg)
    _check_target(out, plan, force)
    if max_shard_bytes < 1:
        raise ConfigError(f"max shard size {max_shard_bytes}: must be positive")
    rescale = input_rescales(plan)      # refuses mixes whose folded scales cannot be corrected
    base = plan.sources["model"]
    heads = _Headers()
    items: list[_Item] = [heads.locate(base, t) for t in plan.args.plain_tensors()]
    for m, e in plan.entries.items():
        ck = plan.sources[e.source]
        items += [heads.locate(ck, f"{m}.{s}") for s in ck.module_meta(m)]
    for m, f in rescale.items():
        t = f.float().cpu().contiguous()
        items.append(_Item(RESCALE_PREFIX + m, _TAGS[t.dtype], list(t.shape), t.numel() * 4, tensor=t))
    items.sort(key=lambda it: _order(it.name))
    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    table, mods = _schemes(plan)
    qc = _ct_config(plan, table, mods) or ({"quant_method": "mixprec", "schemes": table, "modules": mods}
                                          if mods else None)
    manifest = {"version": MANIFEST_VERSION, "created_by": "mixprec export",
                "dtype": DTYPE_NAMES[cfg.dtype],      # load(OUT_DIR) computes as the mix did
                "sources": {n: str(c.path) for n, c in plan.sources.items()},
                "schemes": table,
                "modules": {m: {"source": e.source, "format": e.fmt_name, "params": e.params,
                                "scheme": mods.get(m)} for m, e in plan.entries.items()},
                "input_rescale": {m: RESCALE_PREFIX + m for m in rescale}}
    config_json = {k: v for k, v in base.config.items() if k not in ("quantization_config", "compression_config")}
    if qc is not None:
        config_json["quantization_config"] = qc
    config_json["mixprec"] = manifest

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the export directory ({e.strerror})") from None
    done = False
    try:
        names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(len(shards))]
        total = sum(it.nbytes for it in items)
        with tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
            for fname, shard in zip(names, shards):
                _write_shard(tmp / fname, shard, bar)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {it.name: fname for fname, shard in zip(names, shards) for it in shard}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (base.path / f).is_file():
                shutil.copyfile(base.path / f, tmp / f)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        _verify(tmp, items)
        _move_into_place(tmp, out)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_shard(path: Path, items: list[_Item], bar) -> None:
    """A safetensors file written tensor by tensor: 8-byte header length, JSON header (padded to
    8 bytes with spaces, as safetensors does), then the data in header order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for it in items:
        header[it.name] = {"dtype": it.tag, "shape": it.shape, "data_offsets": [off, off + it.nbytes]}
        off += it.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for it in items:
            it.write(f, bar)


def _verify(path: Path, items: list[_Item]) -> None:
    """Reopen the written checkpoint (headers checked against file sizes) and check every tensor."""
    ck = Checkpoint(path)
    want = {it.name: it for it in items}
    if set(ck.names()) != set(want):
        raise CheckpointError(f"{path}: written tensors differ from the plan "
                              f"(missing {sorted(set(want) - set(ck.names()))[:3]}, "
                              f"extra {sorted(set(ck.names()) - set(want))[:3]})")
    for name, it in want.items():
        if ck.nbytes(name) != it.nbytes or list(ck.meta(name)[1]) != it.shape:
            raise ShapeMismatch(f"{ck.shard_of(name)}: {name} written as {ck.meta(name)}, expected {it.tag}{it.shape}")
    ck.close()


def _check_target(out: Path, plan, force: bool) -> None:
    for name, ck in plan.sources.items():
        p = ck.path
        if out == p or p.is_relative_to(out):
            raise ConfigError(f"{out}: is (or contains) source {name!r} ({p}); export to another directory")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise ConfigError(f"{out}: directory is not empty; pass --force to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp -> out; an existing out (empty, or replaced with --force) is moved aside first
    and deleted only once the new directory is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def read_manifest(path: str | Path) -> dict | None:
    """The `mixprec` manifest of an exported checkpoint's config.json, or None."""
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text()).get("mixprec")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read ({e})") from None
