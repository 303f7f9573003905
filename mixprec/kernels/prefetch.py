"""L2 prefetch of weights that a later kernel of the decode step reads (Hopper bulk prefetch).

At batch-1 decode a GEMV's time is a chain of dependent weight loads, and HBM sits mostly idle
(an H100 30B int4 step reads its bytes at ~30% of the copy bandwidth). Weights already in L2 cut
that chain (H100, CUDA graphs: 30B fp8 qkv GEMV 7.3 -> 6.1 µs, int4 MoE layer 18.7 -> 15.1 µs).
A prefetch launch on a side stream asks the memory system for the bytes ahead of time:
`cp.async.bulk.prefetch.L2` takes an address and a size, costs one instruction per 4 KB, and
holds no registers, so the launch is a few µs of issue beside the main chain.

A table row is (address, bytes <= ROW_BYTES, per-expert stride in bytes, expert-map row or -1):
-1 rows are fixed tensors; other rows are one slice of every expert and are fetched for each
routed expert id (its index in the row's bucket from the expert map). The MoE layer prefetches
its routed experts' down weights while the gate/up launch runs (layers/moe.py).
Off on CPU, under the interpreter, before sm_90, and with MIXPREC_PREFETCH=0.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LANES = 32
CHUNK = 4096                     # bytes per bulk prefetch instruction
ROW_BYTES = LANES * CHUNK        # one table row = one warp of prefetches
# The window of bytes a layer asks for ahead of use. Above: the H100 has 50 MB of L2, and the
# kernels running meanwhile stream their own weights through it. Below: the side launch costs more
# than it saves (H100, 30B batch 1, routed down slices: bf16 25 MB 269.6 -> 277.0 tok/s, fp8
# 12.6 MB 300.3 -> 295.9, int4 6.3 MB 370.5 -> 366.0).
MIN_BYTES, BUDGET = 16 << 20, 32 << 20

_SIDE: dict[int, torch.cuda.Stream] = {}
_PENDING: dict[int, list[Tensor]] = {}   # device -> tensors the side stream reads, until join()


@functools.lru_cache(maxsize=None)
def enabled(device_index: int) -> bool:
    if os.environ.get("MIXPREC_PREFETCH", "1") == "0" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def active(t: Tensor) -> bool:
    """Whether prefetches for t's device are issued."""
    return t.is_cuda and enabled(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def _l2_prefetch(addr, nbytes):
    # nbytes > 0 (a multiple of 16): prefetch [addr, addr + nbytes) into L2; 0: nothing
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(tab_ptr, ids_ptr, emap_ptr, E, LANES: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (table rows, routed ids). Row r, id j: fixed rows once (j == 0); expert rows at the
    slice of the expert ids[j] in the row's bucket (skipped where the expert is elsewhere)."""
    r = tl.program_id(0)
    j = tl.program_id(1)
    base = tl.load(tab_ptr + r * 4)
    nbytes = tl.load(tab_ptr + r * 4 + 1)
    stride = tl.load(tab_ptr + r * 4 + 2)
    bucket = tl.load(tab_ptr + r * 4 + 3)
    if bucket < 0:
        loc = tl.where(j == 0, 0, -1).to(tl.int64)
    else:
        loc = tl.load(emap_ptr + bucket * E + tl.load(ids_ptr + j)).to(tl.int64)
    off = tl.arange(0, LANES).to(tl.int64) * CHUNK
    size = tl.where((off < nbytes) & (loc >= 0), tl.minimum(nbytes - off, CHUNK), 0)
    addr = (base + loc * stride + off).to(tl.pointer_type(tl.uint8))
    _l2_prefetch(addr, ((size + 15) // 16 * 16).to(tl.int32))


def table_rows(t: Tensor, bucket: int = -1) -> list[tuple[int, int, int, int]]:
    """Rows covering tensor t (bucket < 0), or one expert's slice of the stacked t [E_b, ...]
    (stride = t.stride(0) elements) for expert-map row `bucket`."""
    es = t.element_size()
    if bucket < 0:
        size, stride = t.numel() * es, 0
    else:
        size, stride = t[0].numel() * es, t.stride(0) * es
    return [(t.data_ptr() + o, min(ROW_BYTES, size - o), stride, bucket) for o in range(0, size, ROW_BYTES)]


def make_table(rows: list[tuple[int, int, int, int]], device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 4)


def prefetch(table: Tensor, ids: Tensor | None = None, expert_maps: Tensor | None = None) -> None:
    """Issue the L2 prefetches of `table` (make_table) for the routed ids [P] int32 (rows of
    the expert maps [n_buckets, E] int32); no-op where prefetch is off. No host sync."""
    if table.numel() == 0 or not active(table):
        return
    if ids is None:
        ids = expert_maps = table       # only fixed rows: never read
        n, E = 1, 0
    else:
        ids = ids.reshape(-1)
        n, E = ids.numel(), expert_maps.shape[1]
    _prefetch_kernel[(table.shape[0], n)](table, ids, expert_maps, E, LANES=LANES, CHUNK=CHUNK, num_warps=1)


def launch_side(table: Tensor, ids: Tensor, expert_maps: Tensor) -> None:
    """prefetch() on a side stream that first waits for the work queued so far (the routing that
    produced ids), so it runs beside the kernels that follow. join() before the forward returns."""
    if table.numel() == 0 or not active(table):
        return
    dev = table.device.index or 0
    main = torch.cuda.current_stream(table.device)
    side = _SIDE.get(dev)
    if side is None:
        side = _SIDE[dev] = torch.cuda.Stream(table.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        prefetch(table, ids, expert_maps)
    _PENDING.setdefault(dev, []).append(ids)     # kept alive (not reused) until the join


def join(device: torch.device) -> None:
    """The current stream waits for this device's side-stream prefetches (a captured graph must
    rejoin every stream it forked)."""
    if device.type == "cuda" and _PENDING.pop(device.index or 0, None) is not None:
        torch.cuda.current_stream(device).wait_stream(_SIDE[device.index or 0])
