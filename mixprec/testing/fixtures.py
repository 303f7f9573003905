"""A tiny random Qwen3-MoE written as real checkpoints in every supported format (no downloads).

    cfg = tiny_config()                      # HF config.json dict (published Qwen3-MoE spelling)
    W = random_weights(cfg, seed=0)          # HF name -> float32 tensor, every weight of the model
    write_checkpoint(dir, cfg, W, fmt="gptq", fmt_params=dict(bits=4, group_size=32, ...))
    paths = make_fixture(root, seed=0)       # {"bf16": root/bf16, "fp8": root/fp8, ...}

Quantized checkpoints hold what their producer writes: quantized linears (attention, dense MLP,
experts) in the format's tensors, everything else (embeddings, norms, router, lm_head) as plain
floats, config.json = model config + the format's `quantization_config`, tokenizer files.
The AWQ fixture has AutoAWQ's activation scales folded into norms / previous linears
(`awq_fold_scales`, `awq_fold`), so its q/k/v/gate/up are only right with its own norms.
"""
from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..formats import FORMATS
from .tokenizer import build_tokenizer, special_token_ids

# Modules a quantizer converts: attention projections, dense MLP and expert projections.
# Not matched: embed_tokens, norms, the router `mlp.gate`, lm_head.
QUANT_TARGETS = r"\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)$"

# name -> (format, pack/config params, write_checkpoint extras). The sibling checkpoints of
# make_fixture. fp8 block 64x64 over moe_intermediate 96 leaves a partial edge block in every
# expert (rows of gate/up, columns of down); attention/dense dims are whole blocks. Scale
# dtypes as the producers write them: bf16 weight_scale_inv (Qwen3 FP8 releases), fp16 GPTQ /
# AWQ scales, bf16 compressed-tensors scales (the model dtype). AWQ's plain tensors are fp16
# (AutoAWQ saves the whole model in fp16); llm-compressor / GPTQModel re-save with
# transformers >= 5 (v5 config spelling).
FIXTURES: dict[str, tuple[str, dict, dict]] = {
    "bf16": ("dense", {}, {"shards": 2}),
    "fp8": ("fp8_block", {"block": [64, 64], "scale_dtype": torch.bfloat16}, {"shards": 2}),
    "gptq": ("gptq", {"bits": 4, "group_size": 32, "sym": True, "desc_act": False,
                      "checkpoint_format": "gptq"}, {}),
    "gptq_v2_asym_actorder": ("gptq", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True,
                                       "checkpoint_format": "gptq_v2"}, {"spelling": "v5"}),
    "awq": ("awq", {"bits": 4, "group_size": 32}, {"dtype": torch.float16, "awq_fold": True}),
    "int8": ("ct_int8", {"strategy": "channel"}, {"spelling": "v5"}),
    "ct_w4a16": ("ct_pack", {"bits": 4, "group_size": 32, "sym": True}, {"spelling": "v5"}),
    "fp8_ct": ("ct_fp8", {"strategy": "channel"}, {"spelling": "v5"}),
}

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
AWQ_SEED_OFFSET = 0xA3C  # the fold scales use their own stream, not the weights'


# --------------------------------------------------------------------------------------------
# config

