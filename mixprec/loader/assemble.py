"""Build the model from a plan: meta-device model, then one module at a time from its source.

Peak memory is the model in its packed form plus one module (one MoE layer while its experts
are stacked): a weight is read from its memory-mapped shard, transcoded by its format's `load`,
moved to the device and dropped from the host before the next one is read.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..config import compute_device
from ..errors import ConfigError
from ..formats import load_module
from ..layers.moe import MoE
from ..models.qwen3 import Qwen3ForCausalLM
from .plan import Plan

# Linears that read the output of a norm: their source's norm may have folded activation
# scales (AWQ, SmoothQuant). Maps projection suffix -> norm tensor of the same layer.
_NORM_OF = {
    "self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm", "mlp.up_proj": "post_attention_layernorm",
}
# Pairs whose inner activation a folding producer rescales (v->o, up->down): both must come
# from the same source when that source folds.
_PAIRS = (("self_attn.v_proj", "self_attn.o_proj"), ("up_proj", "down_proj"))


def linear_bytes(packed, input_scale: torch.Tensor | None) -> int:
    """Device bytes of a loaded linear: its packed tensors and the input rescale kept beside a
    folded-norm (AWQ) linear."""
    return packed.nbytes() + (0 if input_scale is None else input_scale.numel() * input_scale.element_size())


@dataclass
class Stats:
    """What was loaded, and what it costs. `as_seed_dict()` is the seed API's dict."""
    loaded: int = 0
    total: int = 0
    bytes_total: int = 0
    bytes_bf16: int = 0                 # what the same linears take in bf16
    by_format: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))   # fmt -> [count, bytes]
    by_source: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    rescaled: list = field(default_factory=list)   # modules given an input rescale (folded norms)

    def add(self, packed, source: str, input_scale: torch.Tensor | None = None) -> None:
        """Count one loaded linear (its bytes as kept on the device, with its input rescale)."""
        nb = linear_bytes(packed, input_scale)
        self.loaded += 1
        self.bytes_total += nb
        self.bytes_bf16 += packed.n * packed.k * 2
        for table, key in ((self.by_format, packed.source), (self.by_source, source)):
            table[key][0] += 1
            table[key][1] += nb

    @property
    def memory_saved_mb(self) -> float:
        return (self.bytes_bf16 - self.bytes_total) / 2**20

    def as_seed_dict(self) -> dict:
        return {"loaded": self.loaded, "total": self.total, "memory_saved_mb": round(self.memory_saved_mb, 2),
                "bytes": self.bytes_total, "bytes_bf16": self.bytes_bf16,
                "by_format": {k: {"count": c, "bytes": b} for k, (c, b) in sorted(self.by_format.items())},
                "by_source": {k: {"count": c, "bytes": b} for k, (c, b) in sorted(self.by_source.items())}}

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded}/{self.total} linears, {self.bytes_total / 2**20:.1f} MiB "
                 f"(bf16 would be {self.bytes_bf16 / 2**20:.1f} MiB, saved {self.memory_saved_mb:.1f} MiB)"]
        for k, (c, b) in sorted(self.by_format.items()):
            lines.append(f"  {k:<14} {c:>7} linears {b / 2**20:>10.1f} MiB")
        return "\n".join(lines)


def _layer_prefix(module: str) -> tuple[str, str]:
    """'model.layers.3.mlp.experts.7.up_proj' -> ('model.layers.3', 'mlp.experts.7.up_proj')."""
    parts = module.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[:3]), ".".join(parts[3:])
    return "", module


def _norm_for(rest: str) -> str | None:
    for suffix, norm in _NORM_OF.items():
        if rest == suffix or (rest.startswith("mlp.experts.") and rest.endswith(suffix.split(".")[-1])
                              and suffix.startswith("mlp.")):
            return norm
    return None


