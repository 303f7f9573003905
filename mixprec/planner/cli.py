"""Command lines of the planner (the dispatcher in mixprec/__main__.py calls these with argv):

    mixprec profile CONFIG --text FILE [--tokens N] [--synthetic-tokens N] -o profile.json
    mixprec profile synthetic --arch qwen3-235b-a22b [--sources bf16,fp8,int4] -o profile.json
    mixprec plan --model BASE --source NAME=PATH ... (--profile P | --text FILE)
                 (--budget 60GiB | --fit h200 [--context 32768] [--batch 1]) [-o mix.yaml]
    mixprec eval CONFIG [--ref CONFIG] --text FILE [--tokens N] [--json]
    mixprec export CONFIG OUT_DIR [--force] [--max-shard-size 5GB]

Each returns a process exit code: 0 ok, 2 bad input (the error is printed, naming what is wrong).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..argtypes import at_least, device as device_arg
from ..config import MixConfig, compute_dtype, load_config
from ..errors import MixprecError


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise MixprecError(f"-o {path}: cannot write ({e.strerror})") from None


def _dtype(name: str | None):
    return None if name is None else compute_dtype(name, "--dtype")


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MixprecError(f"--text {path}: cannot read ({e})") from None


def _token_args(p: argparse.ArgumentParser, tokens: int, seed: int = 0) -> None:
    p.add_argument("--text", help="UTF-8 text file, encoded with the base checkpoint's tokenizer")
    p.add_argument("--tokens", type=at_least(0), default=tokens, help=f"tokens taken from --text (default {tokens}; 0 = all)")
    p.add_argument("--synthetic-tokens", type=at_least(0), default=0, help="add N uniformly random token ids (seeded)")
    p.add_argument("--seq-len", type=at_least(1), default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=seed, help=f"seed of --synthetic-tokens (default {seed})")


def _ids(a, cfg: MixConfig):
    from ..api import load_tokenizer
    from ..loader.checkpoint import Checkpoint
    from .profile import calibration_ids
    if a.text is None and not a.synthetic_tokens:
        raise MixprecError("give --text FILE and/or --synthetic-tokens N")
    vocab = Checkpoint(cfg.model).args.vocab_size
    tok = load_tokenizer(cfg.model) if a.text is not None else None
    return calibration_ids(tok, _read_text(a.text), a.tokens, a.synthetic_tokens, a.seq_len, vocab, a.seed,
                           where=f"--text {a.text}" if a.text else "--synthetic-tokens")


# -- profile --------------------------------------------------------------------------------------
def profile_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synthetic"] and not Path("synthetic").exists():
        return _synthetic_main(argv[1:])
    p = argparse.ArgumentParser(prog="mixprec profile", description="Measure routing and the error of every "
                                "source of every unit (expert gate+up, expert down, attention/dense linear).")
    p.add_argument("config", help="mix YAML (its model and sources are the candidates) or a checkpoint directory")
    _token_args(p, 8192)
    p.add_argument("--device", type=device_arg, default=None, help="default: cuda when available, else cpu")
    p.add_argument("-o", "--output", required=True, help="profile JSON to write")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from .profile import profile_model, save_profile
    try:
        cfg = load_config(a.config)
        ids = _ids(a, cfg)
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        prof = profile_model(cfg, ids, device=device, progress=not a.quiet)
        save_profile(prof, a.output)
    except MixprecError as e:
        return _fail(e)
    print(f"profiled {prof['tokens']} tokens, {len(prof['units'])} units x {len(prof['sources'])} sources "
          f"-> {a.output}")
    return 0


def _synthetic_main(argv: list[str]) -> int:
    from ..runtime.synthetic import ARCHS, SPECS
    p = argparse.ArgumentParser(prog="mixprec profile synthetic",
                                description="A profile from architecture shapes and a model of errors per format "
                                            "(no weights): for planning full-size models.")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--sources", default="bf16,fp8,int4", help=f"format specs, bf16 = the base (of {', '.join(SPECS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the routing masses and sensitivities")
    p.add_argument("--skew", type=float, default=1.0, help="routing skew: expert mass ~ softmax(skew * N(0,1))")
    p.add_argument("--spread", type=float, default=0.5, help="per-unit sensitivity ~ lognormal(0, spread)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    from .profile import save_profile, synthetic_profile
    try:
        prof = synthetic_profile(a.arch, [s.strip() for s in a.sources.split(",") if s.strip()], seed=a.seed,
                                 skew=a.skew, spread=a.spread)
        save_profile(prof, a.output)
    except MixprecError as e:
        return _fail(e)
    errs = ", ".join(f"{k} {v:.4f}" for k, v in prof["error_model"].items())
    print(f"synthetic profile of {a.arch}: {len(prof['units'])} units; relative error per format: {errs} -> {a.output}")
    return 0


# -- plan -----------------------------------------------------------------------------------------
def _sources(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, eq, path = it.partition("=")
        if not eq or not name or not path:
            raise MixprecError(f"--source {it!r}: expected NAME=PATH")
        if name in out:
            raise MixprecError(f"--source {name!r} given twice")
        out[name] = path
    return out


def plan_main(argv: list[str] | None = None) -> int:
    from ..runtime.prefill import GRAPH_TOKENS
    p = argparse.ArgumentParser(prog="mixprec plan", description="Choose every expert's (and linear's) source "
                                "under a memory budget; writes the mix YAML.")
    p.add_argument("--model", help="base checkpoint (bf16); default: the profile's")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="a candidate source")
    p.add_argument("--profile", help="profile JSON from `mixprec profile` (measured or synthetic)")
    _token_args(p, 8192)
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget", help="bytes for all weights (embeddings/norms/routers included), e.g. 60GiB")
    b.add_argument("--fit", help="derive the budget from a device: h200, h100, a100, l40s or a size like 80GiB")
    p.add_argument("--context", type=at_least(1), default=32768, help="--fit: KV-cache tokens per sequence")
    p.add_argument("--batch", type=at_least(1), default=1, help="--fit: sequences")
    p.add_argument("--margin", default=None, help="--fit: reserve, '7%%' of the device (default) or a size")
    p.add_argument("--prefill-graph-tokens", type=at_least(0), default=GRAPH_TOKENS,
                   help=f"--fit: serve's setting of the same name, whose staging KV cache is reserved "
                        f"(default {GRAPH_TOKENS}; 0 = no prefill graphs)")
    p.add_argument("--use", default=None, help="only these sources (comma-separated names)")
    p.add_argument("--mass-prior", type=at_least(1e-9, float), default=0.05, help="Laplace smoothing of expert routing mass")
    p.add_argument("--dtype", default=None, help="compute dtype written to the YAML (default: the base's bf16)")
    p.add_argument("--device", type=device_arg, default=None, help="device for profiling with --text")
    p.add_argument("-o", "--output", help="YAML to write (default: print it to stdout)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from .knapsack import (DEFAULT_MARGIN, arch_args, fit_budget, parse_bytes, plan_budget, summary, to_mix_config,
                           yaml_text)
    from .profile import load_profile, profile_model
    try:
        given = _sources(a.source)
        if a.profile:
            prof = load_profile(a.profile)
            paths = {n: s["path"] for n, s in prof["sources"].items()}
        else:
            if not a.model:
                raise MixprecError("give --profile P, or --model BASE --source NAME=PATH ... with --text "
                                   "(or --synthetic-tokens) to profile now")
            cfg = MixConfig(model=Path(a.model).expanduser().resolve(),
                            sources={n: Path(v).expanduser().resolve() for n, v in given.items()},
                            dtype=_dtype(a.dtype) or torch.bfloat16, origin="mixprec plan")
            device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
            prof = profile_model(cfg, _ids(a, cfg), device=device, progress=not a.quiet)
            paths = {n: str(v) for n, v in cfg.sources.items()}
        unknown = [n for n in given if n not in prof["sources"]]
        if unknown:
            raise MixprecError(f"--source {', '.join(unknown)}: not a source of the profile "
                               f"({', '.join(n for n in prof['sources'] if n != 'model')})")
        paths.update({n: str(Path(v).expanduser().resolve()) if prof["kind"] == "measured" else v
                      for n, v in given.items()})
        if a.model:
            paths["model"] = str(Path(a.model).expanduser().resolve()) if prof["kind"] == "measured" else a.model
        fit, desc = None, ""
        # the profile counted bytes in its dtype: another element size would load other sizes
        dtype, wanted = _dtype(prof.get("dtype", "bfloat16")), _dtype(a.dtype)
        if wanted is not None and wanted.itemsize != dtype.itemsize:
            raise MixprecError(f"--dtype {a.dtype}: the profile counts dense weights in {prof.get('dtype', 'bfloat16')} "
                               f"({dtype.itemsize} bytes a value), so the budget would not hold; profile with "
                               f"--dtype {a.dtype} instead")
        dtype = wanted or dtype
        if a.fit:
            budget, fit = fit_budget(arch_args(prof), a.fit, a.context, a.batch, a.margin or DEFAULT_MARGIN,
                                     elem=dtype.itemsize, graph_tokens=a.prefill_graph_tokens)
            desc = f"{a.fit}, context {a.context} x batch {a.batch}"
        else:
            budget = parse_bytes(a.budget)
        use = None if a.use is None else [s.strip() for s in a.use.split(",") if s.strip()]
        res = plan_budget(prof, budget, use, a.mass_prior)
        placeholders = sorted({s for s in set(res.choice.values()) | {"model"} if paths[s].startswith("<")})
        if placeholders:      # a synthetic profile names no checkpoints: the YAML would not load
            raise MixprecError(f"the plan uses {', '.join(placeholders)}, which this synthetic profile has no "
                               f"checkpoint for: give --model BASE and --source NAME=PATH for each")
        mix = to_mix_config(prof, res.choice, paths["model"], paths, dtype=dtype)
        text = yaml_text(prof, res, mix, fit, desc)
        if a.output:
            _write(a.output, text)
    except MixprecError as e:
        return _fail(e)
    report = summary(prof, res)
    if a.output:
        print(report)
        print(f"wrote {a.output}")
    else:
        print(report, file=sys.stderr)
        sys.stdout.write(text)
    return 0


# -- eval -----------------------------------------------------------------------------------------
def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mixprec eval", description="KL(ref || mix) per token (mean, p99), top-1 "
                                "agreement and perplexity of both, on held-out text.")
    p.add_argument("config", help="the mix (YAML or checkpoint directory)")
    p.add_argument("--ref", default=None, help="reference mix / checkpoint (default: the mix's base checkpoint)")
    _token_args(p, 2048, seed=1)     # synthetic eval tokens differ from profile's (seed 0) by default
    p.add_argument("--batch", type=at_least(1), default=4, help="sequences per forward")
    p.add_argument("--device", type=device_arg, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from .evaluate import evaluate, format_metrics
    try:
        cfg = load_config(a.config)
        r = evaluate(cfg, _ids(a, cfg), ref=a.ref, device=a.device, dtype=_dtype(a.dtype), batch=a.batch,
                     progress=not a.quiet)
    except MixprecError as e:
        return _fail(e)
    print(json.dumps(r, indent=1) if a.json else format_metrics(r))
    return 0


# -- export ---------------------------------------------------------------------------------------
def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mixprec export", description="Write the assembled mix as one checkpoint: "
                                "every tensor copied in its source's on-disk form, plus a manifest.")
    p.add_argument("config", help="mix YAML")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from .export import export_mix
    from .knapsack import fmt_bytes, parse_bytes
    try:
        out = export_mix(a.config, a.out_dir, force=a.force,
                         max_shard_bytes=parse_bytes(a.max_shard_size, "--max-shard-size"), progress=not a.quiet)
    except MixprecError as e:
        return _fail(e)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"exported {fmt_bytes(size)} to {out}")
    return 0