def tiny_config(layers: int = 2, hidden: int = 256, experts: int = 8, top_k: int = 2, heads: int = 4,
                kv_heads: int = 2, head_dim: int = 64, moe_intermediate: int = 96, intermediate: int = 384,
                vocab: int = 512, mlp_only_layers: tuple[int, ...] = (0,), tie: bool = False,
                decoder_sparse_step: int = 1, max_position_embeddings: int = 4096,
                rope_theta: float = 1e6, rms_norm_eps: float = 1e-6) -> dict:
    """config.json of a small Qwen3-MoE, spelled as the published Qwen3 releases spell it."""
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    if any(not 0 <= l < layers for l in mlp_only_layers):
        raise ValueError(f"mlp_only_layers {mlp_only_layers} outside 0..{layers - 1}")
    ids = special_token_ids(vocab)
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "decoder_sparse_step": decoder_sparse_step,
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": layers,
        "mlp_only_layers": sorted(mlp_only_layers),
        "model_type": "qwen3_moe",
        "moe_intermediate_size": moe_intermediate,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "output_router_logits": False,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(rope_theta),
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def respell_v5(cfg: dict) -> dict:
    """The same config as transformers >= 5 re-saves it (GPTQModel, llm-compressor run on it):
    num_local_experts, rope_parameters, dtype."""
    out = {k: v for k, v in cfg.items() if k not in ("num_experts", "rope_theta", "rope_scaling", "torch_dtype")}
    out["num_local_experts"] = cfg["num_experts"]
    out["rope_parameters"] = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    out["dtype"] = cfg["torch_dtype"]
    out["transformers_version"] = "5.0.0"
    return dict(sorted(out.items()))


def is_moe_layer(cfg: dict, layer: int) -> bool:
    return (cfg["num_experts"] > 0 and layer not in cfg["mlp_only_layers"]
            and (layer + 1) % cfg["decoder_sparse_step"] == 0)


# --------------------------------------------------------------------------------------------
# weights

def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the bf16 checkpoint (HF names, module order) -> shape."""
    H, D, V = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm.weight"] = (H,)
        out[f"{p}.self_attn.q_proj.weight"] = (nq * D, H)
        out[f"{p}.self_attn.k_proj.weight"] = (nkv * D, H)
        out[f"{p}.self_attn.v_proj.weight"] = (nkv * D, H)
        out[f"{p}.self_attn.o_proj.weight"] = (H, nq * D)
        out[f"{p}.self_attn.q_norm.weight"] = (D,)
        out[f"{p}.self_attn.k_norm.weight"] = (D,)
        out[f"{p}.post_attention_layernorm.weight"] = (H,)
        if is_moe_layer(cfg, l):
            I = cfg["moe_intermediate_size"]
            out[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], H)
            for e in range(cfg["num_experts"]):
                q = f"{p}.mlp.experts.{e}"
                out[f"{q}.gate_proj.weight"] = (I, H)
                out[f"{q}.up_proj.weight"] = (I, H)
                out[f"{q}.down_proj.weight"] = (H, I)
        else:
            I = cfg["intermediate_size"]
            out[f"{p}.mlp.gate_proj.weight"] = (I, H)
            out[f"{p}.mlp.up_proj.weight"] = (I, H)
            out[f"{p}.mlp.down_proj.weight"] = (H, I)
    out["model.norm.weight"] = (H,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, H)
    return out


def random_weights(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    """HF name -> float32 tensor. Matrices ~ N(0, 1/fan_in) so activations stay O(1) through the
    layers; embeddings ~ N(0, 1); norm weights 1 + N(0, 0.1^2) so a wrong norm shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return out


