"""Load throughput from local safetensors: writes a reduced-layer Qwen3-30B-A3B-shaped random
checkpoint in real on-disk formats (bf16, FP8 block, GPTQ int4) with the fixture writer, then
times `mixprec.load(dir, device="cuda")` (headers, mmap reads, format load, expert stacking,
host->device copies) for each, and reports GB/s over the checkpoint's bytes on disk. The
tokenizer (the fixture writes a full 151936-token tokenizer.json) is timed on its own and left
out of the weight throughput.

    python scripts/bench_load.py DIR [--layers 1] [--formats bf16,fp8,gptq] [--reuse] [--warm]

The page cache is dropped before each load when the process may (root), else the files are warm
in memory from being written, which the output says; --warm reads every file first instead (the
loader's own speed, not the disk's). --reuse loads the checkpoints already in DIR."""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mixprec  # noqa: E402
from mixprec.testing.fixtures import make_fixture  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--formats", default="bf16,fp8,gptq")
    ap.add_argument("--warm", action="store_true", help="read the files first instead of dropping the page cache")
    ap.add_argument("--reuse", action="store_true", help="load the checkpoints already in DIR (same --layers)")
    a = ap.parse_args()
    names = a.formats.split(",")
    t0 = time.perf_counter()
    if a.reuse and all((a.dir / n / "config.json").is_file() for n in names):
        paths = {n: a.dir / n for n in names}
        print(f"reusing the checkpoints in {a.dir}")
    else:
        paths = make_fixture(a.dir, formats=names, layers=a.layers, hidden=2048, experts=128, top_k=8, heads=32,
                             kv_heads=4, head_dim=128, moe_intermediate=768, intermediate=6144, vocab=151936,
                             mlp_only_layers=())
        print(f"wrote {names} ({a.layers} layers, 30B shapes) in {time.perf_counter() - t0:.0f} s")
    torch.empty(1, device="cuda")                      # CUDA context outside the timing
    for name in names:
        nbytes = sum(f.stat().st_size for f in paths[name].glob("*.safetensors"))
        if a.warm:     # every file read once: the load reads from the page cache
            for f in paths[name].iterdir():
                with open(f, "rb") as fh:
                    while fh.read(1 << 26):
                        pass
        cold = not a.warm and drop_caches()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = mixprec.load(paths[name], device="cuda", progress=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        mixprec.load_tokenizer(paths[name])
        tok = time.perf_counter() - t0
        w = dt - tok
        print(f"{name:5s} {nbytes / 1e9:6.2f} GB in {dt:6.2f} s, of which tokenizer {tok:5.2f} s: weights "
              f"{nbytes / 1e9 / w:5.2f} GB/s ({'page cache dropped' if cold else 'warm page cache'})")
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
