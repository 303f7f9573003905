"""The seed project's API names, on top of mixprec's loader (same objects underneath).

    loader = TrueMixedPrecisionLoader(model_config, mixed_precision_config)
    model = replace_all_with_mixed_precision(model, loader)
    stats = loader.load_model_weights(model)    # {"loaded", "total", "memory_saved_mb", ...}
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import MixConfig, ModelArgs, load_config, read_yaml
from .errors import ConfigError
from .loader.assemble import assemble
from .loader.plan import make_plan
from .models.qwen3 import Qwen3ForCausalLM


class TrueMixedPrecisionLoader:
    """`model_config`: the base checkpoint directory (or its config.json path, or a ModelArgs);
    `mixed_precision_config`: the seed YAML (path or dict) with a `mixed_precision:` block.
    When the YAML has no `base_model_path`, `model_config` supplies it."""

    def __init__(self, model_config, mixed_precision_config, device: str | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        raw = mixed_precision_config
        if isinstance(raw, (str, Path)) and Path(raw).suffix in (".yaml", ".yml"):
            path = Path(raw)
            raw = read_yaml(path)
            origin = path
        else:
            origin = None
        if isinstance(raw, dict) and "mixed_precision" in raw and isinstance(model_config, (str, Path)):
            if not isinstance(raw["mixed_precision"], dict):
                raise ConfigError(f"{origin or 'mixed_precision_config'}: mixed_precision must be a mapping, got "
                                  f"{type(raw['mixed_precision']).__name__}")
            mp = dict(raw["mixed_precision"])
            base = Path(model_config).expanduser().resolve()
            base = base.parent if base.name == "config.json" else base
            local = (base / "config.json").is_file()
            if "base_model_path" not in mp:           # model_config supplies the base
                if not local:
                    raise ConfigError(f"model_config {model_config}: not a checkpoint directory (no config.json), "
                                      f"and the mix names no base_model_path")
                mp["base_model_path"] = str(base)
            elif local:                               # (a hub id stands for the YAML's base: nothing to compare)
                given = mp["base_model_path"]
                root = origin.parent if origin is not None else Path.cwd()
                if (root / Path(given).expanduser()).resolve() != base:
                    raise ConfigError(f"model_config {model_config} and the mix's base_model_path {given} are "
                                      f"different checkpoints")
            raw = {**raw, "mixed_precision": mp}
        self.config: MixConfig = (load_config(raw) if origin is None
                                  else MixConfig.from_dict(raw, origin=str(origin), base_dir=origin.parent))
        self.plan = make_plan(self.config)
        if isinstance(model_config, ModelArgs) and model_config.identity() != self.plan.args.identity():
            raise ConfigError("model_config describes another model than the mix's base checkpoint")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.stats = None

    def load_model_weights(self, model: Qwen3ForCausalLM) -> dict:
        model, stats = assemble(self.plan, device=self.device, dtype=self.dtype, model=model)
        model.stats = stats
        self.stats = stats
        return stats.as_seed_dict()


def replace_all_with_mixed_precision(model, loader: TrueMixedPrecisionLoader) -> Qwen3ForCausalLM:
    """Returns an unloaded mixprec model of the loader's architecture, ready for
    `loader.load_model_weights`. `model` (any previous model object, or None) is not used for
    weights: every weight comes from the mix."""
    return Qwen3ForCausalLM(loader.plan.args, dtype=loader.dtype, device="meta")