def round_to(weights: dict[str, Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """Float32 copies holding exactly the values a `dtype` checkpoint stores."""
    return {k: v.to(dtype).float() for k, v in weights.items()}


# --------------------------------------------------------------------------------------------
# AWQ folding (AutoAWQ's apply_scale: divide the previous op's output, multiply the inputs)

def awq_fold_scales(cfg: dict, seed: int = 0, sigma: float = 0.3) -> dict[str, Tensor]:
    """The per-channel scales AWQ folds, keyed by the op whose output is divided:
    `{l}.input_layernorm` s1 [H] (-> q/k/v columns), `{l}.self_attn.v_proj` s2 [kv_heads*D]
    (-> o_proj columns of every q head of that kv group), `{l}.post_attention_layernorm` s3 [H]
    (-> gate/up columns of all experts or the dense MLP), `...up_proj` s4 [I] per expert or dense
    MLP (-> down_proj columns). s = exp(N(0, sigma^2)), from a stream seeded by `seed`."""
    g = torch.Generator().manual_seed(seed + AWQ_SEED_OFFSET)
    H, D, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_key_value_heads"]

    def draw(n):
        return torch.exp(sigma * torch.randn(n, generator=g))

    out = {}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm"] = draw(H)
        out[f"{p}.self_attn.v_proj"] = draw(nkv * D)
        out[f"{p}.post_attention_layernorm"] = draw(H)
        if is_moe_layer(cfg, l):
            for e in range(cfg["num_experts"]):
                out[f"{p}.mlp.experts.{e}.up_proj"] = draw(cfg["moe_intermediate_size"])
        else:
            out[f"{p}.mlp.up_proj"] = draw(cfg["intermediate_size"])
    return out


def awq_fold(cfg: dict, weights: dict[str, Tensor], scales: dict[str, Tensor],
             fold_router: bool = False, fold_vo: bool = True) -> dict[str, Tensor]:
    """Weights of the AWQ model before quantization: same function as `weights` (up to fp32
    rounding), except that with fold_router=False (AutoAWQ) the router `mlp.gate` keeps its
    weights and so sees the s3-divided norm output; llm-compressor folds it (fold_router=True).
    fold_vo=False skips s2, as AutoAWQ / GPTQModel do for GQA (they fold v->o only when
    v_proj and o_proj have equal shapes); the fixture folds it per kv group, the harder case."""
    w = dict(weights)
    D, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        s1 = scales[f"{p}.input_layernorm"]
        w[f"{p}.input_layernorm.weight"] = w[f"{p}.input_layernorm.weight"] / s1
        for proj in ("q_proj", "k_proj", "v_proj"):
            w[f"{p}.self_attn.{proj}.weight"] = w[f"{p}.self_attn.{proj}.weight"] * s1[None, :]
        if fold_vo:  # q head h reads kv head h // (nq // nkv): o_proj columns get that head's s2
            s2 = scales[f"{p}.self_attn.v_proj"]                              # [nkv*D]
            s2_o = s2.view(nkv, D).repeat_interleave(nq // nkv, dim=0).reshape(-1)  # [nq*D]
            w[f"{p}.self_attn.v_proj.weight"] = w[f"{p}.self_attn.v_proj.weight"] / s2[:, None]
            w[f"{p}.self_attn.o_proj.weight"] = w[f"{p}.self_attn.o_proj.weight"] * s2_o[None, :]
        s3 = scales[f"{p}.post_attention_layernorm"]
        w[f"{p}.post_attention_layernorm.weight"] = w[f"{p}.post_attention_layernorm.weight"] / s3
        if is_moe_layer(cfg, l):
            mlps = [f"{p}.mlp.experts.{e}" for e in range(cfg["num_experts"])]
            if fold_router:
                w[f"{p}.mlp.gate.weight"] = w[f"{p}.mlp.gate.weight"] * s3[None, :]
        else:
            mlps = [f"{p}.mlp"]
        for m in mlps:
            s4 = scales[f"{m}.up_proj"]
            w[f"{m}.gate_proj.weight"] = w[f"{m}.gate_proj.weight"] * s3[None, :]
            w[f"{m}.up_proj.weight"] = w[f"{m}.up_proj.weight"] * s3[None, :] / s4[:, None]
            w[f"{m}.down_proj.weight"] = w[f"{m}.down_proj.weight"] * s4[None, :]
    return w


# --------------------------------------------------------------------------------------------
# writing checkpoints

def _module_params(module: str, fmt_params: dict, overrides: dict[str, dict | None] | None) -> dict | None:
    """Params of one targeted module: the first override regex that matches wins (re.match on
    the module name, as GPTQModel's `dynamic` and compressed-tensors' `re:` targets do);
    None = left unquantized."""
    for pattern, params in (overrides or {}).items():
        if re.match(pattern, module):
            return None if params is None else {**fmt_params, **params}
    return dict(fmt_params)


def _split_shards(tensors: dict[str, Tensor], shards: int) -> list[list[str]]:
    """Contiguous runs of names (module order) of about equal bytes, none empty."""
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards={shards}: need 1..{len(names)} (one tensor at least per shard)")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total, out, cur, acc = sum(sizes), [], [], 0
    for i, (n, s) in enumerate(zip(names, sizes)):
        cur.append(n)
        acc += s
        left_names, left_shards = len(names) - i - 1, shards - len(out) - 1
        if left_shards and (acc >= total * (len(out) + 1) / shards or left_names == left_shards):
            out.append(cur)
            cur = []
    out.append(cur)
    return out


def save_safetensors(out_dir: Path, tensors: dict[str, Tensor], shards: int = 1) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    meta = {"format": "pt"}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=meta)
        return [out_dir / "model.safetensors"]
    files, weight_map = [], {}
    groups = _split_shards(tensors, shards)
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out_dir / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
        files.append(out_dir / fname)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_checkpoint(out_dir: str | Path, cfg: dict, weights: dict[str, Tensor], fmt: str | None = None,
                     fmt_params: dict | None = None, shards: int = 1, tokenizer: bool | str | Path = True,
                     targets: str = QUANT_TARGETS, overrides: dict[str, dict | None] | None = None,
                     dtype: torch.dtype = torch.bfloat16, spelling: str = "v4") -> Path:
    """Write one checkpoint directory: config.json (+ `quantization_config` of `fmt`), safetensors
    (`shards` >= 2 adds model.safetensors.index.json) and, with tokenizer=True, freshly built
    tokenizer files (a path: copy them from that directory).

    Modules whose name matches `targets` (re.search; default: q/k/v/o, dense MLP and expert
    projections) are packed with FORMATS[fmt].pack(W, **params); everything else (embeddings,
    norms, router, lm_head) is stored as `dtype`. `overrides` maps module regexes (re.match, first
    match wins) to None (leave that module unquantized) or a dict of params replacing fmt_params;
    they are written into the config the way the producer records them (see `_quant_config`).
    fmt None / "dense" writes a plain float checkpoint. spelling "v5" writes the config as
    transformers >= 5 re-saves it."""
    fmt = None if fmt == "dense" else fmt
    fmt_params = dict(fmt_params or {})
    if fmt and fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} unknown; known: {sorted(FORMATS)}")
    if spelling not in ("v4", "v5"):
        raise ValueError(f"spelling {spelling!r}: expected 'v4' (published releases) or 'v5' (transformers>=5)")
    expected = weight_shapes(cfg)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(weights[name].shape)}, expected {shape}")
    targeted = [n.removesuffix(".weight") for n in expected if fmt and re.search(targets, n.removesuffix(".weight"))]
    if overrides and not fmt:
        raise ValueError("overrides given for a plain checkpoint (fmt None / 'dense'): nothing to override")
    unused = [p for p in overrides or () if not any(re.match(p, m) for m in targeted)]
    if unused:
        raise ValueError(f"overrides {unused} match no targeted module")
    module_params = {m: _module_params(m, fmt_params, overrides) for m in targeted}

    config = dict(cfg)
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    if fmt:
        config["quantization_config"] = _quant_config(fmt, fmt_params, overrides, module_params)
    if spelling == "v5":
        config = respell_v5(config)

    tensors: dict[str, Tensor] = {}
    for name in expected:  # module order: shards hold layers in sequence
        W, module = weights[name], name.removesuffix(".weight")
        params = module_params.get(module)
        if params is None:
            tensors[name] = W.to(dtype)
            continue
        if "seed" in params:  # act-order permutations differ per module, as GPTQ's do
            params = {**params, "seed": params["seed"] * 1_000_003 + zlib.crc32(module.encode())}
        for suffix, t in FORMATS[fmt].pack(W.float(), **params).items():
            tensors[f"{module}.{suffix}"] = t

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    if tokenizer is True:
        build_tokenizer(out, cfg["vocab_size"])
    elif tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copyfile(Path(tokenizer) / f, out / f)
    return out


