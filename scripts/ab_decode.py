"""Same-call decode A/B of two (or more) source trees: `python -m mixprec bench --synthetic MODEL`
run from each tree in turn (old, new, old, new, ...), REPS times per (model, mix), and a summary of decode
tok/s per batch with the change in %. Every run's full output goes to one log (--log), so a device
call returns one file. GPU only (bench needs CUDA).

    mkdir -p tmpdiag/old && git archive HEAD~1 mixprec scripts | tar -x -C tmpdiag/old
    python scripts/ab_decode.py --old tmpdiag/old --model qwen3-30b-a3b,qwen3-235b-a22b --mix fp8 \\
        --mix mixed --batch 2,4 --layers 16 --reps 2 --log $OUT/ab.log

Two changes at once, each timed on its own in the same call: `--old A --tree mid=B --new C` runs
A, B, C in turn and prints A -> B and B -> C (and A -> C), as session 41 needed two calls for.
Session 34's decode A/Bs (benchmarks/runtime/session34_*_ab_h200.log) are its logs.
"""
import argparse
import re
import statistics
import subprocess
import sys

ROW = re.compile(r"^\| (\d+) \|")


def decode_tok_s(out: str) -> dict[int, float]:
    """bench's table rows -> {batch: decode tok/s} (the 4th column)."""
    rows = {}
    for line in out.splitlines():
        if ROW.match(line):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[int(cells[0])] = float(cells[3])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="tree of the old code (a git archive)")
    ap.add_argument("--new", default=".", help="tree of the new code")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a further tree, run between old and new in the order given (repeatable)")
    ap.add_argument("--model", default="qwen3-30b-a3b", help="comma-separated synthetic models")
    ap.add_argument("--mix", action="append", help="one mix per flag, no commas (bench reads a comma list as "
                    "several mixes); rule mixes use ';' (`bench --help`)")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--log", default="ab_decode.log")
    a = ap.parse_args()
    if any("," in m for m in a.mix or []):
        ap.error("--mix: one mix per flag, without commas")
    trees = {"old": a.old}
    for t in a.tree:
        name, sep, path = t.partition("=")
        if not sep or not name or not path or name in ("old", "new") or name in trees:
            ap.error(f"--tree {t!r}: expected NAME=PATH with a new name other than old / new")
        trees[name] = path
    trees["new"] = a.new
    results = {}     # (model, mix, tree) -> [{batch: tok/s}, ...]
    with open(a.log, "w") as log:
        for rep in range(a.reps):
            for model in a.model.split(","):
                for mix in a.mix or ["int4"]:
                    for tree, path in trees.items():
                        cmd = [sys.executable, "-m", "mixprec", "bench", "--synthetic", model, "--layers", str(a.layers),
                               "--mix", mix, "--batch", a.batch, "--prompt-len", str(a.prompt_len),
                               "--gen-len", str(a.gen_len)]
                        p = subprocess.run(cmd, cwd=path, capture_output=True, text=True)
                        print(f"== {tree} rep {rep + 1}: {' '.join(cmd[1:])} (rc {p.returncode})\n{p.stdout}{p.stderr}",
                              file=log, flush=True)
                        got = decode_tok_s(p.stdout)
                        results.setdefault((model, mix, tree), []).append(got)
                        print(f"{model} {mix} {tree} rep {rep + 1}: " + (", ".join(
                            f"b{b} {t:.1f}" for b, t in got.items()) or f"no table (rc {p.returncode})"), flush=True)
    names = list(trees)
    pairs = list(zip(names, names[1:])) + ([("old", "new")] if len(names) > 2 else [])
    for before, after in pairs:
        print(f"\ndecode tok/s, {before} -> {after} (each rep), change of the medians")
        for model in a.model.split(","):
            for mix in a.mix or ["int4"]:
                print_change(model, mix, results[(model, mix, before)], results[(model, mix, after)])
    return 0


def print_change(model: str, mix: str, old: list[dict], new: list[dict]) -> None:
    for b in sorted(set().union(*old, *new)):
        o = [r[b] for r in old if b in r]
        n = [r[b] for r in new if b in r]
        d = f"{100 * (statistics.median(n) / statistics.median(o) - 1):+.1f}%" if o and n else "n/a"
        print(f"{model} {mix!r} batch {b}: {' / '.join(f'{t:.1f}' for t in o)} -> "
              f"{' / '.join(f'{t:.1f}' for t in n)} ({d})")


if __name__ == "__main__":
    sys.exit(main())
