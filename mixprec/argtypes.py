"""argparse option types shared by the command lines."""
from __future__ import annotations

import argparse


def at_least(lo, kind=int, hi=None):
    """A number >= lo (and <= hi when given; argparse answers anything else with exit 2, naming
    the option)."""
    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
        if not x >= lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        if hi is not None and not x <= hi:
            raise argparse.ArgumentTypeError(f"{v} must be <= {hi}")
        return x
    return parse


def device(v: str) -> str:
    """A device the loader places weights on: cpu, cuda or cuda:N (config.compute_device)."""
    from .config import compute_device
    from .errors import ConfigError
    try:
        compute_device(v)
    except ConfigError as e:     # its message names what is expected
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def list_of(lo, kind=int):
    """Comma-separated numbers, each >= lo ("1,8,32")."""
    one = at_least(lo, kind)

    def parse(v: str):
        if not v.strip():
            raise argparse.ArgumentTypeError("an empty list")
        return [one(p.strip()) for p in v.split(",")]
    return parse