# Keys a GPTQModel `dynamic` entry records; other override keys (seed, scale_dtype) only
# change how the fixture packs.
GPTQ_DYNAMIC_KEYS = ("bits", "group_size", "sym", "desc_act")


def _quant_config(fmt: str, fmt_params: dict, overrides: dict[str, dict | None] | None,
                  module_params: dict[str, dict | None]) -> dict:
    """The producer's `quantization_config`, with per-module overrides recorded its way:
    gptq: GPTQModel `dynamic` ("-:regex": {} skips, "+:regex": {bits, ...}); compressed-tensors:
    `ignore` gets "re:regex", a params override becomes its own config group targeting
    "re:regex"; fp8_block: `ignored_layers` (exact names); awq: `modules_to_not_convert` (exact
    names). awq / fp8_block have no per-module params: such an override is a ValueError."""
    fmt_obj = FORMATS[fmt]
    overrides = overrides or {}
    skipped = sorted(m for m, p in module_params.items() if p is None)
    changed = {pat: over for pat, over in overrides.items() if over is not None}
    if fmt == "gptq":
        dynamic = {}
        for pat, over in overrides.items():
            if over is None:
                dynamic[f"-:{pat}"] = {}
            else:
                dynamic[f"+:{pat}"] = {k: v for k, v in over.items() if k in GPTQ_DYNAMIC_KEYS}
        return fmt_obj.config_block(**{**fmt_params, **({"dynamic": dynamic} if dynamic else {})})
    if fmt.startswith("ct_"):
        # compressed-tensors applies `ignore` before any group: a module that a later None entry
        # would skip must not be quantized by an earlier params entry
        skips = [pat for pat, over in overrides.items() if over is None]
        clash = [m for m, p in module_params.items() if p is not None and any(re.match(s, m) for s in skips)]
        if clash:
            raise ValueError(f"{fmt}: {clash[:3]} match a params override before a None one, but "
                             f"compressed-tensors' ignore list always wins; put the None entry first")
        ignore = list(fmt_params.get("ignore", ("lm_head", "re:.*mlp.gate$")))
        ignore += [f"re:{pat}" for pat in skips]
        cfg = fmt_obj.config_block(**{**fmt_params, "ignore": ignore})
        for i, (pat, over) in enumerate(changed.items(), start=1):
            group = fmt_obj.config_block(**{**fmt_params, **over, "ignore": ignore})["config_groups"]["group_0"]
            cfg["config_groups"][f"group_{i}"] = {**group, "targets": [f"re:{pat}"]}
        if len({g.get("format") for g in cfg["config_groups"].values()}) > 1:
            cfg["format"] = "mixed-precision"
        return cfg
    if changed:
        raise ValueError(f"{fmt}: overrides {list(changed)} change params per module, which a {fmt} "
                         f"config cannot record (only leaving modules unquantized: map them to None)")
    if fmt == "fp8_block":
        return fmt_obj.config_block(**{**fmt_params, **({"ignored_layers": skipped} if skipped else {})})
    if fmt == "awq":
        return fmt_obj.config_block(**{**fmt_params, **({"modules_to_not_convert": skipped} if skipped else {})})
    raise ValueError(f"format {fmt!r}: no quantization_config writer (known: gptq, awq, fp8_block, ct_*)")


