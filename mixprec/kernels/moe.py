"""Mixed-format fused MoE: routing, token->expert alignment, grouped expert GEMMs.

A layer's experts live in *buckets*, one per (projection, layout, params) key, passed as plain dicts:

    {"proj": "gate_up" | "gate" | "up" | "down",
     "layout": "dense" | "fp8" | "intq" | "int8",
     "params": {...},                     # fp8: block=(bn, bk), act; intq: bits, group_size; int8: act
     "tensors": {name: Tensor},           # the layout's tensors (formats/base.py) with a leading [E_b]
     "expert_map": int32 [E],             # global expert id -> index in this bucket, -1 if absent
     "identity": bool}                    # optional: expert_map is 0..E-1 (the kernels skip reading it)

gate_up stacks gate rows 0..I-1 then up rows I..2I-1 along N. Every expert must have its gate and
up rows (in one gate_up bucket or in a gate and an up bucket) and its down rows in exactly one
bucket each (`validate_buckets` checks this once at load time; the kernels never sync).

fused_moe runs, for any mix of formats, three launches on CUDA: the gate/up kernel (up to 4 gate_up,
gate and up buckets per launch, more take several; silu(gate)*up fused), the down kernel (every down bucket in one
launch, routing weight applied, the sum over the k experts of a token fused via per-tile arrival
counters), plus the alignment kernel on the prefill path, and for GPTQ act-order experts from
PERMUTE_PAIRS_MIN_M tokens one launch per side that lays each (token, expert) pair's input out in
its expert's K order (_permute_pairs). Each side picks its path (GEMV for few
tokens, tensor-core dot tiles otherwise) and launch config from the layouts of its buckets
(moe_configs.pick): a per-projection mix may run gate/up on the GEMV path and down on the dot path,
and a dot config may run a side's int4 buckets in a launch of their own on 8-pair tensor-core
blocks beside the side's other layouts (_apart; `scripts/sweep_moe_dot.py --apart` times it, no
library row uses it).
Many tokens (prefill) of a layer of bf16 and intq buckets take grouped_moe instead: two cuBLAS
grouped GEMMs (torch._grouped_mm) over the pairs sorted by expert, bf16 weights in place or the
layer dequantized into transient bf16 stacks (grouped_fits says when).
Without CUDA the same Triton kernels run in the interpreter when TRITON_INTERPRET=1, otherwise a
torch fallback (moe_reference) is used.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FormatError, ShapeMismatch
from . import moe_configs, pdl
from .intq import mma_takes
from .ints import cdiv, next_power_of_2
from .moe_triton import (_align_count_kernel, _align_scan_kernel, _align_scatter_kernel, _align_sort_kernel,
                         _intq_stack_kernel, _moe_dot_kernel, _moe_gemv_kernel, _permute_pairs_kernel, _route_kernel,
                         _router_route_kernel, _silu_mul_kernel, _token_sum_kernel)
from .quant import (FP8_ACT_GROUP, act_quant, fp8_act_reference, int8_act_quant_reference,
                    split_counters)

PROJ_CODE = {"gate_up": 0, "gate": 1, "up": 2, "down": 3}
LAYOUT_CODE = {"dense": 0, "fp8": 1, "intq": 2, "int8": 3}
_FP8, _INTQ = LAYOUT_CODE["fp8"], LAYOUT_CODE["intq"]
# 8-pair (mma) blocks run gate and up in one K loop where every slot is one of these layouts
# (int4 on the mma tiles, fp8 on 16-row dots: moe_triton._dot_slot_gu)
_MMA_GU_LAYOUTS = frozenset({_INTQ, _FP8})
# the other fields of a slot description (moe_triton's module docstring; its kernels decode C)
CODE_A8, CODE_ZERO, CODE_PERM, CODE_INT8, CODE_FOLD = 1 << 2, 1 << 3, 1 << 4, 1 << 7, 1 << 8
CODE_IDENT = 1 << 9   # a bucket of every expert in order: index = expert id, no map load
PROJ_SHIFT = 5      # bits 5-6
LAYOUT_TENSORS = {  # required, optional
    "dense": (("weight",), ()),
    "fp8": (("weight", "scale"), ()),
    "intq": (("qweight", "scales"), ("zeros", "perm")),
    "int8": (("weight", "scale"), ("zero",)),
}
MAX_SLOTS = 4  # buckets one launch can serve
MOE_ACT_DTYPES = (torch.bfloat16, torch.float16)   # what fused_moe takes (float32 layers: the readable path)
HALF_PROJS = {"gate": ("gate_up", "gate"), "up": ("gate_up", "up"), "down": ("down",)}  # rows -> bucket projs


def _triton_ok(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# routing

def topk_lowest_id(p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk over the last dim with ties to the lower index, as the route kernels break them
    (torch.topk leaves tie order unspecified: bf16 / fp16 router logits tie often enough that the
    readable and kernel paths would pick different experts)."""
    w, i = p.sort(dim=-1, descending=True, stable=True)
    return w[..., :k], i[..., :k]


