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


def list_of(lo, kind=int):
    """Comma-separated numbers, each >= lo ("1,8,32")."""
    one = at_least(lo, kind)

    def parse(v: str):
        if not v.strip():
            raise argparse.ArgumentTypeError("an empty list")
        return [one(p.strip()) for p in v.split(",")]
    return parse