# --------------------------------------------------------------------------------------------
# the sibling checkpoints

def make_fixture(out_dir: str | Path, seed: int = 0, formats: list[str] | tuple[str, ...] | None = None,
                 **cfg_kwargs) -> dict[str, Path]:
    """One random model (tiny_config(**cfg_kwargs), random_weights(cfg, seed), rounded to bf16 as
    the published checkpoint holds it) written as the sibling checkpoints of FIXTURES (or the
    names in `formats`) under out_dir. Quantized ones are packed from the bf16 values; `awq`
    from those folded with awq_fold_scales(cfg, seed). Returns name -> directory."""
    names = list(FIXTURES) if formats is None else list(formats)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        raise ValueError(f"unknown fixture names {unknown}; known: {list(FIXTURES)}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**cfg_kwargs)
    weights = round_to(random_weights(cfg, seed), torch.bfloat16)
    tok_dir = root / names[0]   # the first checkpoint builds the tokenizer, the others copy it
    out = {}
    for name in names:
        fmt, params, extra = FIXTURES[name]
        extra = dict(extra)
        W = weights
        if extra.pop("awq_fold", False):
            W = awq_fold(cfg, weights, awq_fold_scales(cfg, seed))
        if params.get("desc_act") or params.get("actorder"):
            params = {**params, "seed": seed}
        out[name] = write_checkpoint(root / name, cfg, W, fmt, params,
                                     tokenizer=True if name == names[0] else tok_dir, **extra)
    return out


_SHARED: dict[tuple, dict[str, Path]] = {}


def shared_fixture(seed: int = 0, **cfg_kwargs) -> dict[str, Path]:
    """make_fixture(seed, **cfg_kwargs) written once per process into a temporary directory
    (removed at exit) and reused by every caller: tests across files share one copy instead of
    rebuilding (~5-10 s each). Callers must not modify the files."""
    key = (seed, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg_kwargs.items())))
    if key not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="mixprec-fixture-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED[key] = make_fixture(root, seed=seed, **cfg_kwargs)
    return dict(_SHARED[key])


