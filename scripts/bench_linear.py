"""Dense-linear kernel benchmark; same as `python -m mixprec bench-kernels` (see mixprec/kernels/bench.py)."""
import sys

from mixprec.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
