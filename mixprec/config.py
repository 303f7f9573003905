"""Model arguments from config.json, and the mix configuration (both YAML forms)."""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a Qwen3 / Qwen3-MoE model, read from config.json (both spellings)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int            # dense MLP
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": ..., "original_max_position_embeddings": ...}
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, cfg: dict | str | Path) -> "ModelArgs":
        """From a config.json dict or path. Reads the published spelling (num_experts, rope_theta,
        torch_dtype) and the transformers>=5 one (num_local_experts, rope_parameters, dtype)."""
        where = ""
        if not isinstance(cfg, dict):
            p = Path(cfg)
            p = p / "config.json" if p.is_dir() else p
            where = str(p)
            try:
                cfg = json.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{p}: config.json not found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
        text = cfg.get("text_config") if isinstance(cfg, dict) else None
        if not isinstance(cfg, dict) or not isinstance(text, (dict, type(None))):
            raise ConfigError(f"{where or 'config.json'}: expected a JSON object (and text_config one)")
        cfg = dict(text) if "hidden_size" not in cfg and text is not None else dict(cfg)
        _check_types(cfg, where or "config.json")
        # defaults and precedence as transformers' Qwen3 / Qwen3-MoE configs: a rope_theta inside
        # rope_parameters / rope_scaling wins over the top-level one (which only fills it in), 1e4
        # without either; a top-level original_max_position_embeddings overrides the scaling's
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling")
        rope_theta = rope.get("rope_theta", (scaling or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if scaling is None and rope.get("rope_type", "default") not in ("default", None):
            scaling = rope
        if scaling and "original_max_position_embeddings" in cfg and (
                scaling.get("rope_type", scaling.get("type")) in ("yarn", "llama3", "longrope")):
            scaling = {**scaling, "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
        try:
            heads = cfg["num_attention_heads"]
            # Qwen3Config's head_dim default is 128; Qwen3MoeConfig's is hidden / heads
            head_dim = cfg.get("head_dim") or (128 if cfg.get("model_type") == "qwen3" else cfg["hidden_size"] // heads)
            args = cls(
                vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads", heads),
                head_dim=head_dim,
                intermediate_size=cfg.get("intermediate_size", 0),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                num_experts=cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0,
                num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
                moe_intermediate_size=cfg.get("moe_intermediate_size", 0) or 0,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),     # Qwen3MoeConfig's default
                decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
                mlp_only_layers=tuple(cfg.get("mlp_only_layers", ()) or ()),
                attention_bias=bool(cfg.get("attention_bias", False)),
                torch_dtype=str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))),
                extra=cfg,
            )
        except KeyError as e:
            raise ConfigError(f"{where or 'config.json'}: missing key {e.args[0]!r}") from None
        return args

    def identity(self) -> dict:
        """The fields two sources must agree on to describe the same model."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    intermediate_size=self.intermediate_size if any(
                        not self.is_moe_layer(l) for l in range(self.num_hidden_layers)) else None,
                    num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                    moe_intermediate_size=self.moe_intermediate_size,
                    mlp_only_layers=tuple(self.mlp_only_layers), decoder_sparse_step=self.decoder_sparse_step)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every linear module of the model (HF names) -> (N, K). The units a mix config assigns."""
        H, D = self.hidden_size, self.head_dim
        out: dict[str, tuple[int, int]] = {}
        for l in range(self.num_hidden_layers):
            p = f"model.layers.{l}"
            out[f"{p}.self_attn.q_proj"] = (self.num_attention_heads * D, H)
            out[f"{p}.self_attn.k_proj"] = (self.num_key_value_heads * D, H)
            out[f"{p}.self_attn.v_proj"] = (self.num_key_value_heads * D, H)
            out[f"{p}.self_attn.o_proj"] = (H, self.num_attention_heads * D)
            if self.is_moe_layer(l):
                I = self.moe_intermediate_size
                for e in range(self.num_experts):
                    q = f"{p}.mlp.experts.{e}"
                    out[f"{q}.gate_proj"] = (I, H)
                    out[f"{q}.up_proj"] = (I, H)
                    out[f"{q}.down_proj"] = (H, I)
            else:
                I = self.intermediate_size
                out[f"{p}.mlp.gate_proj"] = (I, H)
                out[f"{p}.mlp.up_proj"] = (I, H)
                out[f"{p}.mlp.down_proj"] = (H, I)
        if not self.tie_word_embeddings:
            out["lm_head"] = (self.vocab_size, H)
        return out

    def plain_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors that are never quantized (embeddings, norms, routers) -> shape."""
        H, D = self.hidden_size, self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, H),
                                           "model.norm.weight": (H,)}
        for l in range(self.num_hidden_layers):
            p = f"model.layers.{l}"
            out[f"{p}.input_layernorm.weight"] = (H,)
            out[f"{p}.post_attention_layernorm.weight"] = (H,)
            out[f"{p}.self_attn.q_norm.weight"] = (D,)
            out[f"{p}.self_attn.k_norm.weight"] = (D,)
            if self.is_moe_layer(l):
                out[f"{p}.mlp.gate.weight"] = (self.num_experts, H)
        return out


# ---------------------------------------------------------------------------------------------
# The mix configuration: which checkpoint each linear weight comes from.

SEED_FORMATS = {"fp16": "fp16_path", "bf16": "bf16_path", "fp8": "fp8_path",
                "gptq_int4": "gptq_int4_path", "awq_int4": "awq_int4_path", "int8": "int8_path"}
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                  "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_NATIVE_KEYS = ("model", "sources", "weights", "parallel", "dtype")
_SEED_KEYS = ("mixed_precision", "parallel", "dtype")
_RULE_KEYS = ("match", "use", "experts")
_EXPERT_RX = re.compile(r"\.experts\.(\d+)\.")
_LAYER_RX = re.compile(r"^model\.layers\.(\d+)\.")
# SGLang / vLLM fused names -> the HF projections they stand for
_FUSED = {"w13": ("gate_proj", "up_proj"), "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
          "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def normalize_name(name: str) -> list[str]:
    """An exact weight name (HF or SGLang spelling) -> the HF linear module names it covers.
    'model.layers.0.mlp.experts.7.w13_weight' -> [...experts.7.gate_proj, ...experts.7.up_proj].
    A fused expert name without an index ('...mlp.experts.w2_weight', SGLang's stacked
    parameter) covers every expert and comes back as '...mlp.experts.*.down_proj'."""
    n = name.strip()
    for suffix in (".weight", "_weight"):
        if n.endswith(suffix):
            n = n[: -len(suffix)]
            break
    head, _, last = n.rpartition(".")
    if last in _FUSED and head:
        if head.endswith(".experts"):
            head += ".*"
        return [f"{head}.{p}" for p in _FUSED[last]]
    return [n]


def hf_pattern(pattern: str) -> str:
    """A rule regex with SGLang tokens rewritten to HF names: `.weight`/`_weight` dropped (module
    names carry none), `w13`/`gate_up_proj` -> (gate_proj|up_proj), `w1`/`w3`/`w2` ->
    gate/up/down_proj, `qkv_proj` -> (q_proj|k_proj|v_proj). Tokens must stand alone
    (`\\w1` or `w13x` are left as written)."""
    p = re.sub(r"(?:\\\.|\.|_)weight(?![A-Za-z0-9_])", "", pattern)
    for tok, projs in _FUSED.items():
        rep = projs[0] if len(projs) == 1 else "(?:" + "|".join(projs) + ")"
        p = re.sub(rf"(?<![A-Za-z0-9_\\]){tok}(?![A-Za-z0-9])", rep, p)
    return p


_LAYER_NAME_RX = re.compile(r"model\.layers\.(\d+)\.")
# '^model\.layers\.12\.' or '^model\.layers\.(?:0|1|5)\.' at the start of a rule's regex
_ANCHOR_RX = re.compile(r"\^model\\\.layers\\\.(?:(\d+)|\(\?:((?:\d+\|)*\d+)\))\\\.")


def _anchored_layers(pattern: str) -> frozenset[int] | None:
    """The layers a regex can match when it starts with an anchored layer (alternation), else None
    (also where a top-level '|' lets another branch match other names: '^model\\.layers\\.0\\.x|y')."""
    m = _ANCHOR_RX.match(pattern)
    if m is None or _top_level_bar(pattern):
        return None
    return frozenset(int(x) for x in (m.group(1) or m.group(2)).split("|"))


def _top_level_bar(pattern: str) -> bool:
    """Whether the regex has a '|' outside every group and character class."""
    depth, i, in_class = 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 1                            # the escaped character is a literal
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += pattern.startswith("^", i + 1)
            i += pattern.startswith("]", i + 1)   # a ']' first in a class is a literal
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(hf_pattern(pattern))


MAX_EXPERT_ID = 1 << 16


def parse_experts(spec, where: str) -> frozenset[int] | None:
    """'0-63,100' / 7 / [0, 1, '4-7'] -> frozenset of expert indices; None stays None."""
    if spec is None:
        return None
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.add(item)
            continue
        if not isinstance(item, str):
            raise ConfigError(f"{where}: experts {spec!r}: expected indices like '0-63,100'")
        for part in item.split(","):
            a, dash, b = part.strip().partition("-")
            try:
                lo, hi = int(a), int(b) if dash else int(a)
            except ValueError:
                raise ConfigError(f"{where}: experts {spec!r}: cannot read {part.strip()!r}; "
                                  "expected indices and ranges like '0-63,100'") from None
            if lo < 0 or hi < lo:
                raise ConfigError(f"{where}: experts {spec!r}: bad range {part.strip()!r}")
            if hi >= MAX_EXPERT_ID:      # checked against the model later; bounded here before expanding
                raise ConfigError(f"{where}: experts {spec!r}: {hi} is beyond any MoE model's experts "
                                  f"(ids < {MAX_EXPERT_ID})")
            out.update(range(lo, hi + 1))
    if not out:
        raise ConfigError(f"{where}: experts {spec!r} names no expert")
    return frozenset(out)


def format_experts(idx) -> str:
    """Indices -> compact ranges: {0,1,2,3,7} -> '0-3,7'."""
    s = sorted(set(idx))
    runs, i = [], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        runs.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(runs)


@dataclass(frozen=True)
class Rule:
    """One assignment. `match` is a regex searched in HF module names (SGLang tokens allowed, see
    hf_pattern), or with `exact` an HF module name. `experts` restricts a regex rule to those
    expert indices (and so to expert weights). `origin` names the config entry for messages."""
    match: str
    experts: frozenset[int] | None
    use: str
    origin: str
    exact: bool = False

    def matches(self, module: str) -> bool:
        if self.exact:
            return module == self.match
        if self.experts is not None:
            m = _EXPERT_RX.search(module)
            if m is None or int(m.group(1)) not in self.experts:
                return False
        return _compiled(self.match).search(module) is not None

    def describe(self) -> str:
        ex = f", experts: '{format_experts(self.experts)}'" if self.experts is not None else ""
        return f"{self.origin} {{match: {self.match!r}{ex}, use: {self.use}}}"


# config.json integers: (key, smallest valid value); absent keys are checked where they are needed
_INT_KEYS = (("vocab_size", 1), ("hidden_size", 1), ("num_hidden_layers", 1), ("num_attention_heads", 1),
             ("num_key_value_heads", 1), ("head_dim", 1), ("intermediate_size", 0), ("num_experts", 0),
             ("num_local_experts", 0), ("num_experts_per_tok", 0), ("moe_intermediate_size", 0),
             ("max_position_embeddings", 1), ("decoder_sparse_step", 1))


_POSITIVE_KEYS = ("rms_norm_eps", "rope_theta")                  # numbers > 0
_OBJECT_KEYS = ("rope_scaling", "rope_parameters")                  # JSON objects
_BOOL_KEYS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias")


def _check_types(cfg: dict, where: str) -> None:
    """One ConfigError naming every key of config.json that this model reads and that has the
    wrong JSON type: integers below their minimum (a string or a negative layer count had surfaced
    as shape errors or a 0-layer plan), non-positive eps / rope_theta, non-object rope settings,
    non-boolean flags (bool("false") is True), mlp_only_layers not a list of layer indices (each
    had surfaced as a bare TypeError, some only in the first forward). Integral floats (40960.0,
    as some exporters write) become ints, as transformers takes them."""
    def integer(v):     # a JSON integer (Python's bool is an int)
        return isinstance(v, int) and not isinstance(v, bool)

    def positive(v):
        return (integer(v) or isinstance(v, float)) and v > 0

    bad = []
    for k, lo in _INT_KEYS:
        v = cfg.get(k)
        if isinstance(v, float) and v.is_integer():
            v = cfg[k] = int(v)
        if v is not None and not (integer(v) and v >= lo):
            bad.append(f"{k}: {v!r} (expected an integer >= {lo})")
    bad += [f"{k}: {cfg[k]!r} (expected a number > 0)" for k in _POSITIVE_KEYS
            if cfg.get(k) is not None and not positive(cfg[k])]
    bad += [f"{k}: {cfg[k]!r} (expected a JSON object)" for k in _OBJECT_KEYS
            if cfg.get(k) is not None and not isinstance(cfg[k], dict)]
    bad += [f"{k}.rope_theta: {cfg[k]['rope_theta']!r} (expected a number > 0)" for k in _OBJECT_KEYS
            if isinstance(cfg.get(k), dict) and cfg[k].get("rope_theta") is not None
            and not positive(cfg[k]["rope_theta"])]
    bad += [f"{k}: {cfg[k]!r} (expected true or false)" for k in _BOOL_KEYS
            if cfg.get(k) is not None and not isinstance(cfg[k], bool)]
    layers = cfg.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(integer(v) and v >= 0 for v in layers)):
        bad.append(f"mlp_only_layers: {layers!r} (expected a list of layer indices)")
    if bad:
        raise ConfigError(f"{where}: " + "; ".join(bad))


def export_manifest(ckpt: Path) -> dict:
    """The "mixprec" manifest in an exported mix's config.json (planner/export.py); {} for any
    other checkpoint."""
    try:
        return json.loads((ckpt / "config.json").read_text()).get("mixprec") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{ckpt / 'config.json'}: not a readable JSON object ({e})") from None


def compute_dtype(d, what: str = "dtype") -> torch.dtype:
    """A compute dtype from a name ('bf16', 'float32', ...) or a torch.dtype; ConfigError naming
    `what` otherwise."""
    dt = d if isinstance(d, torch.dtype) else COMPUTE_DTYPES.get(str(d))
    if dt not in COMPUTE_DTYPES.values():
        raise ConfigError(f"{what} {d!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return dt


def compute_device(d, what: str = "device") -> torch.device:
    """A device the weights go to: cpu, cuda or cuda:N (a string or a torch.device); ConfigError
    naming `what` otherwise."""
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} {d!r}: expected cpu, cuda or cuda:N")
    return dev


def read_yaml(p: Path):
    """The parsed YAML of a mix config file; ConfigError naming the file otherwise."""
    try:
        return yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read mix config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML mix config (binary data): pass a YAML file or a checkpoint "
                          f"directory") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    ep: int = 1

    def __getitem__(self, key: str) -> int:   # also readable as cfg.parallel["tp"]
        return getattr(self, key)


def _fail(origin: str, errors: list[str]) -> ConfigError:
    """One ConfigError listing every problem; the list is kept as `.errors`."""
    head = f"{origin}: {len(errors)} error{'s' * (len(errors) > 1)} in the mix config"
    err = ConfigError(head + ":\n  - " + "\n  - ".join(errors))
    err.errors = list(errors)
    return err


@dataclass(frozen=True)
class MixConfig:
    """Which checkpoint each linear comes from. `model` is the base checkpoint (config.json,
    tokenizer, every non-linear tensor, and every linear no rule assigns); `sources` always
    includes it as "model". `form` = "native" (first matching rule wins), "seed" (weight_mapping
    entries: order-free, two entries giving one weight different sources are an error) or
    "checkpoint" (one directory, no rules)."""
    model: Path
    sources: dict[str, Path] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    parallel: Parallel = Parallel()
    dtype: torch.dtype = torch.bfloat16
    origin: str = "<dict>"
    form: str = "native"

    def __post_init__(self):
        def set_(k, v):   # frozen dataclass: normalise fields once, here
            object.__setattr__(self, k, v)
        set_("model", Path(self.model))
        srcs = {str(k): Path(v) for k, v in self.sources.items()}
        if srcs.setdefault("model", self.model) != self.model:
            raise ConfigError(f"{self.origin}: source 'model' is {srcs['model']} but model is {self.model}")
        set_("sources", srcs)
        set_("rules", tuple(self.rules))
        if not isinstance(self.parallel, Parallel):
            errs: list[str] = []
            set_("parallel", MixConfig._parallel(self.parallel, errs))
            if errs:
                raise _fail(self.origin, errs)
        if not isinstance(self.dtype, torch.dtype):
            if str(self.dtype) not in COMPUTE_DTYPES:
                raise ConfigError(f"{self.origin}: dtype {self.dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
            set_("dtype", COMPUTE_DTYPES[str(self.dtype)])
        if self.form not in ("native", "seed", "checkpoint"):
            raise ConfigError(f"{self.origin}: form {self.form!r}: expected native, seed or checkpoint")
        bad = [f"{r.origin}: use {r.use!r} is not a source (sources: {', '.join(srcs)})"
               for r in self.rules if r.use not in srcs]
        if bad:
            raise _fail(self.origin, bad)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def for_checkpoint(cls, path: str | Path) -> "MixConfig":
        p = Path(path).expanduser().resolve()
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: not a checkpoint directory (no config.json)")
        # an exported mix computes in the dtype of the mix it was
        return cls(model=p, origin=str(p), form="checkpoint", dtype=export_manifest(p).get("dtype", "bfloat16"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MixConfig":
        p = Path(path).expanduser().resolve()
        return cls.from_dict(read_yaml(p), origin=str(p), base_dir=p.parent)

    @classmethod
    def from_dict(cls, d: dict, origin: str = "<dict>", base_dir: str | Path | None = None) -> "MixConfig":
        """Either form (see DESIGN.md). Relative paths resolve against `base_dir` (the YAML file's
        directory; the working directory for a dict). Every problem is collected into one error."""
        if not isinstance(d, dict):
            raise ConfigError(f"{origin}: a mix config is a mapping, got {type(d).__name__}")
        base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        errors: list[str] = []

        def path(value, key: str) -> Path | None:
            if not isinstance(value, (str, Path)) or not str(value).strip():
                errors.append(f"{key}: expected a checkpoint directory path, got {value!r}")
                return None
            raw = Path(str(value).strip()).expanduser()
            p = (raw if raw.is_absolute() else base_dir / raw).resolve()
            shown = str(raw) if raw.is_absolute() else f"{str(raw)!r} (resolved to {p})"
            if not p.exists():
                errors.append(f"{key}: {shown} does not exist")
            elif not p.is_dir():
                errors.append(f"{key}: {shown} is not a directory")
            else:
                return p
            return None

        seed = "mixed_precision" in d
        allowed = _SEED_KEYS if seed else _NATIVE_KEYS
        for k in d:
            if k not in allowed:
                errors.append(f"unknown key {k!r} (the {'seed' if seed else 'native'} form takes "
                              f"{', '.join(allowed)})")
        if seed:
            model, sources, rules = cls._seed(d["mixed_precision"], path, errors)
        else:
            model, sources, rules = cls._native(d, path, errors)
        parallel = cls._parallel(d.get("parallel"), errors)
        dtype = d.get("dtype", "bfloat16")
        if str(dtype) not in COMPUTE_DTYPES:
            errors.append(f"dtype: {dtype!r}, expected one of {', '.join(COMPUTE_DTYPES)}")
        if errors or model is None:
            raise _fail(origin, errors or ["no base model"])
        return cls(model=model, sources=sources, rules=tuple(rules), parallel=parallel,
                   dtype=COMPUTE_DTYPES[str(dtype)], origin=origin, form="seed" if seed else "native")

    @staticmethod
    def _seed(mp, path, errors):
        if not isinstance(mp, dict):
            errors.append(f"mixed_precision: expected a mapping, got {type(mp).__name__}")
            return None, {}, []
        allowed = ("base_model_path", "weight_mapping", *SEED_FORMATS.values())
        for k in mp:
            if k not in allowed:
                errors.append(f"mixed_precision: unknown key {k!r} (takes {', '.join(allowed)})")
        if mp.get("base_model_path") is None:
            errors.append("mixed_precision.base_model_path: missing (the base checkpoint)")
            model = None
        else:
            model = path(mp["base_model_path"], "mixed_precision.base_model_path")
        sources = {"model": model} if model else {}
        for fmt, key in SEED_FORMATS.items():
            if mp.get(key) is not None and (p := path(mp[key], f"mixed_precision.{key}")):
                sources[fmt] = p
        mapping = mp.get("weight_mapping") or {}
        if not isinstance(mapping, dict):
            errors.append("mixed_precision.weight_mapping: expected a mapping name -> format, "
                          f"got {type(mapping).__name__}")
            mapping = {}
        rules = []
        for key, fmt in mapping.items():
            where = f"weight_mapping[{key!r}]"
            if not isinstance(key, str) or not isinstance(fmt, str):
                errors.append(f"{where}: expected 'weight name: format', got {key!r}: {fmt!r}")
                continue
            fmt = fmt.strip().lower()
            if fmt not in SEED_FORMATS:
                errors.append(f"{where}: unknown format {fmt!r} (known: {', '.join(SEED_FORMATS)}; "
                              "weights not in weight_mapping come from base_model_path)")
                continue
            if fmt not in sources:
                if mp.get(SEED_FORMATS[fmt]) is None:
                    errors.append(f"{where}: format {fmt!r} but mixed_precision.{SEED_FORMATS[fmt]} is not set")
                continue
            for name in normalize_name(key):
                if ".experts.*." in name:   # SGLang's stacked expert parameter: every expert
                    rx = "^" + re.escape(name).replace(r"\*", r"\d+") + "$"
                    rules.append(Rule(rx, None, fmt, where, exact=False))
                else:
                    rules.append(Rule(name, None, fmt, where, exact=True))
        return model, sources, rules

    @staticmethod
    def _native(d, path, errors):
        model = path(d["model"], "model") if d.get("model") is not None else None
        if d.get("model") is None:
            errors.append("model: missing (the base checkpoint: config.json, tokenizer, default weights)")
        sources = {"model": model} if model else {}
        declared = {"model"}
        srcs = d.get("sources") or {}
        if not isinstance(srcs, dict):
            errors.append(f"sources: expected a mapping name -> checkpoint path, got {type(srcs).__name__}")
            srcs = {}
        for name, value in srcs.items():
            declared.add(str(name))
            p = path(value, f"sources.{name}")
            if p is None:
                continue
            if name == "model" and model and p != model:
                errors.append(f"sources.model: {p} differs from model {model} (the name 'model' is the base)")
            sources[str(name)] = p
        weights = d.get("weights") or []
        if not isinstance(weights, list):
            errors.append(f"weights: expected a list of {{match, use, experts}} rules, got {type(weights).__name__}")
            weights = []
        rules = []
        for i, w in enumerate(weights):
            where = f"weights[{i}]"
            if not isinstance(w, dict):
                errors.append(f"{where}: expected {{match: regex, use: source}}, got {w!r}")
                continue
            bad = [k for k in w if k not in _RULE_KEYS]
            if bad:
                errors.append(f"{where}: unknown key(s) {', '.join(map(repr, bad))} "
                              f"(a rule takes {', '.join(_RULE_KEYS)})")
            match, use = w.get("match"), w.get("use")
            ok = not bad
            if not isinstance(match, str) or not match:
                errors.append(f"{where}: 'match' must be a regex string, got {match!r}")
                ok = False
            else:
                try:
                    _compiled(match)
                except re.error as e:
                    errors.append(f"{where}: match {match!r} is not a valid regex ({e})")
                    ok = False
            if not isinstance(use, str) or use not in declared:
                errors.append(f"{where}: use {use!r} is not a source (sources: {', '.join(sorted(declared))})")
                ok = False
            try:
                experts = parse_experts(w.get("experts"), where)
            except ConfigError as e:
                errors.append(str(e))
                ok = False
            if ok:
                rules.append(Rule(match, experts, use, where))
        return model, sources, rules

    @staticmethod
    def _parallel(p, errors) -> Parallel:
        if p is None:
            return Parallel()
        if not isinstance(p, dict):
            errors.append(f"parallel: expected {{tp: int, ep: int}}, got {p!r}")
            return Parallel()
        vals = {}
        for k, v in p.items():
            if k not in ("tp", "ep"):
                errors.append(f"parallel: unknown key {k!r} (takes tp, ep)")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                errors.append(f"parallel.{k}: expected a positive integer, got {v!r}")
            else:
                vals[k] = v
        return Parallel(**vals)

    # -- resolution -----------------------------------------------------------------------
    def resolve(self, linear_names, errors: list[str] | None = None) -> dict[str, tuple[str, Rule | None]]:
        """Every linear module -> (source name, the rule that chose it or None for the default).
        Errors (all collected, one ConfigError): a rule / mapping entry matching no weight, a
        native rule whose every weight an earlier rule already took, expert indices the model
        lacks, seed entries giving one weight two formats. With an `errors` list, problems are
        appended to it instead and the best-effort assignment is returned (conflicts: the first
        entry), so a caller can go on checking the rest."""
        names = list(linear_names)
        rules = self.rules
        collect = errors is not None
        errors = errors if collect else []
        experts = sorted({int(m.group(1)) for n in names if (m := _EXPERT_RX.search(n))})
        for r in rules:
            if r.experts is not None and not r.exact and (bad := r.experts.difference(experts)):
                have = f"experts {format_experts(experts)}" if experts else "no experts"
                errors.append(f"{r.describe()}: experts {format_experts(bad)} do not exist (the model has {have})")
        exact: dict[str, list[int]] = {}
        for i, r in enumerate(rules):
            if r.exact:
                exact.setdefault(r.match, []).append(i)
        regex = [i for i, r in enumerate(rules) if not r.exact]
        # A rule anchored to given layers ('^model\.layers\.(?:3|7)\.' as the planner writes them) can
        # only match names of those layers: test each name against its layer's rules only.
        layer_of = {i: _anchored_layers(rules[i].match) for i in regex}
        by_layer: dict[int | None, list[int]] = {}

        def candidates(name: str) -> list[int]:
            m = _LAYER_NAME_RX.match(name)
            layer = int(m.group(1)) if m else None
            if layer not in by_layer:
                by_layer[layer] = [i for i in regex if layer_of[i] is None or layer in layer_of[i]]
            return by_layer[layer]
        matched, chosen = [0] * len(rules), [0] * len(rules)
        order_free = self.form == "seed"
        none = len(rules)
        out: dict[str, tuple[str, Rule | None]] = {}
        for n in names:
            hits = exact.get(n, [])
            if order_free:
                hits = hits + [i for i in candidates(n) if rules[i].matches(n)]
            for i in hits:
                matched[i] += 1
            first = hits[0] if hits else none
            if order_free:
                if len({rules[i].use for i in hits}) > 1:
                    says = ", ".join(f"{rules[i].origin} says {rules[i].use}" for i in hits)
                    errors.append(f"{n}: conflicting entries: {says}")
            else:
                for i in candidates(n):   # ascending; after the winner only test rules not yet seen matching
                    if (i > first and matched[i]) or not rules[i].matches(n):
                        continue
                    matched[i] += 1
                    first = min(first, i)
            if first < none:
                chosen[first] += 1
                out[n] = (rules[first].use, rules[first])
            else:
                out[n] = ("model", None)
        missing: dict[str, list[str]] = {}
        for i, r in enumerate(rules):
            if not matched[i]:
                missing.setdefault(r.origin, []).append(r.match)
            elif not chosen[i] and not order_free:
                errors.append(f"{r.describe()}: every weight it matches is taken by an earlier rule "
                              "(first match wins); move it up or remove it")
        if missing:
            hint = _Hints(names)
            for origin, ms in missing.items():
                r = next(r for r in rules if r.origin == origin)
                if r.exact:
                    errors.append(f"{origin}: the model has no weight {', '.join(ms)}{hint(ms[0])}")
                else:
                    hf = hf_pattern(r.match)
                    shown = f" (as HF names: {hf!r})" if hf != r.match else ""
                    errors.append(f"{r.describe()}: matches no weight of the model{shown}")
        if errors and not collect:
            raise _fail(self.origin, errors)
        return out

    # -- writing --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The native form (absolute paths; runs of exact rules compacted to expert ranges)."""
        d: dict = {"model": str(self.model)}
        srcs = {k: str(v) for k, v in self.sources.items() if k != "model"}
        if srcs:
            d["sources"] = srcs
        weights = _rules_to_native(self.rules, order_free=self.form == "seed")
        if weights:
            d["weights"] = weights
        d["parallel"] = {"tp": self.parallel.tp, "ep": self.parallel.ep}
        d["dtype"] = DTYPE_NAMES[self.dtype]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=1 << 16)


