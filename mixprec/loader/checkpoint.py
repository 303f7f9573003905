"""Lazy, memory-mapped access to one HF checkpoint directory (safetensors only).

A checkpoint is a directory with config.json and either `model.safetensors` or
`model.safetensors.index.json` over shards. Opening it reads config.json and every shard's
header (a few KB each) and validates them against the file sizes, so a truncated or corrupt
shard, or an index naming a missing shard / tensor, fails at open and not half-way through a
load. Tensor data is only read on `get` / `get_slice` / `module`, through safetensors'
`safe_open` (mmap; one handle per shard, kept open). Pickle files are never read.
"""
from __future__ import annotations

import difflib
import json
import math
import warnings
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..config import ModelArgs
from ..errors import CheckpointError, MissingWeight

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 << 20   # safetensors' own limit on the JSON header

# safetensors dtype tag -> (bits per element, torch dtype name)
_DTYPES = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "I16": (16, "int16"),
    "U16": (16, "uint16"), "I32": (32, "int32"), "U32": (32, "uint32"), "I64": (64, "int64"),
    "U64": (64, "uint64"), "F16": (16, "float16"), "BF16": (16, "bfloat16"), "F32": (32, "float32"),
    "F64": (64, "float64"), "C64": (64, "complex64"), "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2"), "F8_E8M0": (8, "float8_e8m0fnu"), "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, ""), "F6_E3M2": (6, ""),
}


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate one safetensors header: name -> {dtype, shape, data_offsets}.
    Checks header length and JSON, dtype tags, that each tensor's byte span matches its shape
    and that the data the header describes fits in the file (catches truncated downloads)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes): "
                                      "truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            bits = _DTYPES[dtype][0]
            numel = math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {[start, end]}")
        if numel * bits != 8 * (end - start):
            raise CheckpointError(f"{path}: tensor {name!r} is {end - start} bytes but {dtype}{list(shape)} "
                                  f"needs {numel * bits / 8:g}")
        spans.append((end, name))
    if spans:
        end, name = max(spans)
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section "
                                  f"but the file holds only {data_size} data bytes")
    return header


