"""Command line: python -m mixprec {demo,plan,generate,bench,serve,inspect,make-fixture,...}."""
from __future__ import annotations

import argparse
import sys


def _plan(a) -> int:
    import json

    from .config import load_config
    from .errors import MixprecError
    from .loader.plan import fmt_size, make_plan
    from .parallel import make_layout, rank_bytes
    try:
        p = make_plan(load_config(a.config), strict=False)
        # tp x ep: whether the mix splits (ParallelError) and the weight bytes of each rank
        per = rank_bytes(p, a.tp, a.ep) if a.tp * a.ep > 1 and not p.errors else None
    except MixprecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if p.errors:
        print(f"{len(p.errors)} error(s) in the mix:", file=sys.stderr)
        for err in p.errors:
            print(f"  - {err}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({**p.to_json(), **({"rank_bytes": per} if per else {})}, indent=1))
        return 0
    print(p.table(all=a.all))
    if per:
        print(f"tp={a.tp} x ep={a.ep}: weights per rank (on-disk formats; KV cache not counted)")
        for r, nb in enumerate(per):
            lay = make_layout(p.args, a.tp, a.ep, r)
            print(f"  rank {r} (tp_rank {lay.tp_rank}, ep_rank {lay.ep_rank}): {fmt_size(nb)}")
    return 0


def _generate(a) -> int:
    from .api import load
    from .errors import MixprecError
    from .runtime.sampling import SamplingParams
    if not a.prompt:
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    if a.no_thinking and not a.chat:
        print("error: --no-thinking sets a chat template variable: it needs --chat", file=sys.stderr)
        return 2
    try:    # bad input (config, checkpoint, sampling values) is a message, not a traceback
        params = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                                max_new_tokens=a.max_new_tokens, presence_penalty=a.presence_penalty,
                                frequency_penalty=a.frequency_penalty).validate()
        model = load(a.config, device=a.device, dtype=a.dtype, progress=not a.quiet, tp=a.tp, ep=a.ep)
    except (MixprecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _stream(a, model, params)


def _stream(a, model, params) -> int:
    from dataclasses import replace

    from .runtime.generate import Generator
    main = getattr(model, "parallel", None) is None or model.parallel.is_main   # only rank 0 prints
    tok = model.tokenizer
    if tok is None:
        print(f"error: the base checkpoint {a.config} has no tokenizer.json", file=sys.stderr)
        return 2
    ids = tok.encode_prompt(a.prompt, chat=a.chat, **({"enable_thinking": False} if a.no_thinking else {}))
    params = replace(params, stop_token_ids=tuple(tok.eos_token_ids))
    gen = Generator(model, use_cuda_graphs=None if not a.no_cuda_graphs else False)
    out: list[int] = []
    shown = ""
    for step in gen.stream([ids], params):
        if step[0] is None:
            break
        out.append(step[0])
        if not main:
            continue
        text = tok.decode(out)
        if text.endswith("\ufffd"):           # an incomplete UTF-8 character: wait for its other bytes
            continue
        sys.stdout.write(text[len(shown):])   # stream the new characters only
        sys.stdout.flush()
        shown = text
    if main:
        sys.stdout.write(tok.decode(out)[len(shown):] + "\n")
    return 0


def _inspect(a) -> int:
    from .inspect import inspect_checkpoint
    return inspect_checkpoint(a.dir, as_json=a.json)


def _make_fixture(a) -> int:
    from .testing import fixtures
    try:
        return fixtures.run(a) or 0
    except OSError as e:        # an unwritable or impossible directory: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _demo(a) -> int:
    from .demo import run_demo
    return run_demo(a)


def build_parser() -> argparse.ArgumentParser:
    from .argtypes import at_least, device
    p = argparse.ArgumentParser(prog="mixprec", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("plan", help="resolve every weight of a mix to (source, format); no tensors read")
    s.add_argument("config", help="mix YAML, or one checkpoint directory")
    s.add_argument("--all", action="store_true", help="one line per module instead of ranges")
    s.add_argument("--json", action="store_true")
    s.add_argument("--tp", type=at_least(1), default=1, help="also check the split over tp x ep ranks, bytes per rank")
    s.add_argument("--ep", type=at_least(1), default=1)
    s.set_defaults(fn=_plan)

    s = sub.add_parser("generate", help="load a mix and generate text (streams to stdout)")
    s.add_argument("config")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=at_least(1), default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0,
                   help="lowers the logit of every token generated so far (OpenAI's; Qwen3's quantized "
                        "checkpoints suggest up to 1.5 against repetition)")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="lowers it per occurrence")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    s.add_argument("--no-thinking", action="store_true",
                   help="with --chat: the template's enable_thinking=False (Qwen3's non-thinking mode)")
    s.add_argument("--device", type=device, default=None)
    s.add_argument("--dtype", default=None)
    s.add_argument("--no-cuda-graphs", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--tp", type=at_least(1), default=None, help="tensor parallel size (under torchrun; default: config)")
    s.add_argument("--ep", type=at_least(1), default=None, help="expert parallel size (under torchrun; default: config)")
    s.set_defaults(fn=_generate)

    s = sub.add_parser("inspect", help="per-module format table of one checkpoint")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("make-fixture", help="write a tiny random Qwen3-MoE in every format")
    from .testing.fixtures import add_arguments
    add_arguments(s)
    s.set_defaults(fn=_make_fixture)

    s = sub.add_parser("demo", help="build fixtures, plan a per-expert mix, generate, compare with bf16")
    s.add_argument("--dir", default=None, help="where to write the fixtures (default: a temp dir)")
    s.add_argument("--device", type=device, default=None)
    s.set_defaults(fn=_demo)

    for name, (mod, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)   # listed in --help; parsed by the module
    for name, help_ in (("profile", "measure routing and per-source error of every expert and linear"),
                        ("eval", "KL / top-1 / perplexity of a mix against a reference"),
                        ("export", "write an assembled mix as one checkpoint (packed tensors as in their sources)")):
        sub.add_parser(name, help=help_, add_help=False)
    return p


# commands whose module parses its own arguments
DELEGATED = {
    "bench-kernels": ("mixprec.kernels.bench", "dense kernel benchmark (GPU)"),
    "bench-moe": ("mixprec.kernels.moe_bench", "MoE kernel benchmark (GPU)"),
    "bench": ("mixprec.runtime.bench", "tok/s of a mix or a synthetic model (GPU)"),
    "serve": ("mixprec.serve", "OpenAI-compatible HTTP server"),
}


# the budget planner's commands (mixprec/planner/cli.py); `plan` goes there when given a budget
PLANNER = {"profile": "profile_main", "eval": "eval_main", "export": "export_main"}


def _allocator_defaults() -> None:
    """Expandable segments for the CUDA caching allocator unless the user configured it. Loading
    fills most of the GPU with tensors made through temporaries of other sizes, and the default
    allocator keeps the holes: the 94-layer 235B synthetic model (int4 experts) ran out of memory on
    an H200 with 17.8 GiB reserved but unallocated. Expandable segments unmap freed pages instead.
    Read when CUDA first allocates, so this must run before any command touches the GPU."""
    import os
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _allocator_defaults()
    if argv and argv[0] in PLANNER or (argv and argv[0] == "plan" and any(
            a.split("=")[0] in ("--model", "--profile", "--budget", "--fit") for a in argv[1:])):
        from .planner import cli
        return getattr(cli, PLANNER.get(argv[0], "plan_main"))(argv[1:]) or 0
    if argv and argv[0] in DELEGATED:
        import importlib
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:     # output piped into e.g. `head`, which closed it: not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
