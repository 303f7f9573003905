"""Test fixtures: tiny random Qwen3-MoE models written as real checkpoints (no downloads)."""
