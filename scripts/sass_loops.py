"""Instruction mix of the loops in compiled kernels, offline (no GPU): count what each inner loop
issues per iteration, e.g. per weight word of a GEMV, before spending device time on a variant.

    MIXPREC_SM90_DUMP=/tmp/dump python tests/sm90_compile.py      (compiles every launch for sm_90)
    python scripts/sass_loops.py /tmp/dump/_moe_gemv_kernel_*.cubin [--min 60]

Prints, per cubin, each backward branch's loop body (at least --min instructions): its length and
opcode counts. Uses the cuobjdump that ships with Triton's NVIDIA backend.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess


def cuobjdump() -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def loops(sass: str, min_len: int) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of every loop body: a backward branch and its target."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    where = {a: i for i, (a, _, _) in enumerate(ins)}
    out = []
    for i, (a, op, rest) in enumerate(ins):
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < a and int(t.group(1), 16) in where:
            body = ins[where[int(t.group(1), 16)]:i + 1]
            if len(body) >= min_len:
                out.append((body[0][0], a, collections.Counter(o.split(".")[0] for _, o, _ in body)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cubins", nargs="+")
    ap.add_argument("--min", type=int, default=60, help="shortest loop body shown")
    a = ap.parse_args()
    tool = cuobjdump()
    for path in a.cubins:
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        print(os.path.basename(path))
        for lo, hi, c in loops(sass, a.min):
            print(f"  loop {lo:#x}-{hi:#x}: {sum(c.values())} instructions: "
                  + " ".join(f"{k} {v}" for k, v in c.most_common(16)))


if __name__ == "__main__":
    main()
