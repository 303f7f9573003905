"""Integer arithmetic for the launch code: triton.cdiv and triton.next_power_of_2 are constexpr
functions, and their call wrapper costs ~3 µs a call on the host (triton 3.6, timeit on the CPU
machine) against ~0.03 µs for the same arithmetic in Python; an eager layer's launches compute
dozens of them. Same results (tests/test_kernels.py compares them with triton's)."""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n; 0 for n <= 0, as triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
