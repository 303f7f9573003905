"""Full-size models with random weights, built directly in each format's packed tensors.

Used to benchmark the real Qwen3-30B-A3B / 235B-A22B shapes without checkpoints. Every weight
goes through the same path as real loading: float weight -> the producer's on-disk tensors
(`pack`) -> `load_module` -> `model.set_linear`; only the disk is skipped. The weights are
generated on the target device, one module at a time.
"""
from __future__ import annotations

import re
import zlib

import torch

from ..config import ModelArgs, Rule, parse_experts
from ..formats import FORMATS, load_module, resolve_scheme
from ..models.qwen3 import Qwen3ForCausalLM

ARCHS = {
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, rope_theta=1e6,
                          max_position_embeddings=40960),
    "qwen3-235b-a22b": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, intermediate_size=12288, num_experts=128,
                            num_experts_per_tok=8, moe_intermediate_size=1536, rope_theta=1e6,
                            max_position_embeddings=40960),
}

# format spec name -> (checkpoint format, pack params)
SPECS = {
    "bf16": ("dense", {}),
    "fp8": ("fp8_block", {"block": (128, 128)}),
    "int4": ("gptq", {"bits": 4, "group_size": 128, "sym": True}),
    "int4-asym": ("awq", {"group_size": 128}),
    "int8": ("ct_int8", {}),
}

PRESETS = {
    "bf16": [],
    "fp8": [(r".", "fp8")],
    "int4": [(r"mlp\.experts", "int4"), (r".", "fp8")],         # int4 experts + fp8 attention
    "int4-all": [(r".", "int4")],      # every linear int4 but lm_head (bf16 in every preset: spec_for), as GPTQ-Int4 releases
    "int8": [(r".", "int8")],
    # per-expert and per-projection mix: experts 0-63 int4, 64-95 fp8 (down bf16), rest int8/fp8
    "mixed": [(r"mlp\.experts\.([0-9]|[1-5][0-9]|6[0-3])\.", "int4"),
              (r"mlp\.experts\.(6[4-9]|[7-8][0-9]|9[0-5])\.down_proj", "bf16"),
              (r"mlp\.experts\.(6[4-9]|[7-8][0-9]|9[0-5])\.", "fp8"),
              (r"mlp\.experts\..*down_proj", "fp8"),
              (r"mlp\.experts", "int8"),
              (r".", "fp8")],
}


def synthetic_args(arch: str, layers: int | None = None) -> ModelArgs:
    cfg = dict(ARCHS[arch])
    if layers:
        cfg["num_hidden_layers"] = layers
    return ModelArgs.from_hf(cfg)


def parse_mix(mix: str) -> list:
    """A preset name, a native mix YAML whose sources are named by format spec (as `mixprec plan`
    writes from a synthetic profile: `use: int4`, `use: fp8`, `model` = bf16), or
    'regex=spec;regex=spec'. First match wins; unmatched weights are bf16."""
    if mix in PRESETS:
        return PRESETS[mix]
    if mix.endswith((".yaml", ".yml")):
        return _yaml_rules(mix)
    rules = []
    for part in filter(None, (p.strip() for p in mix.split(";"))):
        rx, _, spec = part.rpartition("=")
        if spec not in SPECS:
            raise ValueError(f"--mix {part!r}: unknown format {spec!r}; known: {', '.join(SPECS)}")
        try:
            re.compile(rx)
        except re.error as err:
            raise ValueError(f"--mix {part!r}: bad regex {rx!r}: {err}") from None
        rules.append((rx, spec))
    if not rules:
        raise ValueError(f"--mix {mix!r}: no preset ({', '.join(PRESETS)}), no *.yaml file and no 'regex=format' rule")
    return rules


def split_mixes(text: str) -> list[str]:
    r"""`bench --mix a,b`: the mixes, split at commas outside (), [] and {} so that a rule's
    regex keeps its own commas (`experts\.[0-9]{1,2}\.=int4`)."""
    out, depth, cur, esc = [], 0, "", False
    for ch in text:
        if not esc and ch in "([{":
            depth += 1
        elif not esc and ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0 and not esc:
            out.append(cur)
            cur = ""
        else:
            cur += ch
        esc = ch == "\\" and not esc
    out.append(cur)
    mixes = [m.strip() for m in out]
    if not all(mixes):
        raise ValueError(f"--mix {text!r}: an empty mix between commas")
    return mixes


def _yaml_rules(path: str) -> list[Rule]:
    import yaml
    d = yaml.safe_load(open(path)) or {}
    rules = []
    for i, w in enumerate(d.get("weights") or []):
        spec = "bf16" if w["use"] == "model" else w["use"]
        if spec not in SPECS:
            raise ValueError(f"{path}: weights[{i}] uses {w['use']!r}; a synthetic mix names sources by format "
                             f"spec ({', '.join(SPECS)}) or 'model'")
        rules.append(Rule(w["match"], parse_experts(w.get("experts"), f"weights[{i}]"), spec, f"weights[{i}]"))
    return rules