def fixture_weights(seed: int = 0, **cfg_kwargs) -> tuple[dict, dict[str, Tensor]]:
    """(cfg, weights) exactly as make_fixture(seed=seed, **cfg_kwargs) stores them in `bf16`
    (float32 tensors holding bf16 values): the reference every fixture was packed from."""
    cfg = tiny_config(**cfg_kwargs)
    return cfg, round_to(random_weights(cfg, seed), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# CLI: python -m mixprec make-fixture DIR [...]

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = tiny_config.__defaults__
    defaults = dict(zip(tiny_config.__code__.co_varnames[:len(d)], d))
    parser.add_argument("dir", type=Path, help="output directory (one sub-directory per checkpoint)")
    parser.add_argument("--layers", type=int, default=defaults["layers"])
    parser.add_argument("--hidden", type=int, default=defaults["hidden"])
    parser.add_argument("--experts", type=int, default=defaults["experts"])
    parser.add_argument("--top-k", type=int, default=defaults["top_k"])
    parser.add_argument("--heads", type=int, default=defaults["heads"])
    parser.add_argument("--kv-heads", type=int, default=defaults["kv_heads"])
    parser.add_argument("--head-dim", type=int, default=defaults["head_dim"])
    parser.add_argument("--moe-intermediate", type=int, default=defaults["moe_intermediate"])
    parser.add_argument("--intermediate", type=int, default=defaults["intermediate"])
    parser.add_argument("--vocab", type=int, default=defaults["vocab"])
    parser.add_argument("--mlp-only-layers", default=",".join(map(str, defaults["mlp_only_layers"])),
                        help="comma-separated dense (non-MoE) layers, e.g. 0 or '' for none")
    parser.add_argument("--tie", action="store_true", help="tie_word_embeddings (no lm_head tensor)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FIXTURES),
                        help=f"comma-separated subset of {','.join(FIXTURES)}")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    mlp_only = tuple(int(x) for x in args.mlp_only_layers.split(",") if x.strip())
    paths = make_fixture(args.dir, seed=args.seed, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
                         layers=args.layers, hidden=args.hidden, experts=args.experts, top_k=args.top_k,
                         heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                         moe_intermediate=args.moe_intermediate, intermediate=args.intermediate,
                         vocab=args.vocab, mlp_only_layers=mlp_only, tie=args.tie)
    for name, path in paths.items():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"{name:24s} {FIXTURES[name][0]:10s} {size / 2**20:7.2f} MiB  {path}")
    print(f"wrote {len(paths)} checkpoints in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixprec make-fixture",
                                     description="Write a tiny random Qwen3-MoE as real checkpoints in every format.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