class _Hints:
    """Why an exact name is not a weight of the model: wrong layer, expert, kind or a typo."""
    _PLAIN = ("embed_tokens", "norm", "layernorm", "mlp.gate")

    def __init__(self, names: list[str]):
        self.names = names
        self.layers = sorted({int(m.group(1)) for n in names if (m := _LAYER_RX.match(n))})
        self.experts = sorted({int(m.group(1)) for n in names if (m := _EXPERT_RX.search(n))})

    def __call__(self, name: str) -> str:
        lm, em = _LAYER_RX.match(name), _EXPERT_RX.search(name)
        if lm and int(lm.group(1)) not in self.layers:
            return f" (the model has layers {format_experts(self.layers)})"
        if em and int(em.group(1)) not in self.experts:
            have = f"experts {format_experts(self.experts)}" if self.experts else "no experts"
            return f" (the model has {have})"
        if name == "lm_head":
            return " (its lm_head is tied to model.embed_tokens, which always comes from the model checkpoint)"
        if any(name.endswith(p) for p in self._PLAIN):
            return " (not a linear: embeddings, norms and routers always come from the model checkpoint)"
        pool = [n for n in self.names if lm and n.startswith(lm.group(0))] or self.names[:2000]
        near = difflib.get_close_matches(name, pool, n=2, cutoff=0.5)
        return f" (did you mean {' or '.join(near)}?)" if near else ""