def input_rescales(plan: Plan) -> dict[str, torch.Tensor]:
    """Per-input-channel factors for linears whose source folded scales into its norms.

    A folding producer (AWQ, SmoothQuant) stores norm/s and W*s. The model uses the base's norm,
    so such a linear must see x * (norm_src / norm_base) to compute what its source computed.
    Pairs with an inner fold (v->o, up->down) cannot be corrected from the norms: split across a
    folding source and another, they are refused.
    """
    base = plan.sources["model"]
    folding: dict[tuple[str, str], torch.Tensor] = {}   # (source, layer norm name) -> factor

    def factor(src: str, norm_name: str) -> torch.Tensor | None:
        key = (src, norm_name)
        if key not in folding:
            ref = base.get(norm_name).float()
            own = plan.sources[src].get(norm_name).float() if norm_name in plan.sources[src] else ref
            if torch.equal(own, ref):
                folding[key] = None
            else:
                bad = (ref == 0) & (own != 0)
                if bool(bad.any()):
                    raise ConfigError(
                        f"{plan.sources[src].path}: {norm_name} has folded activation scales, and the base "
                        f"{base.path} has zeros where it does not; the factor cannot be recovered. "
                        f"Take these linears from the base's own format or from the same source as the norm.")
                folding[key] = torch.where(ref == 0, torch.ones_like(ref), own / ref)
        return folding[key]

    out: dict[str, torch.Tensor] = {}
    for module, e in plan.entries.items():
        layer, rest = _layer_prefix(module)
        norm = _norm_for(rest) if layer else None
        if norm is None or e.source == "model":
            continue
        f = factor(e.source, f"{layer}.{norm}.weight")
        if f is not None:
            out[module] = f

    for module, e in plan.entries.items():   # an exported mix carries its folded-norm factors (planner/export.py)
        ck = plan.sources[e.source]
        t = ((ck.config.get("mixprec") or {}).get("input_rescale") or {}).get(module)
        if t is not None:
            out[module] = ck.get(t).float() * out[module] if module in out else ck.get(t).float()

    def folds(src: str, layer: str) -> bool:
        """Whether `src` folds activation scales at `layer`: its norms differ from the base's. Asked
        for every source of a split pair, not only those whose q/k/v/gate/up needed a factor: an
        o_proj or down_proj taken alone from a folding source is as wrong. The base never folds."""
        return src != "model" and any(factor(src, f"{layer}.{norm}.weight") is not None
                                      for norm in ("input_layernorm", "post_attention_layernorm"))

    errors = []
    for module, e in plan.entries.items():
        for first, second in _PAIRS:
            if not module.endswith(first):
                continue
            partner = module[: -len(first)] + second
            p = plan.entries.get(partner)
            if p is None or p.source == e.source:
                continue
            layer, _ = _layer_prefix(module)
            for src in (e.source, p.source):
                if folds(src, layer):
                    errors.append(
                        f"{module} comes from '{e.source}' but {partner} from '{p.source}': source '{src}' "
                        f"folds activation scales (its norms differ from the base's), and such producers "
                        f"also scale the output of {first} into the input of {second}. That factor is not "
                        f"recoverable from the checkpoints; take both from the same source.")
                    break
    if errors:
        raise ConfigError("cannot mix folded-scale weights:\n  " + "\n  ".join(errors))
    return out


def assemble(plan: Plan, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
             progress: bool = True, model: Qwen3ForCausalLM | None = None) -> tuple[Qwen3ForCausalLM, Stats]:
    """Materialise every weight of `plan` on `device` (into `model` if given, an unloaded
    Qwen3ForCausalLM of the plan's architecture). Returns the finalized model and its stats."""
    device = compute_device(device)
    rescale = input_rescales(plan)
    model = model if model is not None else Qwen3ForCausalLM(plan.args, dtype=dtype, device="meta")
    base = plan.sources["model"]
    stats = Stats(total=len(plan.entries))

    total_bytes = sum(e.nbytes for e in plan.entries.values())
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading", disable=not progress)
    for name in plan.args.plain_tensors():
        model.set_tensor(name, base.get(name).to(device))
    if not plan.args.tie_word_embeddings and "lm_head" not in plan.entries:
        model.set_tensor("lm_head.weight", base.get("lm_head.weight").to(device))

    layers = model.model.layers
    last_layer = None
    for module, e in plan.entries.items():
        layer, _ = _layer_prefix(module)
        if layer != last_layer and last_layer:
            # stack the finished layer's experts now: only one layer is ever held twice
            mlp = layers[int(last_layer.rsplit(".", 1)[1])].mlp
            if isinstance(mlp, MoE):
                mlp.finalize()
        last_layer = layer
        ckpt = plan.sources[e.source]
        raw = ckpt.module(module)
        packed = load_module(raw, e.n, e.k, e.scheme, where=f"{ckpt.path}: {module}", dtype=dtype)
        del raw
        packed = packed.to(device)
        scale = rescale[module].to(device) if module in rescale else None
        model.set_linear(module, packed, input_scale=scale)
        stats.add(packed, e.source, scale)
        bar.update(e.nbytes)
    bar.close()
    stats.rescaled = sorted(rescale)
    model.finalize()
    model.eval()
    return model, stats
