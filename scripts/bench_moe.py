"""Mixed-format fused MoE benchmark: `python scripts/bench_moe.py [--sweep] [--check] [--out DIR]`
(same as `python -m mixprec bench-moe`; see mixprec/kernels/moe_bench.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels.moe_bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
