"""A tiny Qwen3-MoE whose experts really differ, for testing the budget planner.

    paths = make_heterogeneous_fixture(root, seed=0)   # {"bf16": ..., "fp8": ..., "gptq": ...}
    info = json.loads((root / "heterogeneous.json").read_text())   # which experts are special

Two things make a per-expert plan pay off, and both are built in:
* a skewed router: every embedding row shares a common direction u, and each router row gets
  a component beta_e * u with beta_e spread out, so a few experts take most tokens in every
  MoE layer and some almost none;
* uneven sensitivity: in a quarter of the experts a few input channels of gate/up (and of
  down) are outliers (x OUTLIER). An int4 group containing an outlier gets a coarse scale, so
  int4 hurts those experts several times more than the rest; FP8 (a float format with a
  scale per block) barely notices.
The checkpoints (BF16, FP8 block 128x128 as the Qwen3 FP8 releases, GPTQ int4 g32) are written by
`fixtures.write_checkpoint` from the same bf16-rounded weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .fixtures import is_moe_layer, random_weights, round_to, tiny_config, write_checkpoint

OUTLIER = 8.0          # factor on an outlier input channel's weights
SHARED = 4.0           # length of the common embedding direction u (rows are ~N(0, 1) per channel)
ROUTER_SPREAD = 0.6    # std of beta_e, the experts' affinity to u
SEED_OFFSET = 0x4E7    # the perturbations draw from their own stream

SOURCES = {
    "bf16": ("dense", {}, {"shards": 2}),
    "fp8": ("fp8_block", {"block": [128, 128], "scale_dtype": torch.bfloat16}, {}),
    "gptq": ("gptq", {"bits": 4, "group_size": 32, "sym": True, "desc_act": False,
                      "checkpoint_format": "gptq"}, {}),
}


def heterogeneous_config() -> dict:
    """3 layers (layer 0 dense, 1-2 MoE), hidden 128, 16 experts top-2, moe_intermediate 64."""
    return tiny_config(layers=3, hidden=128, experts=16, top_k=2, heads=4, kv_heads=2, head_dim=32,
                       moe_intermediate=64, intermediate=256, vocab=512, mlp_only_layers=(0,))


def heterogeneous_weights(seed: int = 0) -> tuple[dict, dict[str, Tensor], dict]:
    """(config, float32 weights holding bf16 values, info). info: {"sensitive": {layer: [experts]},
    "outlier_channels": {layer: {expert: {"in": [...], "inner": [...]}}}, "beta": {layer: [E]}}."""
    cfg = heterogeneous_config()
    W = random_weights(cfg, seed)
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    H, E, I = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"]
    u = torch.randn(H, generator=g)
    u = u / u.norm()
    W["model.embed_tokens.weight"] = W["model.embed_tokens.weight"] + SHARED * u[None, :]
    info: dict = {"sensitive": {}, "outlier_channels": {}, "beta": {}}
    for l in range(cfg["num_hidden_layers"]):
        if not is_moe_layer(cfg, l):
            continue
        p = f"model.layers.{l}.mlp"
        beta = ROUTER_SPREAD * torch.randn(E, generator=g)
        W[f"{p}.gate.weight"] = W[f"{p}.gate.weight"] + beta[:, None] * u[None, :]
        sensitive = sorted(torch.randperm(E, generator=g)[: E // 4].tolist())
        chans = {}
        for e in sensitive:
            cin = torch.randperm(H, generator=g)[:4]
            cinner = torch.randperm(I, generator=g)[:2]
            for proj in ("gate_proj", "up_proj"):
                W[f"{p}.experts.{e}.{proj}.weight"][:, cin] *= OUTLIER
            W[f"{p}.experts.{e}.down_proj.weight"][:, cinner] *= OUTLIER
            chans[e] = {"in": sorted(cin.tolist()), "inner": sorted(cinner.tolist())}
        info["sensitive"][l] = sensitive
        info["outlier_channels"][l] = chans
        info["beta"][l] = beta.tolist()
    return cfg, round_to(W, torch.bfloat16), info


def make_heterogeneous_fixture(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the BF16, FP8 and GPTQ-int4 checkpoints under out_dir (plus heterogeneous.json with
    the sensitive experts and router affinities). Returns {"bf16": dir, "fp8": dir, "gptq": dir}."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg, W, info = heterogeneous_weights(seed)
    out: dict[str, Path] = {}
    for name, (fmt, params, extra) in SOURCES.items():
        tok = True if not out else out["bf16"]
        out[name] = write_checkpoint(root / name, cfg, W, fmt, params, tokenizer=tok, **extra)
    (root / "heterogeneous.json").write_text(json.dumps({"seed": seed, **info}, indent=1) + "\n")
    return out