class Checkpoint:
    """One checkpoint directory. See the module docstring; every error names the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory does not exist")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{cfg_file}: config.json not found (a checkpoint directory needs one)")
        try:
            self.config: dict = json.loads(cfg_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_file}: expected a JSON object")
        qc = self.config.get("quantization_config", self.config.get("compression_config"))
        self.quant_config: dict | None = qc
        self._where: dict[str, Path] = {}            # tensor -> shard file
        self._info: dict[str, dict] = {}             # tensor -> header entry
        self._children: dict[str, dict[str, str]] = {}   # module prefix -> {suffix: tensor name}
        self._handles: dict[Path, object] = {}
        self._open_shards()
        for name in self._where:
            parent, _, suffix = name.rpartition(".")
            self._children.setdefault(parent, {})[suffix] = name

    # -- opening -------------------------------------------------------------------------
    def _open_shards(self) -> None:
        index, single = self.path / INDEX, self.path / SINGLE
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
            if not isinstance(wmap, dict) or not all(isinstance(v, str) and v for v in wmap.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            headers, files = {}, {}
            for shard in dict.fromkeys(wmap.values()):
                f = files[shard] = self.path / shard
                if not f.is_file():
                    users = [t for t, s in wmap.items() if s == shard]
                    raise CheckpointError(f"{index} names shard {shard!r} (for {len(users)} tensors, e.g. "
                                          f"{users[0]!r}) but {f} does not exist")
                headers[shard] = read_header(f)
            for name, shard in wmap.items():
                info = headers[shard].get(name)
                if info is None:
                    raise MissingWeight(f"{index} lists tensor {name!r} in {shard}, but {files[shard]} "
                                        "does not contain it")
                self._where[name] = files[shard]
                self._info[name] = info
            hidden = [n for shard, h in headers.items() for n in h if wmap.get(n) != shard]
            if hidden:      # readers follow the index: these are never read (by transformers neither)
                warnings.warn(f"{index}: {len(hidden)} tensors in the shards are not listed there (or listed "
                              f"in another shard) and are not read: {', '.join(hidden[:6])}"
                              + (", ..." if len(hidden) > 6 else ""), stacklevel=4)
            return
        if single.is_file():
            files = [single]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            what = f"only {', '.join(pickles[:4])}" if pickles else "no weight files"
            raise CheckpointError(f"{self.path}: {what}; only safetensors checkpoints are read "
                                  f"({SINGLE} or {INDEX} + shards), pickle files are never loaded")
        for f in files:   # no index: every *.safetensors file, each tensor in exactly one of them
            for name, info in read_header(f).items():
                if name in self._where:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is in both {self._where[name].name} and "
                                          f"{f.name} and there is no {INDEX} to say which one counts")
                self._where[name], self._info[name] = f, info

    def _handle(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard}: cannot open: {e}") from None
            self._handles[shard] = h
        return h

    def close(self) -> None:
        """Drop the shard handles (their mmaps are released once no tensor views remain)."""
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata (headers only) ----------------------------------------------------------
    @cached_property
    def args(self) -> ModelArgs:
        return ModelArgs.from_hf(self.path / "config.json")

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _entry(self, name: str) -> dict:
        info = self._info.get(name)
        if info is None:
            raise MissingWeight(self._missing_msg(name))
        return info

    def near(self, name: str) -> list[str]:
        """A few existing names close to `name` (same module first, then its parent), for hints."""
        parts = name.split(".")
        for cut in range(len(parts) - 1, max(len(parts) - 4, 0), -1):
            pre = ".".join(parts[:cut]) + "."
            pool = [n for n in self._where if n.startswith(pre)]
            if pool:
                return difflib.get_close_matches(name, pool, n=4, cutoff=0.0)
        return []

    def _missing_msg(self, name: str) -> str:
        near = self.near(name)
        hint = f" (nearby: {', '.join(near)})" if near else ""
        return f"{self.path}: no tensor {name!r}{hint}"

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        info = self._entry(name)
        tname = _DTYPES[info["dtype"]][1]
        dtype = getattr(torch, tname, None) if tname else None
        if dtype is None:
            raise CheckpointError(f"{self._where[name]}: tensor {name!r} has dtype {info['dtype']}, "
                                  f"which this torch ({torch.__version__}) cannot represent")
        return dtype, tuple(int(s) for s in info["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self._entry(name)["data_offsets"]
        return end - start

    def shard_of(self, name: str) -> Path:
        self._entry(name)
        return self._where[name]

    def module_meta(self, prefix: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Tensors directly under `prefix.` (suffix -> (dtype, shape)); {} when there are none."""
        return {s: self.meta(n) for s, n in self._children.get(prefix, {}).items()}

    # -- data ----------------------------------------------------------------------------
    def get(self, name: str) -> Tensor:
        self._entry(name)
        return self._handle(self._where[name]).get_tensor(name)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        """tensor[..., start:stop, ...] along `dim`, reading only those bytes from the mmap."""
        _, shape = self.meta(name)
        nd = len(shape)
        if not -nd <= dim < nd:
            raise IndexError(f"{self._where[name]}: {name!r} has shape {list(shape)}, no dim {dim}")
        dim %= nd
        if not 0 <= start <= stop <= shape[dim]:
            raise IndexError(f"{self._where[name]}: {name!r} dim {dim} has size {shape[dim]}, "
                             f"cannot slice [{start}:{stop}]")
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._handle(self._where[name]).get_slice(name)[index]

    def module(self, prefix: str) -> dict[str, Tensor]:
        """All tensors directly under `prefix.` (suffix -> tensor); MissingWeight when none."""
        kids = self._children.get(prefix)
        if not kids:
            near = self.near(prefix + ".weight")
            hint = f" (nearby: {', '.join(near)})" if near else ""
            raise MissingWeight(f"{self.path}: no tensors for module {prefix!r}{hint}")
        return {s: self.get(n) for s, n in kids.items()}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._where)} tensors)"
