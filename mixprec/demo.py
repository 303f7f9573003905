"""`python -m mixprec demo`: the whole path on a tiny model, no downloads.

Builds a random Qwen3-MoE and writes it as real checkpoints (BF16, FP8 block, GPTQ, AWQ,
INT8, ...), writes a mix config that gives experts of one layer (and gate/up/down of one
expert) different formats, prints the plan, loads the mix, generates, and compares it with
the all-bf16 model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

DEMO_RULES = [
    {"match": r"layers\.1\.self_attn", "use": "awq"},               # AWQ attention: folded norm corrected
    {"match": r"mlp\.experts\.[01]\.", "use": "gptq"},               # experts 0-1 all int4
    {"match": r"mlp\.experts\.[23]\.down_proj", "use": "fp8"},      # experts 2-3: down fp8 ...
    {"match": r"mlp\.experts\.[23]\.", "use": "int8"},               # ... gate/up int8
    {"match": r"mlp\.experts\.[45]\.", "use": "fp8"},                # experts 4-5 fp8 block
    {"match": r"mlp\.experts\.6\.gate_proj", "use": "gptq"},        # expert 6: gate int4, up/down bf16
    {"match": r"self_attn\.[qkv]_proj", "use": "fp8"},
    {"match": r"mlp\.(gate|up|down)_proj", "use": "ct_w4a16"},      # dense layer MLP: compressed-tensors int4
]


def write_demo_config(fixtures: dict, path: Path) -> Path:
    cfg = {"model": str(fixtures["bf16"]),
           "sources": {k: str(fixtures[k]) for k in ("fp8", "gptq", "int8", "awq", "ct_w4a16")},
           "weights": DEMO_RULES}
    path.write_text("# per-expert, per-projection mix over five formats (written by `mixprec demo`)\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_demo(a) -> int:
    from .api import load, plan
    from .testing.fixtures import make_fixture

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.dir) if a.dir else Path(tmp)
        print(f"writing fixture checkpoints to {root}")
        fixtures = make_fixture(root)
        cfg_path = write_demo_config(fixtures, root / "mix.yaml")
        print(cfg_path.read_text())
        print(plan(cfg_path).table())

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        mixed = load(cfg_path, device=device, dtype=dtype, progress=False)
        ref = load(fixtures["bf16"], device=device, dtype=dtype, progress=False)
        print(mixed.stats)

        from .api import generate
        prompt = "The quick brown fox"
        print(f"\nprompt: {prompt!r}")
        print(f"  mixed: {generate(mixed, prompt, max_new_tokens=24)!r}")
        print(f"  bf16 : {generate(ref, prompt, max_new_tokens=24)!r}")

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, mixed.args.vocab_size, (4, 48), generator=g).to(device)
        with torch.inference_mode():
            lm, lr = mixed(ids).float(), ref(ids).float()
        agree = (lm.argmax(-1) == lr.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(lm.log_softmax(-1), lr.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        print(f"\nmixed vs bf16 on {ids.numel()} random tokens: top-1 agreement {agree:.1%}, "
              f"mean KL(bf16||mixed) {kl:.4f}")
    return 0
