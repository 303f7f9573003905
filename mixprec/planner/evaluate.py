"""How far a mix is from its reference: per-token KL(ref || mix), top-1 agreement, perplexity.

The two models are never loaded together: the reference runs first and its log-probabilities
[N, V] (float32, host memory: 4 * tokens * vocab bytes, 1.2 GB for 2048 tokens of Qwen3) are
kept; then the mix loads and is compared chunk by chunk.
"""
from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import MixConfig, export_manifest, load_config
from ..errors import ConfigError, ModelMismatch


class Metrics:
    """Accumulates per-token KL(ref || mix), argmax agreement and next-token NLL of both."""

    def __init__(self):
        self.kl: list[Tensor] = []
        self.agree = 0
        self.n = 0
        self.nll_ref = self.nll_mix = 0.0
        self.n_next = 0

    def add(self, ref_logp: Tensor, mix_logits: Tensor, ids: Tensor) -> None:
        """ref_logp [B, T, V] log-probs, mix_logits [B, T, V], ids [B, T] (the inputs; position t
        predicts ids[:, t + 1])."""
        ref_logp = ref_logp.float()
        mix_logp = torch.log_softmax(mix_logits.float(), dim=-1).to(ref_logp.device)
        ids = ids.to(ref_logp.device)
        kl = (ref_logp.exp() * (ref_logp - mix_logp)).sum(-1)                  # [B, T]
        self.kl.append(kl.reshape(-1).cpu())
        self.agree += int((ref_logp.argmax(-1) == mix_logp.argmax(-1)).sum())
        self.n += kl.numel()
        nxt = ids[:, 1:, None]
        self.nll_ref -= float(ref_logp[:, :-1].gather(-1, nxt).sum())
        self.nll_mix -= float(mix_logp[:, :-1].gather(-1, nxt).sum())
        self.n_next += nxt.numel()

    def result(self) -> dict:
        kl = torch.cat(self.kl).double()

        def ppl(nll: float) -> float:          # float64: exp of a mean NLL above ~89 overflows fp32
            try:
                return math.exp(nll / max(self.n_next, 1))
            except OverflowError:
                return math.inf

        return {"tokens": self.n, "mean_kl": float(kl.mean()), "p99_kl": float(torch.quantile(kl, 0.99)),
                "max_kl": float(kl.max()), "top1_agreement": self.agree / self.n,
                "ppl_ref": ppl(self.nll_ref), "ppl_mix": ppl(self.nll_mix)}


def kl_metrics(ref_logits: Tensor, mix_logits: Tensor, ids: Tensor) -> dict:
    """Metrics of two logit tensors [B, T, V] on inputs ids [B, T] (see Metrics)."""
    m = Metrics()
    m.add(torch.log_softmax(ref_logits.float(), dim=-1), mix_logits, ids)
    return m.result()


def _release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def evaluate(config, ids: Tensor, ref=None, device=None, dtype=None, batch: int = 4, progress: bool = True) -> dict:
    """Compare the mix `config` with `ref` (default: its base checkpoint alone) on ids [S, T].
    -> {tokens, mean_kl, p99_kl, max_kl, top1_agreement, ppl_ref, ppl_mix, ref, mix}."""
    from ..api import load
    cfg = load_config(config)
    ref_cfg = MixConfig.for_checkpoint(_base_of(cfg.model)) if ref is None else load_config(ref)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or cfg.dtype
    chunks = [ids[i: i + batch] for i in range(0, ids.shape[0], batch)]
    model = load(ref_cfg, device=device, dtype=dtype, progress=progress)
    ref_args = model.args
    ref_lp = [torch.log_softmax(model(c.to(device)).float(), dim=-1).cpu()
              for c in tqdm(chunks, desc="reference", disable=not progress)]
    _release(model)
    model = load(cfg, device=device, dtype=dtype, progress=progress)
    if model.args.identity() != ref_args.identity():
        raise ModelMismatch(f"{cfg.origin} and the reference {ref_cfg.origin} are not the same model")
    m = Metrics()
    for c, lp in tqdm(list(zip(chunks, ref_lp)), desc="mix", disable=not progress):
        m.add(lp, model(c.to(device)).cpu(), c)
    _release(model)
    return {**m.result(), "ref": ref_cfg.origin, "mix": cfg.origin}


def _base_of(model: Path) -> Path:
    """The checkpoint a mix's base stands for: an exported mix (planner/export.py) names the base
    it was made from in its manifest (compared with itself, it would show no difference)."""
    base = (export_manifest(Path(model)).get("sources") or {}).get("model")
    if base is None:
        return model
    if not (Path(base) / "config.json").is_file():
        raise ConfigError(f"{model} is an exported mix of base {base}, which is not there: give --ref")
    return Path(base)


def format_metrics(r: dict) -> str:
    return (f"{r['tokens']} tokens: mean KL(ref||mix) {r['mean_kl']:.5g}, p99 {r['p99_kl']:.5g}, "
            f"max {r['max_kl']:.5g}; "
            f"top-1 agreement {100 * r['top1_agreement']:.2f}%; perplexity ref {r['ppl_ref']:.4g}, "
            f"mix {r['ppl_mix']:.4g}")
