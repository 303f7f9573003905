"""argparse option types shared by the command lines."""
from __future__ import annotations

import argparse


def at_least(lo, kind=int):
    """A number >= lo (argparse answers anything else with exit 2, naming the option)."""
    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
        if not x >= lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return x
    return parse
