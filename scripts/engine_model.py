"""Shared by the engine benchmarks (bench_prefix.py, bench_chunked.py, bench_burst.py): the
--model / --mix / --layers options and the synthetic model (random weights, real shapes, real
packed formats) they name, on the GPU when there is one, else the CPU."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.runtime.synthetic import build_synthetic, synthetic_args


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--mix", default="int4")
    ap.add_argument("--layers", type=int, default=None)


def build(a: argparse.Namespace, what: str = ""):
    """The model of a parsed command line; prints a line naming it, the device and `what`."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_synthetic(synthetic_args(a.model, a.layers), a.mix, device=dev, progress=False)
    print(f"{a.model} mix={a.mix} layers={model.args.num_hidden_layers} on "
          f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}{what}", flush=True)
    return model