def _rules_to_native(rules: tuple[Rule, ...], order_free: bool) -> list[dict]:
    """Rules -> native `weights:` entries. Consecutive exact rules (a seed mapping, a planner's
    output) are grouped: experts with one source become an `experts:` range, then projections,
    then layers, into one anchored regex each. Order between groups is irrelevant because each
    exact name keeps only its first rule, so the groups are disjoint."""
    rules = list(dict.fromkeys((r.match, r.experts, r.use, r.exact) for r in rules))
    if order_free:   # an exact entry already covered by a stacked-expert entry of the same source
        wide = [Rule(m, e, u, "", x) for m, e, u, x in rules if not x]
        rules = [t for t in rules if not t[3] or not any(w.use == t[2] and w.matches(t[0]) for w in wide)]
    out: list[dict] = []
    run: list[tuple[str, str]] = []

    def flush():
        out.extend(_compact_exact(run))
        run.clear()

    seen: set[str] = set()
    for match, experts, use, exact in rules:
        if exact:
            if match not in seen:
                seen.add(match)
                run.append((match, use))
            continue
        flush()
        d = {"match": match, "experts": format_experts(experts)} if experts is not None else {"match": match}
        d["use"] = use
        out.append(d)
    flush()
    return out


_PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARSE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp\.experts\.(\d+)|mlp)\.(\w+)$")


