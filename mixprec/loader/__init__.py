"""Checkpoints on disk -> a plan (every linear -> source, format) -> the assembled model."""
from .checkpoint import Checkpoint, read_header
from .plan import Entry, Plan, make_plan

__all__ = ["Checkpoint", "Entry", "Plan", "make_plan", "read_header"]
