"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels.

A kernel launched with PDL is scheduled as soon as every block of the kernel before it in the
stream has exited, without waiting for that kernel's completion and memory flush; it calls
`wait(PDL)` (griddepcontrol.wait) before it reads what that kernel wrote. Every PDL kernel
waits before it exits, so when one starts, all kernels before its immediate predecessor have
completed: it may read their outputs, and weights, before `wait`. What overlaps is the launch,
the block scheduling and such prologue loads (a GEMV's first weight tile): at batch-1 decode
~10 small kernels per layer otherwise each start only after the previous one has drained.
Kernels launched without PDL (cuBLAS, torch ops) order as usual.

An early trigger (`launch_dependents`, griddepcontrol.launch_dependents) lets the next kernel
start while this one still runs. Placed before this kernel's own wait it breaks the rule above
for that next kernel (before its `wait` it may then read weights only); placed after it, the rule
holds (this kernel has waited, so the one before it has completed). The decode attention kernel
relies on the rule (ONE_TILE: the positions and the cached K / V tile are read before its wait),
so the qkv linears before it must not trigger before their wait. So only kernels whose
successors are dense linears trigger early (decode attention -> o_proj, rms_norm -> qkv / router /
lm_head): their weight prefetch then
overlaps the small kernel instead of following it (H100, 30B 16 layers, batch 1: int4 962 -> 1009
tok/s, fp8 818 -> 858). Triggering in every kernel at its start measured slower (322 tok/s
against 350 without, session 5); also triggering after the wait in the fp8 / int8 GEMVs, the
router and the MoE down side gained nothing more (int4 batch 1: 982 against 1009; the experts'
launches at 1-4 tokens again on an H200, session 40: 235B -0.4% / -0.6% at batch 1 / 4). An MoE down
launch reads routing ids before its wait, so the MoE up launch triggers only after its own wait
(the router has then completed): batch 1 int4 1006 -> 1012 tok/s, batch 8 3966 -> 4001.

`early_trigger()` marks a call whose successor should start early (the o_proj before the
post-attention norm / router): the fp8 GEMV launched inside triggers right after its own wait, so
the router's programs are resident and load their weights while it runs (H200, 16-layer decode at
batch 1, int4 experts + fp8 attention: 235B 704 -> 710 tok/s, +0.8%; 30B +2.4% with a re-tuned qkv
row; session 39). The int4 / int8 GEMVs ignore it (not timed).

Off on CPU and under the Triton interpreter, before sm_90, with a Triton that lacks the
`launch_pdl` option, or with MIXPREC_PDL=0.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off (the calls below are compiled out)
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def _enabled(device_index: int) -> bool:
    if os.environ.get("MIXPREC_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    if gdc_wait is None or "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


_early = False


@contextlib.contextmanager
def early_trigger(on: bool = True):
    """Kernels that honour it (the fp8 GEMV) and launch inside let the next kernel start once they
    have waited (which keeps the rule in the module docstring for that next kernel)."""
    global _early
    prev, _early = _early, on
    try:
        yield
    finally:
        _early = prev


def early() -> bool:
    return _early


def launch_kw(t: Tensor) -> dict:
    """Launch kwargs for a kernel taking a `PDL` constexpr, on t's device."""
    if t.is_cuda and _enabled(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
