"""The Python API: load a mix, run it, generate, inspect one weight."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .config import MixConfig, compute_device, compute_dtype, load_config
from .formats import dequant, load_module, resolve_scheme
from .loader.assemble import assemble
from .loader.checkpoint import Checkpoint
from .loader.plan import Plan, make_plan
from .runtime.generate import Generator
from .runtime.sampling import SamplingParams

def plan(config) -> Plan:
    """Resolve every weight of the mix to (source, format) without reading tensor data."""
    return make_plan(load_config(config))


def load(config: str | Path | dict | MixConfig, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, progress: bool = True, tp: int | None = None,
         ep: int | None = None):
    """Load a mix (YAML path, dict, MixConfig, or one checkpoint directory) onto `device`.

    Returns the model: `model(input_ids [B, T]) -> logits [B, T, V]`; `model.stats` tells what
    was loaded; `model.tokenizer` is the base checkpoint's tokenizer (or None).
    tp / ep (default: the config's `parallel`): with tp * ep > 1, call this in each of tp * ep
    processes (torchrun); each loads its shard (mixprec.parallel) and returns full logits."""
    cfg = load_config(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_device(device)      # a bad device is a ConfigError before the plan reads any header
    dt = compute_dtype(dtype or cfg.dtype)
    p = make_plan(cfg)
    tp = cfg.parallel.tp if tp is None else tp
    ep = cfg.parallel.ep if ep is None else ep
    if (tp, ep) != (1, 1) or _launch_world() > 1:
        from .parallel import load_shard
        model, stats = load_shard(p, tp, ep, device=device, dtype=dt, progress=progress)
    else:
        model, stats = assemble(p, device=device, dtype=dt, progress=progress)
    model.stats = stats
    model.plan = p
    model.tokenizer = load_tokenizer(p.sources["model"].path)
    return model


def _launch_world() -> int:
    """Processes of this launch (torchrun's WORLD_SIZE); 1 without a launcher."""
    from .parallel.context import env_world
    return env_world()


def load_tokenizer(ckpt_dir: str | Path):
    """The checkpoint's tokenizer (mixprec.runtime.text.Tokenizer: tokenizer.json plus the chat
    template and eos ids from its config files), or None when there is no tokenizer.json."""
    from .runtime.text import Tokenizer
    return Tokenizer.from_dir(ckpt_dir)


def generate(model, prompts: Sequence[str] | Sequence[Sequence[int]] | str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             chat: bool = False, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             chat_template_kwargs: dict | None = None) -> list[str] | list[list[int]]:
    """Generate for a batch. Strings in -> strings out (model.tokenizer); token-id lists in -> ids out.
    Penalties as OpenAI's (runtime/sampling.py): on the tokens generated so far, not the prompt.
    chat: each string is a user message in the checkpoint's chat template, rendered with
    chat_template_kwargs (Qwen3: {"enable_thinking": False} for its non-thinking mode)."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    texts = bool(prompts) and isinstance(prompts[0], str)
    tok = getattr(model, "tokenizer", None)
    if texts and tok is None:
        raise ValueError("string prompts need the base checkpoint's tokenizer.json; pass token ids instead")
    ids = ([tok.encode_prompt(p, chat=chat, **(chat_template_kwargs or {})) for p in prompts] if texts
           else [list(p) for p in prompts])
    stop = tuple(tok.eos_token_ids) if tok is not None else ()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            max_new_tokens=max_new_tokens, stop_token_ids=stop, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty)
    gen = getattr(model, "_generator", None)
    if gen is None:
        gen = model._generator = Generator(model)
    outs = gen.generate(ids, params)
    if texts:
        outs = [tok.decode(o) for o in outs]
    return outs[0] if single else outs


def dequantize_weight(checkpoint_dir: str | Path, module_name: str) -> torch.Tensor:
    """One linear of any supported checkpoint, dequantized to float32 [N, K] (format detected)."""
    ckpt = Checkpoint(checkpoint_dir)
    name = module_name[: -len(".weight")] if module_name.endswith(".weight") else module_name
    shapes = ckpt.args.linear_shapes()
    if name not in shapes:
        from .errors import MissingWeight
        raise MissingWeight(f"{ckpt.path}: the model has no linear module {name!r}")
    n, k = shapes[name]
    packed = load_module(ckpt.module(name), n, k, resolve_scheme(ckpt.quant_config, name),
                         where=f"{ckpt.path}: {name}", dtype=torch.float32)
    return dequant(packed).float()