def _rule_for(module: str, rules):
    """The first rule matching `module` (None: bf16; lm_head is always bf16)."""
    if module == "lm_head":          # published quantized releases keep the head in bf16
        return None
    for r in rules:
        if r.matches(module) if isinstance(r, Rule) else re.search(r[0], module):
            return r
    return None


def _spec(rule) -> str:
    return "bf16" if rule is None else rule.use if isinstance(rule, Rule) else rule[1]


def spec_for(module: str, rules) -> str:
    return _spec(_rule_for(module, rules))


def module_generator(name: str, device, seed: int) -> torch.Generator:
    """A generator seeded by (seed, weight name): every weight is the same whichever process or
    order builds it, so a tensor-/expert-parallel rank can build just its own weights."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # CPU: 32-bit seeds


def synthetic_plain(args: ModelArgs, device, dtype: torch.dtype, seed: int = 0):
    """(name, tensor) of every non-linear weight: norms 1, embeddings N(0, 0.02)."""
    for name, shape in args.plain_tensors().items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            g = module_generator(name, device, seed)
            yield name, torch.randn(shape, device=device, dtype=torch.float32, generator=g).mul_(0.02).to(dtype)


def synthetic_linears(args: ModelArgs, mix: str) -> dict[str, tuple[int, int, str]]:
    """module -> (n, k, format spec) of every linear the mix builds."""
    rules = parse_mix(mix)
    shapes = args.linear_shapes()
    if args.tie_word_embeddings:
        shapes.pop("lm_head", None)
    chosen = {m: _rule_for(m, rules) for m in shapes}
    if mix not in PRESETS:   # a preset's rules may name experts a reduced model lacks
        used = {id(r) for r in chosen.values()}
        for r in rules:
            if id(r) not in used:
                what = r.describe() if isinstance(r, Rule) else f"rule {r[0]}={r[1]}"
                raise ValueError(f"--mix {mix}: {what} decides no linear of this model (it matches none, or an "
                                 f"earlier rule takes every match)")
    return {m: (n, k, _spec(chosen[m])) for m, (n, k) in shapes.items()}


def synthetic_linear(module: str, n: int, k: int, spec: str, device, dtype: torch.dtype, seed: int = 0):
    """One random [n, k] weight through the producer's on-disk tensors and `load_module`."""
    fmt_name, params = SPECS[spec]
    fmt = FORMATS[fmt_name]
    W = torch.randn(n, k, device=device, generator=module_generator(module, device, seed)).mul_(k ** -0.5)
    raw = fmt.pack(W, **params)
    scheme = resolve_scheme(fmt.config_block(**params) or None, module)
    return load_module(raw, n, k, scheme, where=f"synthetic:{module}", dtype=dtype)


@torch.inference_mode()
def build_synthetic(args: ModelArgs, mix: str, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                    progress: bool = True) -> Qwen3ForCausalLM:
    from tqdm import tqdm
    linears = synthetic_linears(args, mix)
    model = Qwen3ForCausalLM(args, dtype=dtype, device="meta")
    for name, t in synthetic_plain(args, device, dtype, seed):
        model.set_tensor(name, t)
    for module, (n, k, spec) in tqdm(linears.items(), desc="synthesizing", disable=not progress):
        model.set_linear(module, synthetic_linear(module, n, k, spec, device, dtype, seed))
    model.finalize()
    return model.eval()


def profile_target(argv: list[str], mix: str, layers: int) -> tuple[Qwen3ForCausalLM, list[list[int]], str]:
    """What the profiling scripts time (scripts/profile_decode.py, ncu_step.py; argv `[MIX [LAYERS
    [BATCH [MODEL]]]]`, defaults mix / layers / 1 / qwen3-30b-a3b): a synthetic MODEL-shaped model of
    LAYERS layers, BATCH 128-token prompts whose token ids differ per row (so the rows route apart),
    and the label "MODEL mix=.. layers=.. batch=.."."""
    mix = argv[0] if len(argv) > 0 else mix
    layers = int(argv[1]) if len(argv) > 1 else layers
    batch = int(argv[2]) if len(argv) > 2 else 1
    name = argv[3] if len(argv) > 3 else "qwen3-30b-a3b"
    model = build_synthetic(synthetic_args(name, layers), mix, progress=False)
    prompts = [[(7 * b + 13 * j) % 4096 + 1 for j in range(128)] for b in range(batch)]
    return model, prompts, f"{name} mix={mix} layers={layers} batch={batch}"