def route(router_logits: Tensor, top_k: int, renorm: bool) -> tuple[Tensor, Tensor]:
    """router_logits [M, E] -> (topk_w [M, k] fp32, topk_ids [M, k] int32).

    softmax over E in fp32, top-k (descending; ties go to the lower expert id), then
    renormalised to sum 1 when `renorm` (Qwen3 `norm_topk_prob`). One Triton launch."""
    if router_logits.dim() != 2:
        raise ShapeMismatch(f"route: router_logits must be [M, E], got {tuple(router_logits.shape)}")
    M, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ShapeMismatch(f"route: top_k={top_k} must be in 1..E={E}")
    if not _triton_ok(router_logits):
        w, i = topk_lowest_id(torch.softmax(router_logits.float(), dim=-1), top_k)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        return w, i.to(torch.int32)
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    w = torch.empty(M, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=logits.device)
    EB = next_power_of_2(E)
    BT = max(1, min(16, 4096 // EB))
    if M > 0:
        _route_kernel[(cdiv(M, BT),)](logits, w, ids, M, E, logits.stride(0), TOPK=top_k,
                                             RENORM=bool(renorm), BT=BT, EB=EB,
                                             KB=next_power_of_2(top_k), num_warps=4,
                                             **pdl.launch_kw(logits))
    return w, ids


# decode at 1-4 tokens: router linear + route in one launch. At M=1 one launch of 5.9 us replaced
# F.linear 5.4 us + route 4.5 us (H100, 2026-11-25, scripts/profile_decode.py); with programs of one
# expert and 1-4 warps (below) the one launch also wins at 4 tokens (session 25, H100,
# scripts/bench_router.py, µs: 30B 6.54 vs rms_norm + F.linear + route 11.11, 235B 10.29 vs 12.41;
# 16-layer 30B decode at batch 4, two runs each: int4 experts + fp8 attention 2699.1 / 2701.1 ->
# 2786.6 / 2786.8 tok/s, fp8 2008.1 / 2010.9 -> 2066.8 / 2067.1); at 8 tokens it does not (235B 16.33
# vs 12.57, 30B decode batch 8 equal; benchmarks/moe_diag/session25_router_programs_h100.log,
# runtime/session25_router_fused_m4_ab_h100.log).
ROUTER_FUSED_MAX_M = 4
# the one-launch router's programs: one expert each (E programs); warps: one per token row, but two
# for one row past H = 2048 (short cross-warp reductions matter more than program count: 2 experts
# x 4 warps before -> 1 expert x 1-2 warps at 1 / 2 tokens: 30B 5.90 / 7.06 -> 5.30 / 5.56 µs, 235B
# 7.87 / 10.01 -> 6.99 / 7.73); router-weight elements per H step. ROUTER_WARPS None: that rule
# (benchmarks set it).
ROUTER_BE, ROUTER_WARPS, ROUTER_TILE = 1, None, 4096


def router_route(x: Tensor, gate_weight: Tensor, top_k: int, renorm: bool) -> tuple[Tensor, Tensor]:
    """route(F.linear(x, gate_weight), top_k, renorm): x [M, H], gate_weight [E, H] -> (topk_w
    [M, k] fp32, topk_ids [M, k] int32). Up to ROUTER_FUSED_MAX_M tokens in one launch (the
    logits are rounded to x's dtype, as F.linear returns them); more tokens, or no Triton device,
    take F.linear + route()."""
    _check_router(x, gate_weight)
    M, E = x.shape[0], gate_weight.shape[0]
    if M > ROUTER_FUSED_MAX_M or M == 0 or not _triton_ok(x) or not 1 <= top_k <= E:
        return route(F.linear(x, gate_weight), top_k, renorm)
    return _router_launch(x, gate_weight, top_k, renorm, None)[:2]


def norm_router_route(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
                      top_k: int, renorm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h = x + residual, y = RMSNorm(h) (kernels/norm.py), then router_route(y): one launch for
    1..ROUTER_FUSED_MAX_M tokens on a Triton device (the caller checks; others raise).
    -> (topk_w [M, k] fp32, topk_ids [M, k] int32, y [M, H], h [M, H])."""
    _check_router(x, gate_weight)
    M, E = x.shape[0], gate_weight.shape[0]
    if not (0 < M <= ROUTER_FUSED_MAX_M and _triton_ok(x) and 1 <= top_k <= E):
        raise ShapeMismatch(f"norm_router_route: {M} tokens, top_k={top_k} of {E} experts on {x.device}: "
                            f"takes 1..{ROUTER_FUSED_MAX_M} tokens on a Triton device")
    if residual.shape != x.shape or norm_weight.shape != (x.shape[1],):
        raise ShapeMismatch(f"norm_router_route: residual {tuple(residual.shape)} / norm weight "
                            f"{tuple(norm_weight.shape)} do not match x {tuple(x.shape)}")
    return _router_launch(x.contiguous(), gate_weight, top_k, renorm, (residual.contiguous(), norm_weight, eps))


def _check_router(x: Tensor, gate_weight: Tensor) -> None:
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ShapeMismatch(f"router_route: x {tuple(x.shape)} and router weight {tuple(gate_weight.shape)} "
                            f"must be [M, H] and [E, H]")


def _router_launch(x, gate_weight, top_k, renorm, norm):
    M, H = x.shape
    E = gate_weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    gate_weight = gate_weight.contiguous()
    lg = torch.empty(M, E, dtype=torch.float32, device=x.device)
    w = torch.empty(M, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=x.device)
    if norm is None:
        r, nw, eps, y, h = x, x, 0.0, None, None
    else:
        r, nw, eps = norm
        y, h = torch.empty_like(x), torch.empty_like(x)
    MB, BE = next_power_of_2(M), ROUTER_BE      # E/BE programs of H/BH steps (1-2 at H=2048)
    BH = min(next_power_of_2(H), max(16, ROUTER_TILE // (MB * BE)))
    warps = ROUTER_WARPS or max(MB, 1 if H <= 2048 else 2)
    _router_route_kernel[(cdiv(E, BE),)](
        x, gate_weight, lg, w, ids, split_counters(x.device, 1), r, nw, x if y is None else y, x if h is None else h,
        M, E, H, x.stride(0), eps, TOPK=top_k, RENORM=bool(renorm), MB=MB, BE=BE, BH=BH,
        EB=next_power_of_2(E), KB=next_power_of_2(top_k), NORM=norm is not None, TB=max(MB, warps),
        num_warps=warps, **pdl.launch_kw(x))
    return w, ids, y, h


# moe_align: one program sorting the pairs in registers up to this many (token, expert) pairs,
# else count / scan / scatter launches over chunks. H100, CUDA graphs, E=128, top-8, BM 16, µs,
# sort vs chunked (moe_diag/session16_align_sort_h100.log): P=8 4.8 vs 12.4, 128 7.9 vs 13.7,
# 512 10.8 vs 18.3, 1024 13.5 vs 18.2; chunked P=8192 24.7, 32768 68.5
ALIGN_SORT_MAX_P = 1024


def align_bounds(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Upper bounds (from shapes only) of the aligned layout: (blocks, sorted slots).
    Each non-empty expert wastes at most block_m-1 slots, and at most min(E, P) are non-empty."""
    nb = cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    return nb, nb * block_m


def _align_ch(eb: int) -> int:
    """Pairs per [CH, EB] one-hot tile / store chunk of the align kernels (at most 16K int32)."""
    return max(16, min(128, 16384 // eb))


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Sort the M*k (token, expert) pairs by expert into blocks of block_m (stable: pair order kept
    inside an expert), on the device, with no host sync.

    -> (sorted_ids int32 [NB*block_m]: pair index t*k+j, or M*k for padding;
        block_expert int32 [NB]: expert of each block, -1 for unused blocks),
    NB = align_bounds(M*k, E, block_m)[0]."""
    P = topk_ids.numel()
    nb, smax = align_bounds(P, num_experts, block_m)
    dev = topk_ids.device
    sorted_ids = torch.empty(smax, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    kw = pdl.launch_kw(ids)
    if P <= ALIGN_SORT_MAX_P:
        EBS = next_power_of_2(num_experts + 1)     # + the padding lanes' bin
        _align_sort_kernel[(1,)](ids, sorted_ids, block_expert, P, num_experts, smax, nb, BM=block_m,
                                 PB=max(16, next_power_of_2(P)), EB=EBS, CH=_align_ch(EBS),
                                 num_warps=8, **kw)
        return sorted_ids, block_expert
    EB = next_power_of_2(max(num_experts, 2))
    CH = _align_ch(EB)
    nch = cdiv(P, CH)
    cc = torch.empty(nch, EB, dtype=torch.int32, device=dev)
    _align_count_kernel[(nch,)](ids, cc, sorted_ids, P, cdiv(smax, nch), smax, EB=EB, CH=CH, num_warps=8,
                                **kw)
    _align_scan_kernel[(1,)](cc, block_expert, num_experts, nch, nb, BM=block_m, EB=EB, CB=max(1, 8192 // EB), CH=CH,
                             num_warps=8, **kw)
    _align_scatter_kernel[(nch,)](ids, cc, sorted_ids, P, EB=EB, CH=CH, num_warps=8, **kw)
    return sorted_ids, block_expert


# ----------------------------------------------------------------------------------------------
# bucket description -> kernel slot

def _bucket_dims(b: dict, hidden: int, inter: int) -> tuple[int, int]:
    proj = b["proj"]
    return {"gate_up": (2 * inter, hidden), "gate": (inter, hidden), "up": (inter, hidden),
            "down": (hidden, inter)}[proj]


def _check_bucket(b: dict, i: int, hidden: int, inter: int) -> str:
    """Shape/dtype checks that need no device sync. Returns a name for messages."""
    where = f"bucket {i}"
    proj, layout = b.get("proj"), b.get("layout")
    if proj not in PROJ_CODE:
        raise FormatError(f"{where}: proj {proj!r}, expected one of {sorted(PROJ_CODE)}")
    if layout not in LAYOUT_CODE:
        raise FormatError(f"{where} ({proj}): layout {layout!r}, expected one of {sorted(LAYOUT_CODE)}")
    where = f"bucket {i} ({proj}, {layout} {b.get('params', {})})"
    t = b.get("tensors", {})
    req, opt = LAYOUT_TENSORS[layout]
    for name in req:
        if name not in t:
            raise FormatError(f"{where}: tensor {name!r} missing (has {sorted(t)})")
    for name in t:
        if name not in req and name not in opt:
            raise FormatError(f"{where}: unexpected tensor {name!r} for layout {layout}")
    emap = b.get("expert_map")
    if not isinstance(emap, Tensor) or emap.dim() != 1 or emap.dtype != torch.int32:
        raise FormatError(f"{where}: expert_map must be an int32 [E] tensor")
    N, K = _bucket_dims(b, hidden, inter)
    p = b.get("params", {})
    main = t[req[0]]
    Eb = main.shape[0]

    def shape(name, want, dtypes):
        x = t[name]
        if tuple(x.shape) != tuple(want):
            raise ShapeMismatch(f"{where}: {name} has shape {tuple(x.shape)}, expected {tuple(want)}")
        if x.dtype not in dtypes:
            raise ShapeMismatch(f"{where}: {name} has dtype {x.dtype}, expected one of {dtypes}")
        if not x.is_contiguous():
            raise ShapeMismatch(f"{where}: {name} must be contiguous (experts stacked along dim 0)")

    if layout == "dense":
        shape("weight", (Eb, N, K), (torch.bfloat16, torch.float16, torch.float32))
    elif layout == "fp8":
        bn, bk = _fp8_block(p, where)
        shape("weight", (Eb, N, K), (torch.float8_e4m3fn,))
        shape("scale", (Eb, cdiv(N, bn), cdiv(K, bk)), (torch.float32,))
        if _act(p, where) == 1 and bk % FP8_ACT_GROUP != 0 and bk < K:
            raise FormatError(f"{where}: fp8 w8a8 needs the weight block along K ({bk}) to be a multiple "
                              f"of the activation group {FP8_ACT_GROUP} (or to span K={K}); use act='w8a16'")
    elif layout == "intq":
        bits, G = _intq_params(p, K, where)
        pf = 32 // bits
        R = _stored_rows(t, K)   # > K for a padded act-order shard (rows reach x through perm)
        if R % pf or R < K:
            raise ShapeMismatch(f"{where}: {R} stored rows for K={K}: expected >= K and a multiple of "
                                f"{pf} ({bits}-bit packing)")
        shape("qweight", (Eb, R // pf, N), (torch.int32,))
        shape("scales", (Eb, cdiv(R, G), N), (torch.float16, torch.bfloat16, torch.float32))
        if "zeros" in t:
            shape("zeros", (Eb, cdiv(R, G), N), (torch.uint8,))
        if "perm" in t:
            shape("perm", (Eb, R), (torch.int32,))
    else:
        shape("weight", (Eb, N, K), (torch.int8,))
        shape("scale", (Eb, N, 1), (torch.float32,))
        if "zero" in t:
            shape("zero", (Eb, N, 1), (torch.float32,))
        _act(p, where)
    return where


def _fp8_block(p: dict, where: str) -> tuple[int, int]:
    blk = p.get("block")
    if blk is None or len(blk) != 2 or int(blk[0]) < 1 or int(blk[1]) < 1:
        raise FormatError(f"{where}: fp8 params need block=(bn, bk), got {blk!r}")
    return int(blk[0]), int(blk[1])


def _act(p: dict, where: str) -> int:
    act = p.get("act", "w8a16")
    if act not in ("w8a8", "w8a16"):
        raise FormatError(f"{where}: act {act!r}, expected 'w8a8' or 'w8a16'")
    return 1 if act == "w8a8" else 0


def _intq_params(p: dict, K: int, where: str) -> tuple[int, int]:
    bits = int(p.get("bits", 0))
    if bits not in (4, 8):
        raise FormatError(f"{where}: intq bits={bits} unsupported by the MoE kernels (4 or 8)")
    G = int(p.get("group_size", -1))
    G = K if G in (-1, 0) else G
    if G % (32 // bits):
        raise FormatError(f"{where}: group_size {G} must be a multiple of {32 // bits}")
    return bits, G


def _stored_rows(t: dict, K: int) -> int:
    return t["perm"].shape[-1] if "perm" in t else K


def _padded(b: dict, K: int) -> bool:
    """An act-order TP shard with padding rows (more stored rows than its input width K)."""
    return _stored_rows(b["tensors"], K) != K


def _pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _slot(b: dict, hidden: int, inter: int) -> tuple[tuple, tuple[int, int, int]]:
    """-> ((w, s, z, perm, expert_map, stored rows), (C, G, B) compile-time slot description).
    Unused pointer slots get the expert map (never read)."""
    t, p, layout = b["tensors"], b.get("params", {}), b["layout"]
    _, K = _bucket_dims(b, hidden, inter)
    emap = b["expert_map"]
    code = LAYOUT_CODE[layout] | PROJ_CODE[b["proj"]] << PROJ_SHIFT | CODE_IDENT * bool(b.get("identity"))
    G = B = 1
    rows = K
    if layout == "dense":
        ptrs = (t["weight"], emap, emap, emap)
    elif layout == "fp8":
        B, G = _fp8_block(p, "")
        code |= CODE_A8 * _act(p, "")
        ptrs = (t["weight"], t["scale"], emap, emap)
    elif layout == "intq":
        bits, G = _intq_params(p, K, "")
        rows = _stored_rows(t, K)
        code |= CODE_ZERO * ("zeros" in t) | CODE_PERM * ("perm" in t) | CODE_INT8 * (bits == 8)
        ptrs = (t["qweight"], t["scales"], t.get("zeros", emap), t.get("perm", emap))
    else:
        code |= CODE_A8 * _act(p, "") | CODE_ZERO * ("zero" in t)
        ptrs = (t["weight"], t["scale"], t.get("zero", emap), emap)
    return (*ptrs, emap, rows), (code, G, B)


def _layout_of(code: int) -> int:
    return code % 4              # bits 0-1


def _proj_of(code: int) -> int:
    return (code >> PROJ_SHIFT) & 3


def side_layouts(buckets: list[dict]) -> tuple[set, set]:
    """(gate/up layouts, down layouts) of a layer's buckets: what moe_configs.pick chooses by."""
    return ({b["layout"] for b in buckets if b["proj"] != "down"},
            {b["layout"] for b in buckets if b["proj"] == "down"})


def _fold(code: int, B: int, bn: int, inter: int) -> bool:
    """GEMV: the BN rows of every tile of this fp8 slot share one scale row (blocks of B rows;
    the up half of a stacked gate_up starts at row `inter`), so the kernel folds scales into x."""
    return B % bn == 0 and (_proj_of(code) != PROJ_CODE["gate_up"] or inter % bn == 0)


def _tile_ks(cfg: dict, slots: list[tuple[int, int, int]], gemv: bool, K: int) -> dict:
    """Per-layout K tiles for this launch, lowered where a slot's blocks need it."""
    bkf = cfg["BKF"]
    for code, G, B in slots:
        if code & CODE_FOLD:     # folded fp8 GEMV slot: the kernel splits a tile into SUB-wide slices
            continue
        if _layout_of(code) == _FP8:  # the tile must sit inside one weight block along K
            if code & CODE_A8:  # w8a8: inside one activation group too (any other slot's lowering stays)
                bkf = _pow2_divisor(FP8_ACT_GROUP, bkf) if gemv else min(bkf, FP8_ACT_GROUP)
            if G < K:
                bkf = min(bkf, _pow2_divisor(G, bkf))
    ks = dict(BKD=cfg["BKD"], BKF=max(bkf, 16 if not gemv else 1), BKQ=cfg["BKQ"], BKI=cfg["BKI"])
    if any(_layout_of(code) == _INTQ and code & CODE_INT8 for code, _, _ in slots):
        ks["BKQ"] = max(ks["BKQ"], 64)  # 8-bit: at least 16 words per tile
    return ks


def _chunk(rows: int, chunks: int, ks: dict) -> int:
    """K rows per chunk of a split launch: `chunks` chunks cover `rows`, each a multiple of every K
    tile of the launch and of the fp8 activation group (a tile never straddles two chunks)."""
    t = max(max(ks.values()), FP8_ACT_GROUP)
    return cdiv(cdiv(rows, chunks), t) * t


def _launch_args(grp: list[dict], cfg: dict, gemv: bool, K: int, hidden: int, inter: int, split: int,
                 chunks: int, tokens: int, permuted: bool = False):
    """One launch over the buckets `grp` (K: its input width): flat pointer args, constexpr kwargs
    (slot descriptions, K tiles, SPLIT; on the GEMV path fold bits and EVK), (K rows per chunk,)
    and the programs per output tile. permuted: the input comes from _permute_pairs (the slots'
    perm bits are cleared: their rows are read in K order)."""
    flat, consts, descs, q_rows = _slot_args(grp, hidden, inter, cfg["BN"] if gemv else 0)
    if permuted:
        consts = {n: v & ~CODE_PERM if n[0] == "C" else v for n, v in consts.items()}
    ks = _tile_ks(cfg, descs, gemv, K)
    kw = {**consts, **ks, "SPLIT": split}
    if gemv:
        kw["EVK"] = all(K % v == 0 for v in ks.values()) and all(r % ks["BKQ"] == 0 for r in q_rows)
        # int4 slots, fp8 W8A8 slots with folded scales, int8 W8A8 slots: the packed word loops (moe_configs)
        kw["F16"] = cfg.get("f16", False) and K % 4 == 0
        # int4 slots on the tensor cores (gemv_mma: unsplit launches; its tiles need the warp count,
        # and a lane's 2-4 columns one aligned vector: widths a multiple of 4)
        kw["MMA"] = cfg["num_warps"] if cfg.get("mma") and split == 1 and hidden % 4 == 0 and inter % 4 == 0 else 0
    else:   # dot rows with "mma" (BM 8) run every slot on gemv_mma's tiles: fused_moe checked _mma_dot_fits
        kw["MMA"] = cfg["num_warps"] if cfg.get("mma") else 0
    kw["GU"] = split == 1 and _gate_up_fused(descs, cfg, ks["BKQ"], gemv, tokens)
    return flat, kw, (_chunk(max([K] + q_rows), chunks, ks),), split


def _gate_up_fused(descs: list[tuple[int, int, int]], cfg: dict, bkq: int, gemv: bool, tokens: int) -> bool:
    """A launch whose slots are all gate_up weights may run gate and up in one K loop, each x
    tile loaded once for both and both halves' weights in flight together, where that measured
    faster. GEMV path (moe_triton._gemv_half's HALF 3, any layouts, mixed too): where the config
    row says "gu" (moe_configs). Dot path (_dot_gate_up): 16-row launches of int4 on the
    per-field tiles (groups a multiple of the K tile) always, of fp8 up to
    moe_configs.DOT_GATE_UP_FP8_MAX_M tokens; dot launches that mix layouts keep one loop per
    half: the fused int4 dot loop's registers (96 -> 128) slowed their fp8 programs. Dot path,
    H100, route + layer, µs, separate -> one loop (moe_diag/session16_gate_up_one_loop_h100.log):
    30B int4 M=16 120.0 -> 111.7, M=64 177.2 -> 164.3, 235B M=64 569.2 -> 523.8; gate/up int4 +
    fp8 down (perproj) M=64 202.2 -> 189.8."""
    if any(_proj_of(c) != PROJ_CODE["gate_up"] for c, _, _ in descs):
        return False
    if gemv:
        return cfg.get("gu", False)
    layouts = {_layout_of(c) for c, _, _ in descs}
    if cfg.get("mma"):
        return layouts <= _MMA_GU_LAYOUTS
    if cfg.get("BM") != 16:
        return False
    if layouts == {_INTQ}:     # 4-bit codes (bit 7 clear), every tile inside one group
        return bkq >= 128 and all(not c & CODE_INT8 and G % bkq == 0 for c, G, _ in descs)
    return layouts == {_FP8} and tokens <= moe_configs.DOT_GATE_UP_FP8_MAX_M


def _mma_dot_fits(side: list[dict], cfg: dict, K: int, M: int, x: Tensor, hidden: int, inter: int, up: bool) -> bool:
    """Whether a dot row with "mma" (BM 8: int4 slots on gemv_mma's tiles, the block's pairs as
    the mma's 8 B columns; other layouts on 16-row dots, 8 rows masked off) can run this side's
    buckets of input width K: every int4 one as intq.mma_takes has it for the tile's 16T columns
    (8T gate and 8T up rows where they run in one loop), act-order only where the input is
    permuted per pair, and widths a multiple of 4. Else fused_moe takes the BM-16 dot row."""
    if hidden % 4 or inter % 4:
        return False
    gu = (up and cfg.get("split", 1) == 1 and all(b["proj"] == "gate_up" for b in side)
          and {LAYOUT_CODE[b["layout"]] for b in side} <= _MMA_GU_LAYOUTS)     # as _gate_up_fused
    return _intq_mma_takes(side, K, M, x, inter, 2 * cfg["BN"] if gu else cfg["BN"])


def _apart(groups: list[list[dict]], cfg: dict, path: str, K: int, M: int, x: Tensor, hidden: int, inter: int,
           up: bool) -> list[tuple[int, list[dict], dict]]:
    """A side's launches, (group index, buckets, config), in order. On the dot path a config that
    names an "intq" row (moe_configs.pick: layers mixing int4 with other layouts) runs each
    group's int4 buckets in a launch of their own on that row (8-pair blocks on the tensor-core
    tiles) before the group's other buckets on the config itself, where the blocks can take
    them (_mma_dot_fits) and neither launch splits K (the down launches share buf's rows). On the
    gate/up side only gate_up buckets go apart: an expert's gate and up rows stay in one launch."""
    row = cfg.get("intq") if path == "dot" else None
    own = {n: v for n, v in cfg.items() if n != "intq"}
    runs = []
    for gi, grp in enumerate(groups):
        q, rest = [], []
        for b in grp:
            (q if b["layout"] == "intq" and (not up or b["proj"] == "gate_up") else rest).append(b)
        if (row is not None and q and rest and own.get("split", 1) == row.get("split", 1) == 1
                and _mma_dot_fits(q, row, K, M, x, hidden, inter, up)):
            runs += [(gi, q, row), (gi, rest, own)]
        else:
            runs.append((gi, grp, own))
    return runs


def _intq_mma_takes(side: list[dict], K: int, M: int, x: Tensor, inter: int, width: int) -> bool:
    """Whether every int4 bucket of a side of input width K can run gemv_mma's tiles of `width`
    columns (intq.mma_takes; act-order only where the input is permuted per pair)."""
    permuted = _pair_perms(side, K, M) is not None     # then the codes are read in K order
    for b in side:
        if b["layout"] != "intq":
            continue
        bits, G = _intq_params(b.get("params", {}), K, "")
        if not mma_takes(bits, G, "perm" in b["tensors"] and not permuted, x.dtype, inter, width):
            return False
    return True


def _slot_args(side: list[dict], hidden: int, inter: int, gemv_bn: int = 0):
    """Kernel arguments of up to MAX_SLOTS buckets: flat (pointers, stored rows) per slot (unused
    slots repeat slot 0; NS tells the kernel how many are real), constexpr descriptions, and the
    stored-row counts of the intq slots. gemv_bn: the BN of a GEMV launch, whose fp8 slots get
    the fold bit (8) where `_fold` allows it."""
    ptrs, descs = zip(*[_slot(b, hidden, inter) for b in side])
    if gemv_bn:
        descs = [(c | CODE_FOLD if _layout_of(c) == _FP8 and _fold(c, B, gemv_bn, inter) else c, G, B) for c, G, B in descs]
    consts, flat = {}, []
    for i in range(MAX_SLOTS):
        j = i if i < len(ptrs) else 0
        consts[f"C{i}"], consts[f"G{i}"], consts[f"B{i}"] = descs[j]
        flat.extend(ptrs[j])
    q_rows = [pt[5] for pt, d in zip(ptrs, descs) if _layout_of(d[0]) == _INTQ]
    return flat, consts, list(descs), q_rows


def _w8a8_kinds(side: list[dict]) -> tuple[bool, bool]:
    """(int8 W8A8, fp8 W8A8) present among these buckets: what their input must be quantized to."""
    w8a8 = [b["layout"] for b in side if b.get("params", {}).get("act") == "w8a8"]
    return "int8" in w8a8, "fp8" in w8a8


# ----------------------------------------------------------------------------------------------
# the fused MoE

# An act-order launch (intq buckets with perm) from this many tokens reads its input permuted per
# (token, expert) pair by one launch before it (_permute_pairs) instead of gathering x through perm
# in every program. H100, session 30, `bench-moe --configs int4_act` (GPTQ act-order experts), µs,
# gather -> permuted first, two runs each: 235B M=8 227.7 -> 211.3, M=16 513.7 -> 356.2, M=64 866.5
# -> 550.8, M=512 4507.5 -> 1449.9 (plain int4: 203.6 / 351.9 / 535.7 / 1364.6); 30B M=16 165.3 ->
# 120.4, M=512 1185.9 -> 432.1; 30B M=8 73.1 -> 72.6; below 8 the extra launch loses (30B M=1 21.5
# -> 25.9; 235B M=4 gains 130.4 -> 126.6). moe_diag/session30_moe_act_order_permute_*_h100.log.
PERMUTE_PAIRS_MIN_M = 8


def _pair_perms(grp: list[dict], K: int, M: int) -> list[tuple[Tensor, Tensor]] | None:
    """(perm, expert_map) of the act-order buckets of one launch of M tokens, if its input is to be
    permuted per pair first: from PERMUTE_PAIRS_MIN_M tokens, when each such bucket holds whole
    projections (gate_up or down: one perm per expert and side) and K stored rows (a padded TP
    shard keeps the gather). None: fewer tokens, no act-order bucket, or one that cannot."""
    if M < PERMUTE_PAIRS_MIN_M:
        return None
    perms = [b for b in grp if b["layout"] == "intq" and "perm" in b["tensors"]]
    if not perms or any(b["proj"] not in ("gate_up", "down") or _padded(b, K) for b in perms):
        return None
    return [(b["tensors"]["perm"], b["expert_map"]) for b in perms]


def _permute_pairs(src: Tensor, ids: Tensor, perms: list[tuple[Tensor, Tensor]], div: int) -> Tensor:
    """[P, K]: row p is src[p // div] in the act-order of pair p's expert (ids [P]) where one of
    `perms` holds it, else in K order."""
    P, K = ids.numel(), src.shape[1]
    dst = torch.empty(P, K, dtype=src.dtype, device=src.device)
    args, has = [], {}
    for i in range(MAX_SLOTS):
        pm, mp = perms[i] if i < len(perms) else perms[0]
        args += [pm, mp, K]
        has[f"H{i}"] = i < len(perms)
    BK = min(1024, next_power_of_2(K))
    _permute_pairs_kernel[(P, cdiv(K, BK))](src, dst, ids, K, *args, **has, DIV=div, BK=BK, num_warps=4)
    return dst


def fused_moe(x: Tensor, topk_ids: Tensor, topk_w: Tensor, buckets: list[dict], inter: int,
              *, one_launch: bool = True, config: tuple[str, dict, dict] | None = None,
              up_groups: list[list[int]] | None = None, up_x: list[Tensor] | None = None) -> Tensor:
    """y[m] = sum_j topk_w[m, j] * down_e(silu(gate_e x[m]) * up_e x[m]), e = topk_ids[m, j].

    x [M, H] bf16/fp16; topk_ids [M, k] int32; topk_w [M, k] fp32 (as route() returns them);
    buckets: see the module docstring; inter: I (moe_intermediate_size). Returns [M, H] in x.dtype.
    `one_launch=False` launches each bucket separately (kept to measure that alternative);
    `config` (path, up config, down config) or (up path, up config, down path, down config)
    overrides moe_configs.pick (benchmark sweeps). More than MAX_SLOTS gate/up
    buckets take several gate/up launches: pass `up_groups=up_launches(buckets)` (computed once;
    computing it here syncs with the host, which a CUDA graph capture refuses). `up_x`: per
    gate/up launch, the input its experts read (x with a folded-norm correction applied; default x)."""
    if x.dim() != 2:
        raise ShapeMismatch(f"fused_moe: x must be [M, H], got {tuple(x.shape)}")
    M, H = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M or tuple(topk_w.shape) != tuple(topk_ids.shape):
        raise ShapeMismatch(f"fused_moe: topk_ids {tuple(topk_ids.shape)} / topk_w {tuple(topk_w.shape)} "
                            f"must both be [M={M}, k]")
    k = topk_ids.shape[1]
    up_side = [b for b in buckets if b.get("proj") != "down"]
    down_side = [b for b in buckets if b.get("proj") == "down"]
    for i, b in enumerate(buckets):
        _check_bucket(b, i, H, inter)
    if not up_side or not down_side:
        raise FormatError(f"fused_moe: need gate/up and down buckets, got projs {[b['proj'] for b in buckets]}")
    E = up_side[0]["expert_map"].shape[0]
    for b in buckets:
        if b["expert_map"].shape[0] != E:
            raise ShapeMismatch(f"fused_moe: expert_map sizes differ ({b['expert_map'].shape[0]} vs {E})")
    if not _triton_ok(x):
        return moe_reference(x, topk_ids, topk_w, buckets, inter).to(x.dtype)
    if x.dtype not in MOE_ACT_DTYPES:
        raise FormatError(f"fused_moe: x dtype {x.dtype}; the kernels take bf16 or fp16 activations")
    if not one_launch and any(b["proj"] != "gate_up" for b in up_side):
        raise FormatError("fused_moe(one_launch=False) needs gate and up fused in gate_up buckets")
    if takes_grouped(buckets, x, inter, M, config, one_launch, up_x):
        return grouped_moe(x, topk_ids, topk_w, buckets, inter)
    x = x.contiguous()
    ids = topk_ids if (topk_ids.dtype == torch.int32 and topk_ids.is_contiguous()) else \
        topk_ids.to(torch.int32).contiguous()
    rw = topk_w if (topk_w.dtype == torch.float32 and topk_w.is_contiguous()) else topk_w.float().contiguous()
    P = M * k
    out = torch.empty(M, H, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if config:
        path_up, cu, path_dn, cd = moe_configs.sides(config)
    else:   # can each side's int4 slots run GEMV tiles of 32 columns (what "mma" rows need: pick)
        fits = H % 4 == 0 and inter % 4 == 0
        mma = tuple(fits and _intq_mma_takes(s, K, M, x, inter, 32) for s, K in ((up_side, H), (down_side, inter)))
        path_up, cu, path_dn, cd = moe_configs.pick(M, *side_layouts(buckets), hidden=H, mma=mma)
    if path_up == "dot" and cu.get("mma") and not _mma_dot_fits(up_side, cu, H, M, x, H, inter, True):
        cu = moe_configs.DOT[0][1]
    if path_dn == "dot" and cd.get("mma") and not _mma_dot_fits(down_side, cd, inter, M, x, H, inter, False):
        cd = moe_configs.DOT[0][1]
    if not one_launch:
        groups = [[b] for b in up_side]
    elif up_groups is not None:
        groups = [[buckets[i] for i in g] for g in up_groups]
    elif len(up_side) <= MAX_SLOTS:
        groups = [up_side]
    else:
        groups = [[buckets[i] for i in g] for g in up_launches(buckets)]
    xs = [t.contiguous() for t in up_x] if up_x is not None else [x] * len(groups)
    if len(xs) != len(groups) or any(t.shape != x.shape or t.dtype != x.dtype for t in xs):
        raise ShapeMismatch(f"fused_moe: up_x must hold {len(groups)} tensors like x {tuple(x.shape)}")
    down_groups = ([down_side[i:i + MAX_SLOTS] for i in range(0, len(down_side), MAX_SLOTS)]
                   if one_launch else [[b] for b in down_side])
    # the launches of each side: (group, buckets, config); int4 buckets may run apart (_apart)
    up_runs = _apart(groups, cu, path_up, H, M, x, H, inter, True)
    dn_runs = _apart(down_groups, cd, path_dn, inter, M, x, H, inter, False)
    cu, cd = up_runs[-1][2], dn_runs[-1][2]     # the side's own config (the "intq" row dropped)
    act = torch.empty(P, inter, dtype=x.dtype, device=x.device)
    nt_down = cdiv(H, cd["BN"])      # the last down launch sums each token's rows per tile of cd
    cnt = torch.empty(M * nt_down, dtype=torch.int32, device=x.device)
    # split: programs per output tile, along (gate/up half, K chunk) on the GEMV path, along K
    # chunks on the dot path (moe_triton)
    split_up, split_dn = cu.get("split", 1), cd.get("split", 1)
    if path_up == "gemv" and split_up > 1 and split_up % 2:
        raise FormatError(f"fused_moe: gate/up GEMV split {split_up} must be 1 or even (two halves)")
    chunks_up = max(split_up // 2, 1) if path_up == "gemv" else split_up
    buf_dtype = torch.float32 if P * split_dn <= 1024 else x.dtype
    alloc = torch.empty if len(dn_runs) == 1 else torch.zeros
    buf = alloc(P * split_dn, H, dtype=buf_dtype, device=x.device)
    # gate and up partials of each K chunk (moe_triton._join_gate_up)
    ws_up = torch.empty(P, 2 * chunks_up, inter, dtype=torch.float32, device=x.device) if split_up > 1 else rw
    # up tile counters: per (pair, tile) on the GEMV path, per (block, tile) on the dot path
    # (at most P + E blocks: moe_align)
    ucnt = (split_counters(x.device, (P + E) * cdiv(inter, cu["BN"])) if split_up > 1 else cnt)

    aligned: dict[int, tuple[Tensor, Tensor]] = {}

    def side(path_s: str, mode: int, cfg: dict):
        """-> (kernel, grid dim 0, leading args, shape kwargs) of one launch on its path; the two
        paths read and write act / buf / counters by pair index, so the sides (and the launches
        of a side) may differ."""
        n_cnt = cnt.numel()
        if path_s == "gemv":    # 15: the 4-bit code mask as a run-time value (see gemv_tiles.gemv_intq_cols)
            lead = ((ids, rw, act, out, cnt, ws_up, ucnt, H, inter, H, n_cnt, 15) if mode == 0 else
                    (ids, rw, buf, out, cnt, rw, cnt, inter, inter, H, n_cnt, 15))
            return _moe_gemv_kernel, P, lead, {}
        BM = cfg["BM"]
        if BM not in aligned:
            aligned[BM] = moe_align(ids, E, BM)
        sorted_ids, blk = aligned[BM]
        lead = ((sorted_ids, blk, rw, act, out, cnt, ws_up, ucnt, P, H, inter, H, n_cnt) if mode == 0 else
                (sorted_ids, blk, rw, buf, out, cnt, rw, cnt, P, inter, inter, H, n_cnt))
        return _moe_dot_kernel, blk.numel(), lead, {"BM": BM}

    # W8A8 codes of each gate/up input, quantized once (not per program, nor per launch when the
    # launches share x)
    if up_x is None:
        q_ups = [act_quant(x, *_w8a8_kinds(up_side))] * len(groups)
    else:
        q_ups = [act_quant(xg, *_w8a8_kinds(grp)) for grp, xg in zip(groups, xs)]
    for gi, grp, cfg in up_runs:
        kern, g0, lead_up, shape_kw = side(path_up, 0, cfg)
        xg = xs[gi]
        perms = _pair_perms(grp, H, M)
        if perms is not None:
            xg = _permute_pairs(xg, ids, perms, k)
        split = cfg.get("split", 1)
        flat, kw, k_per, nz = _launch_args(grp, cfg, path_up == "gemv", H, H, inter, split,
                                           chunks_up if split > 1 else 1, M, perms is not None)
        kern[(g0, cdiv(inter, cfg["BN"]), nz)](
            xg, *q_ups[gi], *lead_up, *k_per, *flat, **kw, **shape_kw, NS=len(grp), MODE=0, TOPK=k, BN=cfg["BN"],
            SUM=False, ZMISS=False, XPAIR=perms is not None, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **_reg_cap(cfg), **pdl.launch_kw(x))
    q_dn = act_quant(act, *_w8a8_kinds(down_side))
    for ri, (_, grp, cfg) in enumerate(dn_runs):
        kern, g0, lead_dn, shape_kw = side(path_dn, 1, cfg)
        perms = _pair_perms(grp, inter, M)
        a_in = act if perms is None else _permute_pairs(act, ids, perms, 1)
        split = cfg.get("split", 1)
        flat, kw, k_per, nz = _launch_args(grp, cfg, path_dn == "gemv", inter, H, inter, split, split, M,
                                           perms is not None)
        kern[(g0, cdiv(H, cfg["BN"]), nz)](
            a_in, *q_dn, *lead_dn, *k_per, *flat, **kw, **shape_kw, NS=len(grp), MODE=1, TOPK=k, BN=cfg["BN"],
            SUM=ri == len(dn_runs) - 1, ZMISS=len(dn_runs) == 1,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_reg_cap(cfg), **pdl.launch_kw(x))
    return out


def _reg_cap(c: dict) -> dict:
    # a config's optional "maxnreg" (ptxas's register limit per thread): more programs resident per
    # SM at the price of spills; the 30B's 64-token int4 launches are latency-bound at 128
    # registers, 16 one-warp programs per SM (session 38, ncu). No library row sets it: 96 on the
    # one-warp int4 blocks spills and measured slower at all 8 points (H200, session 39).
    return {"maxnreg": c["maxnreg"]} if c.get("maxnreg") else {}


def _zero_copy(buckets: list[dict], x: Tensor) -> bool:
    # one gate_up and one dense down bucket in x's dtype sharing one expert map object (layers/moe.py
    # shares equal maps; comparing values here would sync with the host): multiplied in place
    return (len(buckets) == 2 and {b["proj"] for b in buckets} == {"gate_up", "down"}
            and all(b["layout"] == "dense" and b["tensors"]["weight"].dtype == x.dtype for b in buckets)
            and buckets[0]["expert_map"] is buckets[1]["expert_map"])


def takes_grouped(buckets: list[dict], x: Tensor, inter: int, M: int, config=None, one_launch: bool = True,
                  up_x: list[Tensor] | None = None) -> bool:
    """Whether fused_moe with these arguments runs grouped_moe: no launch config forced, one launch
    per side, every gate/up launch reading x itself, and grouped_fits."""
    return (config is None and one_launch and (up_x is None or all(t is x for t in up_x))
            and grouped_fits(buckets, x, inter, M))


def grouped_fits(buckets: list[dict], x: Tensor, inter: int, M: int) -> bool:
    """Whether fused_moe runs M tokens of this layer as grouped_moe: bf16 activations on CUDA
    (torch._grouped_mm's), and either the layer's experts are all dense in x's dtype (from
    moe_configs.GROUPED_MIN_M tokens, weights used in place) or every bucket is dense or intq
    (act-order: not a padded TP shard) and the layer's dequantized stacks fit
    moe_configs.GROUPED_STACK_MAX_BYTES (from GROUPED_DEQUANT_MIN_M tokens)."""
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    if _zero_copy(buckets, x):
        return M >= moe_configs.GROUPED_MIN_M
    E = buckets[0]["expert_map"].shape[0]
    stack = 3 * E * x.shape[1] * inter * x.element_size()
    return (M >= moe_configs.GROUPED_DEQUANT_MIN_M and stack <= moe_configs.GROUPED_STACK_MAX_BYTES
            and all(b["layout"] == "dense"
                    or (b["layout"] == "intq" and not _padded(b, _bucket_dims(b, x.shape[1], inter)[1]))
                    for b in buckets))


def _expert_stacks(buckets: list[dict], E: int, H: int, inter: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Every bucket dequantized into `dtype`, by global expert: (w13 [E, H, 2I] (gate columns, then
    up), w2 [E, I, H], map [E] int32: e where expert e is held here, else -1). Transient (the
    weights stay packed); rows of experts held nowhere stay unwritten and are never read."""
    dev = buckets[0]["expert_map"].device
    w13 = torch.empty(E, H, 2 * inter, dtype=dtype, device=dev)
    w2 = torch.empty(E, inter, H, dtype=dtype, device=dev)
    held = torch.zeros(E, dtype=torch.bool, device=dev)
    every = torch.arange(E, device=dev)
    for b in buckets:
        t, emap = b["tensors"], b["expert_map"]
        N, K = _bucket_dims(b, H, inter)
        nb = (t["weight"] if b["layout"] == "dense" else t["qweight"]).shape[0]
        # slot -> global expert (experts held elsewhere all land on the dropped slot nb)
        inv = torch.zeros(nb + 1, dtype=torch.int64, device=dev).scatter_(
            0, torch.where(emap >= 0, emap, nb).long(), every)[:nb]
        c0 = inter if b["proj"] == "up" else 0
        dst = (w2 if b["proj"] == "down" else w13)[:, :, c0:c0 + N]
        if b["layout"] == "dense":
            dst.index_copy_(0, inv, t["weight"].transpose(1, 2).to(dtype))
        else:
            bits, G = _intq_params(b.get("params", {}), K, "")
            s = t["scales"]
            _intq_stack_kernel[(cdiv(K // (32 // bits), 16), cdiv(N, 128), nb)](
                t["qweight"], s, t.get("zeros", s), t.get("perm", inv), dst, inv, N, K, G, t["qweight"].stride(0),
                s.stride(0), dst.stride(0), dst.stride(1), BITS=bits, HAS_ZERO="zeros" in t, HAS_PERM="perm" in t,
                BLOCK_R=16, BLOCK_N=128, num_warps=4)
        if b["proj"] == "down":
            held |= emap >= 0
    return w13, w2, torch.where(held, every, -1).to(torch.int32)


def grouped_moe(x: Tensor, topk_ids: Tensor, topk_w: Tensor, buckets: list[dict], inter: int) -> Tensor:
    """fused_moe by two torch._grouped_mm (cuBLAS grouped GEMMs), which many tokens run faster than
    the Triton dot path (grouped_fits, moe_configs): the weights of an all-bf16 layer in place,
    else every bucket dequantized into bf16 stacks by global expert (_expert_stacks); the (token,
    expert) pairs sorted by stack row on the device, gate_up, silu(gate) * up (fp32, rounded once),
    down, then each token's k rows weighted and summed in fixed order (fp32, deterministic, rounded
    once), as the fused kernels do. Pairs whose expert is not held here (expert parallel) add zero.
    No host sync (CUDA-graph capturable)."""
    M, H = x.shape
    k = topk_ids.shape[1]
    P = M * k
    if _zero_copy(buckets, x):
        gu, dn = sorted(buckets, key=lambda b: b["proj"] == "down")
        w13, w2 = gu["tensors"]["weight"].transpose(1, 2), dn["tensors"]["weight"].transpose(1, 2)
        emap = gu["expert_map"]
    else:
        w13, w2, emap = _expert_stacks(buckets, buckets[0]["expert_map"].shape[0], H, inter, x.dtype)
    nb = w13.shape[0]                                                # w13 [nb, H, 2I], w2 [nb, I, H]
    slot = emap[topk_ids.reshape(-1).long()].long()                 # [P], -1: not held here
    key = torch.where(slot < 0, nb, slot)                            # absent pairs sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(nb + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:nb], 0, dtype=torch.int32)           # rows past offs[-1] stay unwritten
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(P, device=x.device))
    pos = torch.where(slot < 0, -1, pos)                             # pair -> its row in sorted order
    h = torch._grouped_mm(x[order // k], w13, offs=offs)                             # [P, 2I]
    a = torch.empty(P, inter, dtype=x.dtype, device=x.device)
    _silu_mul_kernel[(P, cdiv(inter, 1024))](h, a, offs[-1:], inter, BI=1024, num_warps=4)
    d = torch._grouped_mm(a, w2, offs=offs)                                          # [P, H]
    out = torch.empty_like(x)
    _token_sum_kernel[(M, cdiv(H, 1024))](d, pos, topk_w.float().contiguous(), out, H, TOPK=k,
                                                 BH=1024, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# the spec: pure-torch dequant and a per-token per-expert loop

def dequant_expert(b: dict, loc: int, n: int, k: int) -> Tensor:
    """Expert `loc` of bucket `b` -> float32 W [n, k] (original input order), from the layout spec
    of formats/base.py, written out independently of the kernels."""
    t, p, layout = b["tensors"], b.get("params", {}), b["layout"]
    if layout == "dense":
        return t["weight"][loc].float()
    if layout == "fp8":
        bn, bk = _fp8_block(p, "")
        s = t["scale"][loc].float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return t["weight"][loc].float() * s
    if layout == "int8":
        W = t["weight"][loc].float()
        if "zero" in t:
            W = W - t["zero"][loc].float()
        return W * t["scale"][loc].float()
    bits, G = _intq_params(p, k, "")
    pf = 32 // bits
    R = _stored_rows(t, k)
    qw = t["qweight"][loc]                                               # [R/pf, n]
    shifts = (torch.arange(R, device=qw.device) % pf * bits).view(R, 1)
    q = (qw.repeat_interleave(pf, 0) >> shifts) & ((1 << bits) - 1)      # [R, n] codes of stored rows
    g = torch.arange(R, device=qw.device) // G
    z = t["zeros"][loc].float()[g] if "zeros" in t else float(1 << (bits - 1))
    W = (t["scales"][loc].float()[g] * (q.float() - z)).t().contiguous()  # [n, R] stored order
    if "perm" not in t:
        return W
    # stored row j multiplies input perm[j]; padding rows (R > k) are exact zeros, so summing is exact
    return torch.zeros(n, k, device=W.device).index_add_(1, t["perm"][loc].long(), W)


def quant_act(v: Tensor, layout: str, params: dict) -> Tensor:
    """The activation as the kernel sees it (fp32): W8A8 fp8 quantizes per token per 128 inputs
    to e4m3, W8A8 int8 per token to int8 (round half to even; exact divisions); others pass through."""
    act = params.get("act", "w8a16")
    if act != "w8a8" or layout not in ("fp8", "int8"):
        return v
    if layout == "fp8":
        return fp8_act_reference(v, FP8_ACT_GROUP)
    q, a = int8_act_quant_reference(v)
    return q.float() * a


def moe_reference(x: Tensor, topk_ids: Tensor, topk_w: Tensor, buckets: list[dict], inter: int) -> Tensor:
    """Plain per-token per-expert loop in fp32 -> [M, H] float32. The intermediate silu(g)*u is
    rounded to x.dtype, as the kernels store it."""
    M, H = x.shape
    maps = [b["expert_map"].tolist() for b in buckets]
    cache: dict[tuple[str, int], tuple[Tensor, dict]] = {}

    def weight(half: str, e: int) -> tuple[Tensor, dict]:
        key = (half, e)
        if key not in cache:
            hits = [i for i, b in enumerate(buckets) if b["proj"] in HALF_PROJS[half] and maps[i][e] >= 0]
            if len(hits) != 1:
                raise FormatError(f"moe_reference: expert {e} {half} rows found in {len(hits)} buckets, expected 1")
            b = buckets[hits[0]]
            n, k = _bucket_dims(b, H, inter)
            W = dequant_expert(b, maps[hits[0]][e], n, k)
            if b["proj"] == "gate_up":
                W = W[:inter] if half == "gate" else W[inter:]
            cache[key] = (W, b)
        return cache[key]

    def lin(v: Tensor, half: str, e: int) -> Tensor:
        W, b = weight(half, e)
        return W @ quant_act(v, b["layout"], b.get("params", {}))

    xf = x.float()
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    ids = topk_ids.tolist()
    for m in range(M):
        for j, e in enumerate(ids[m]):
            g, u = lin(xf[m], "gate", e), lin(xf[m], "up", e)
            a = (F.silu(g) * u).to(x.dtype).float()
            out[m] += float(topk_w[m, j]) * lin(a, "down", e)
    return out


def validate_buckets(buckets: list[dict], num_experts: int, hidden: int, inter: int) -> None:
    """Full check of a layer's buckets (reads expert maps: host sync, call once at load time):
    shapes/dtypes, and every expert's gate, up and down rows in exactly one bucket each."""
    for i, b in enumerate(buckets):
        where = _check_bucket(b, i, hidden, inter)
        emap = b["expert_map"]
        if emap.shape[0] != num_experts:
            raise ShapeMismatch(f"{where}: expert_map has {emap.shape[0]} entries, expected {num_experts}")
        Eb = b["tensors"][LAYOUT_TENSORS[b["layout"]][0][0]].shape[0]
        loc = emap[emap >= 0].tolist()
        if sorted(loc) != list(range(Eb)):
            raise FormatError(f"{where}: expert_map's local indices {sorted(loc)[:8]}... must be a "
                              f"permutation of 0..{Eb - 1} (the stacked experts)")
        if b.get("identity") and emap.tolist() != list(range(num_experts)):
            raise FormatError(f"{where}: marked identity but its expert_map is not 0..{num_experts - 1}")
    for half in HALF_PROJS:
        cover = half_cover(buckets, half, num_experts)
        bad = [e for e, c in enumerate(cover.tolist()) if c != 1]
        if bad:
            raise FormatError(f"MoE buckets: {half} rows of experts {bad[:8]} are in "
                              f"{[cover[e].item() for e in bad[:8]]} buckets, expected exactly 1")
    up_launches(buckets)  # raises when gate/up buckets cannot be split into launches of <= MAX_SLOTS


def half_cover(buckets: list[dict], half: str, num_experts: int) -> Tensor:
    """int64 [E] on the CPU: how many of `buckets` hold each expert's `half` rows (gate/up/down)."""
    cover = torch.zeros(num_experts, dtype=torch.int64)
    for b in buckets:
        if b["proj"] in HALF_PROJS[half]:
            cover += (b["expert_map"].cpu() >= 0).long()
    return cover


def up_launches(buckets: list[dict]) -> list[list[int]]:
    """Split the gate/up buckets (indices into `buckets`) into launches of <= MAX_SLOTS such that
    each expert's gate and up rows are served by one launch (it computes silu(gate) * up).
    Reads expert maps (host sync): compute once per layer and pass to fused_moe(up_groups=)."""
    up = [i for i, b in enumerate(buckets) if b.get("proj") != "down"]
    if len(up) <= MAX_SLOTS:
        return [up]
    parent = {i: i for i in up}

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i
    gate = {}
    for i in up:
        if buckets[i]["proj"] in HALF_PROJS["gate"]:
            for e in (buckets[i]["expert_map"] >= 0).nonzero().flatten().tolist():
                gate[e] = i
    for i in up:
        if buckets[i]["proj"] == "up":
            for e in (buckets[i]["expert_map"] >= 0).nonzero().flatten().tolist():
                if e in gate:
                    parent[find(i)] = find(gate[e])
    comps: dict[int, list[int]] = {}
    for i in up:
        comps.setdefault(find(i), []).append(i)
    launches: list[list[int]] = []
    for comp in sorted(comps.values(), key=len, reverse=True):   # first-fit decreasing
        if len(comp) > MAX_SLOTS:
            raise FormatError(f"MoE buckets: gate/up buckets {comp} are linked by experts whose gate and up "
                              f"are in different buckets; one launch serves at most {MAX_SLOTS}")
        for launch in launches:
            if len(launch) + len(comp) <= MAX_SLOTS:
                launch.extend(comp)
                break
        else:
            launches.append(list(comp))
    return [sorted(launch) for launch in launches]