def _compact_exact(run: list[tuple[str, str]]) -> list[dict]:
    by_proj: dict[tuple, set[int]] = {}      # (kind, layer, proj, use) -> experts
    loose: list[dict] = []
    for name, use in run:
        m = _PARSE.match(name)
        if m is None:
            loose.append({"match": "^" + re.escape(name) + "$", "use": use})
            continue
        layer, kind, expert, proj = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        kind = "mlp.experts" if expert is not None else kind
        by_proj.setdefault((kind, layer, proj, use), set()).update([int(expert)] if expert is not None else [])
    by_layer: dict[tuple, list[str]] = {}    # (kind, experts, use, layer) -> projections
    for (kind, layer, proj, use), ex in by_proj.items():
        by_layer.setdefault((kind, frozenset(ex), use, layer), []).append(proj)
    groups: dict[tuple, list[int]] = {}      # (kind, experts, use, projections) -> layers
    for (kind, ex, use, layer), projs in by_layer.items():
        projs = tuple(sorted(projs, key=lambda p: (_PROJ_ORDER.index(p) if p in _PROJ_ORDER else 99, p)))
        groups.setdefault((kind, ex, use, projs), []).append(layer)
    out = []
    for (kind, ex, use, projs), layers in groups.items():
        alt = lambda xs: xs[0] if len(xs) == 1 else "(?:" + "|".join(xs) + ")"  # noqa: E731
        mid = r"mlp\.experts\.\d+" if kind == "mlp.experts" else re.escape(kind)
        rx = rf"^model\.layers\.{alt([str(l) for l in sorted(layers)])}\.{mid}\.{alt(list(projs))}$"
        d = {"match": rx, "experts": format_experts(ex)} if kind == "mlp.experts" else {"match": rx}
        d["use"] = use
        out.append(d)
    return out + loose


def load_config(obj) -> MixConfig:
    """A MixConfig, a dict (either form), a YAML file path, or one checkpoint directory."""
    if isinstance(obj, MixConfig):
        return obj
    if isinstance(obj, dict):
        return MixConfig.from_dict(obj)
    if isinstance(obj, (str, Path)):
        p = Path(obj).expanduser()
        if p.is_dir():
            return MixConfig.for_checkpoint(p)
        if p.is_file():
            return MixConfig.from_yaml(p)
        raise ConfigError(f"{p}: no such mix config file or checkpoint directory")
    raise ConfigError(f"expected a mix config (YAML path, checkpoint directory, dict or MixConfig), "
                      f"got {type(obj).__name__}")
