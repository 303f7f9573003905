"""Benchmark of the mixed-format fused MoE layer (`python -m mixprec bench-moe`, scripts/bench_moe.py).

Per (shape, configuration, tokens M): time of route() + fused_moe() per MoE layer, effective GB/s
over the bytes of the distinct experts the routing touches, % of the device copy bandwidth
(1 GiB copy_, read + write, measured in the same run); the bf16 baseline torch._grouped_mm with
its routing / permutation; for mixed layers the bytes-weighted time of their uniform parts.
Weights are cold: every timed CUDA graph replays the layer over enough distinct copies
(>= --min-mb of touched bytes) that the 50 MB L2 cannot hold them.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import moe, moe_configs, timing
from . import moe_testing as mt

DEVICE = "cuda"
SHAPES = {"30b": dict(E=128, k=8, H=2048, I=768), "235b": dict(E=128, k=8, H=4096, I=1536)}
CONFIGS = {  # name -> per-expert (gate, up, down) specs, given E
    "bf16": lambda E: mt.uniform("bf16", E),
    "fp8": lambda E: mt.uniform("fp8", E),
    "int4": lambda E: mt.uniform("int4", E),
    "int8": lambda E: mt.uniform("int8", E),
    "int4+fp8": lambda E: mt.split(["int4", "fp8"], E, seed=1),
    "int4+fp8+bf16": lambda E: mt.split(["int4", "fp8", "bf16"], E, seed=2),
    "perproj": lambda E: [("int4", "int4", "fp8")] * E,
    # not in the default run (--configs names them):
    "int4_g32": lambda E: mt.uniform("int4_g32", E),
    # GPTQ act-order experts (desc_act): every GEMV / dot program gathers x through its expert's perm
    "int4_act": lambda E: mt.uniform("int4_perm", E),
    # the runtime's "mixed" preset (runtime/synthetic.py): experts 0-63 int4, then fp8 gate/up +
    # bf16 down, then int8 + fp8 down
    "rt_mixed": lambda E: ([("int4",) * 3] * (E // 2) + [("fp8", "fp8", "bf16")] * (E // 4)
                           + [("int8", "int8", "fp8")] * (E - E // 2 - E // 4)),
}
DEFAULT_CONFIGS = [c for c in CONFIGS if c not in ("int4_g32", "int4_act", "rt_mixed")]
UNIFORM_OF = {"dense": "bf16", "fp8": "fp8", "intq": "int4", "int8": "int8"}

# candidates for --sweep
# gate and up in one K loop (moe._gate_up_fused; `gu`), a tile of 2 BN rows per program: the
# session-16 intq choices (GEMV_M1 30B, GEMV_LAYOUT intq), the halved-BN variant measured with them,
# and session-17 batch-1 candidates for the other layouts (BN 4-16: the fused tile's rows as many
# as the two-loop winners' BN 8-32)
GEMV_GU_CANDIDATES = [
    dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True),
    dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1, gu=True),
    dict(BN=8, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, gu=True),
    dict(BN=4, BKD=256, BKF=256, BKQ=512, BKI=256, num_warps=1, num_stages=1, gu=True),
    dict(BN=4, BKD=256, BKF=256, BKQ=512, BKI=256, num_warps=2, num_stages=1, gu=True),
    dict(BN=4, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=2, num_stages=1, gu=True),
    dict(BN=4, BKD=512, BKF=512, BKQ=1024, BKI=512, num_warps=4, num_stages=1, gu=True),
    dict(BN=8, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1, gu=True),
    dict(BN=8, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=4, num_stages=1, gu=True),
    dict(BN=8, BKD=256, BKF=256, BKQ=512, BKI=256, num_warps=2, num_stages=1, gu=True),
    dict(BN=16, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1, gu=True),
    dict(BN=16, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=8, num_stages=1, gu=True),
    # 8-row programs over whole 1-2k K ranges: the dense fp8 / int8 batch-1 winners of session 20
    # (30B o_proj 7.8 -> 6.3 µs); not yet swept here
    dict(BN=8, BKD=512, BKF=1024, BKQ=1024, BKI=512, num_warps=4, num_stages=1, gu=True),
    dict(BN=8, BKD=1024, BKF=2048, BKQ=2048, BKI=1024, num_warps=8, num_stages=1, gu=True),
]
GEMV_CANDIDATES = [
    dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1),   # the default
    dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1),
    dict(BN=64, BKD=64, BKF=64, BKQ=128, BKI=64, num_warps=4, num_stages=1),
    dict(BN=32, BKD=64, BKF=64, BKQ=256, BKI=64, num_warps=4, num_stages=1),    # fewer fp8 registers
    dict(BN=16, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=2, num_stages=1),   # twice the programs
    dict(BN=64, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=8, num_stages=1),   # more bytes per program
    # wider K tiles (fp8 folds its block scales into x): more bytes in flight per step
    dict(BN=32, BKD=128, BKF=256, BKQ=512, BKI=256, num_warps=4, num_stages=1),
    dict(BN=32, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=8, num_stages=1),
    dict(BN=16, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=4, num_stages=1),
    dict(BN=64, BKD=128, BKF=256, BKQ=128, BKI=128, num_warps=8, num_stages=1),
    dict(BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1),
    dict(BN=16, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1),
    # several programs per output tile (gate / up halves, K chunks): more loads in flight at M=1
    dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1, split=2),
    dict(BN=32, BKD=128, BKF=128, BKQ=256, BKI=128, num_warps=4, num_stages=1, split=4),
    dict(BN=16, BKD=128, BKF=128, BKQ=512, BKI=128, num_warps=4, num_stages=1, split=2),
    dict(BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=1, split=4),
    dict(BN=64, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, split=8),
    dict(BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, split=8),
    # more warps per SM at decode (ncu, session 6: the M=1 int4 up launch had 6 warps per SM, 0.27
    # instructions issued per cycle per scheduler): smaller tiles, more warps per program. The
    # batch-1 fp8 / bf16 winners (moe_configs.GEMV_M1) came from here; int4 gained nothing.
    dict(BN=32, BKD=64, BKF=128, BKQ=256, BKI=128, num_warps=8, num_stages=1),
    dict(BN=16, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=8, num_stages=1),
    dict(BN=32, BKD=128, BKF=256, BKQ=512, BKI=256, num_warps=8, num_stages=1),
    dict(BN=16, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=8, num_stages=1),
    dict(BN=32, BKD=256, BKF=512, BKQ=1024, BKI=256, num_warps=16, num_stages=1),
    dict(BN=8, BKD=256, BKF=512, BKQ=512, BKI=256, num_warps=4, num_stages=1),
    dict(BN=8, BKD=128, BKF=256, BKQ=256, BKI=128, num_warps=2, num_stages=1),
    dict(BN=8, BKD=256, BKF=512, BKQ=1024, BKI=256, num_warps=8, num_stages=1),
    dict(BN=16, BKD=128, BKF=256, BKQ=512, BKI=128, num_warps=8, num_stages=1, split=2),
    dict(BN=32, BKD=128, BKF=256, BKQ=512, BKI=128, num_warps=8, num_stages=1, split=4),
    dict(BN=8, BKD=512, BKF=1024, BKQ=1024, BKI=512, num_warps=4, num_stages=1),   # session 20, as above
    dict(BN=8, BKD=1024, BKF=2048, BKQ=2048, BKI=1024, num_warps=8, num_stages=1),
    *GEMV_GU_CANDIDATES,
]
LAYOUT_OF = {"int4": "intq", "fp8": "fp8", "bf16": "dense"}   # swept configuration -> its layout
SWEPT = tuple(LAYOUT_OF)                                       # the uniform layers a sweep times
SWEEP_GEMV_M = [1, 2, 4, 8, 16]
SWEEP_DOT_M = [8, 16, 32, 64, 128, 512]
DOT_CANDIDATES = [
    dict(BM=16, BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3),
    dict(BM=16, BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=3),
    dict(BM=32, BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3),
    dict(BM=64, BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=8, num_stages=3),
    dict(BM=16, BN=128, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=8, num_stages=3),
    dict(BM=32, BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=4),
]


def log(*a):
    print(*a, flush=True)


def copy_bandwidth() -> float:
    return timing.copy_bandwidth_gbps(device=DEVICE)


time_graph = timing.graph_us


def time_configs(layers, x, logits, k: int, inter: int, confs: dict, rounds: int, label: str = ""):
    """route + fused_moe over `layers` (cold copies of one layer; x [M, H], router logits [M, E])
    under each named launch config of `confs` (None: moe_configs.pick's): the output is checked
    against the pick's first (below 40 dB, NaN or an error: reported, not timed), then each
    config's CUDA graph is timed `rounds` times in alternating order, so a drift of the GPU's speed
    reaches every config alike. -> ({name: [µs per round]}, {name: SQNR dB vs the pick})."""
    w, ids = moe.route(logits, k, True)
    y0 = moe.fused_moe(x, ids, w, layers[0], inter)
    fns, sqnr = {}, {}
    for name, conf in confs.items():
        try:
            db = mt.sqnr_db(y0.float(), moe.fused_moe(x, ids, w, layers[0], inter, config=conf).float())
        except Exception as err:  # noqa: BLE001 - a failing config is reported, not fatal
            db = float("nan")
            log(f"  FAILED {label} {name}: {str(err)[:200]}")
        sqnr[name] = db
        if db >= 40:
            fns[name] = [(lambda L=L, conf=conf: moe.fused_moe(x, *moe.route(logits, k, True)[::-1], L, inter,
                                                               config=conf)) for L in layers]
        elif db == db:
            log(f"  {label} {name}: {db:.1f} dB against the pick, not timed")
    times = {name: [] for name in confs}
    for r in range(rounds):
        for name in (list(confs) if r % 2 == 0 else list(confs)[::-1]):
            if name in fns:
                try:
                    times[name].append(time_graph(fns[name]))
                except Exception as err:  # noqa: BLE001 - e.g. a capture that fails: dropped
                    del fns[name]
                    log(f"  FAILED {label} {name}: {str(err)[:200]}")
    return times, sqnr


def clone_buckets(buckets: list[dict]) -> list[dict]:
    return [{**b, "tensors": {k: v.clone() for k, v in b["tensors"].items()}} for b in buckets]


def layer_bytes(buckets) -> int:
    return sum(v.numel() * v.element_size() for b in buckets for v in b["tensors"].values())


def touched_by_format(ids: torch.Tensor, buckets) -> dict[str, int]:
    used = torch.unique(ids.reshape(-1)).cpu()
    out: dict[str, int] = {}
    for b in buckets:
        n_used = int((b["expert_map"].cpu()[used] >= 0).sum())
        per = sum(v[0].numel() * v.element_size() for v in b["tensors"].values())
        key = UNIFORM_OF[b["layout"]]
        out[key] = out.get(key, 0) + n_used * per
    return out


def routing(M: int, E: int, k: int, seed: int):
    g = torch.Generator(device=DEVICE)
    g.manual_seed(1000 + seed + M)
    logits = torch.randn(M, E, device=DEVICE, generator=g)
    return logits


def grouped_mm_layer(x, logits, w13t, w2t, k, I):
    """bf16 baseline: torch routing + sort + torch._grouped_mm x2 + unpermute (no host sync)."""
    M, H = x.shape
    E = w13t.shape[0]
    p = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x[tok], w13t, offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]
    d = torch._grouped_mm(a, w2t, offs=offs) * w.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tok, d)


def cold_layers(shape: str, specs_fn, tokens: list[int], min_bytes: float):
    """A layer of `shape` built from specs_fn(E) and copies of it, so that one timed replay can
    cycle through >= min_bytes of touched weights (the 50 MB L2 cannot hold them); inputs x
    [max(tokens), H]; per token count M its router logits, the bytes its routing touches by format
    and the copies a replay cycles through. -> (layers, x, logits, touched, copies)."""
    sh = SHAPES[shape]
    E, k, H, I = sh["E"], sh["k"], sh["H"], sh["I"]
    base = mt.build_buckets(specs_fn(E), H, I, dtype=torch.bfloat16, device=DEVICE, seed=7)
    x = torch.randn(max(tokens), H, device=DEVICE, dtype=torch.bfloat16)
    logits = {M: routing(M, E, k, 0) for M in tokens}
    touched = {M: touched_by_format(moe.route(logits[M], k, True)[1], base) for M in tokens}
    free = torch.cuda.mem_get_info()[0]
    need = max(math.ceil(min_bytes / max(1, sum(touched[M].values()))) for M in tokens)
    n_copies = max(1, min(need, int(0.5 * free / layer_bytes(base))))
    layers = [base] + [clone_buckets(base) for _ in range(n_copies - 1)]
    copies = {M: max(1, min(n_copies, math.ceil(min_bytes / sum(touched[M].values())))) for M in tokens}
    return layers, x, logits, touched, copies


def bench_config(shape: str, name: str, specs_fn, tokens: list[int], min_bytes: float, results: list,
                 copy_bw: float, configs=None, one_launch=True, baseline=False, label=None):
    sh = SHAPES[shape]
    k, H, I = sh["k"], sh["H"], sh["I"]
    layers, x, logits_all, touched, copies = cold_layers(shape, specs_fn, tokens, min_bytes)
    base = layers[0]
    for M in tokens:
        tb = sum(touched[M].values())
        c = copies[M]
        xm, lg = x[:M].contiguous(), logits_all[M]
        cfg = configs(M) if callable(configs) else None

        def make(L):
            def f():
                w, ids = moe.route(lg, k, True)
                return moe.fused_moe(xm, ids, w, L, I, one_launch=one_launch, config=cfg)
            return f
        us = time_graph([make(layers[i]) for i in range(c)])
        row = dict(shape=shape, config=label or name, M=M, us=us, touched=tb,
                   by_format=touched[M], gbs=tb / us / 1e3, pct=100 * tb / us / 1e3 / copy_bw,
                   copies=c, path=("grouped" if moe.takes_grouped(base, xm, I, M, cfg, one_launch) else
                                   path_label(cfg or moe_configs.pick(M, *moe.side_layouts(base), hidden=H))))
        if cfg is not None or not one_launch:
            # a launch config under test must compute what the default (tested) one computes
            w, ids = moe.route(lg, k, True)
            y = moe.fused_moe(xm, ids, w, base, I, one_launch=one_launch, config=cfg)
            y0 = moe.fused_moe(xm, ids, w, base, I)
            row["sqnr_vs_default"] = mt.sqnr_db(y0.float(), y.float())
            if not row["sqnr_vs_default"] >= 40:       # NaN output: sqnr_db is NaN, and fails too
                log(f"  WARNING {shape} {row['config']} M={M}: SQNR vs default config "
                    f"{row['sqnr_vs_default']:.1f} dB")
                row["us"] = float("inf")
        if baseline:
            mats = []
            for L in layers[:c]:
                d = {b_["proj"]: b_["tensors"]["weight"] for b_ in L}
                mats.append((d["gate_up"].transpose(1, 2), d["down"].transpose(1, 2)))
            fns = [(lambda a=a, b_=b_: grouped_mm_layer(xm, lg, a, b_, k, I)) for a, b_ in mats]
            try:
                row["grouped_mm_us"] = time_graph(fns)
            except RuntimeError as err:  # report a baseline the installed torch cannot run, keep going
                log(f"  torch._grouped_mm baseline failed: {err}")
                row["grouped_mm_us"] = float("nan")
        results.append(row)
        log(f"  {shape:5s} {row['config']:22s} M={M:4d} {us:9.1f} us {row['gbs']:7.0f} GB/s "
            f"{row['pct']:5.1f}% ({c} copies, {row['path']})"
            + (f"  grouped_mm {row['grouped_mm_us']:9.1f} us" if baseline else ""))
    del layers, base
    torch.cuda.empty_cache()


def path_label(config) -> str:
    pu, _, pd, _ = moe_configs.sides(config)
    return pu if pu == pd else f"{pu}+{pd}"


def check_correct(shape: str, name: str, specs_fn, Ms=(1, 5, 40)) -> list[str]:
    """fused_moe vs moe_reference at realistic sizes (a few tokens)."""
    sh = SHAPES[shape]
    E, k, H, I = sh["E"], sh["k"], sh["H"], sh["I"]
    b = mt.build_buckets(specs_fn(E), H, I, dtype=torch.bfloat16, device=DEVICE, seed=3)
    out = []
    for M in Ms:
        x = torch.randn(M, H, device=DEVICE, dtype=torch.bfloat16)
        w, ids = moe.route(routing(M, E, k, 5), k, True)
        y = moe.fused_moe(x, ids, w, b, I)
        r = moe.moe_reference(x, ids, w, b, I)
        db = mt.sqnr_db(r, y.float())
        out.append(f"{shape} {name} M={M}: SQNR {db:.1f} dB {'ok' if db >= 40 else 'FAIL'}")
    return out


def sweep(tokens_gemv, tokens_dot, min_bytes, copy_bw, results, on_done=lambda: None, shapes=("235b", "30b"),
          paths=("gemv", "dot")):
    """Time the GEMV / dot candidates on uniform int4, fp8, bf16 layers; return the winners: joint
    (summed over the three) and, for the GEMV path, each layout's own. A candidate that fails
    (compile or run) scores inf for its tokens; on_done() after each candidate."""
    scores = {}
    for shape in [s_ for s_ in shapes if s_ in SHAPES]:
        for name in SWEPT:
            for path, cands, tokens in (("gemv", GEMV_CANDIDATES, tokens_gemv), ("dot", DOT_CANDIDATES, tokens_dot)):
                if path not in paths:
                    continue
                for ci, c in enumerate(cands):
                    rs = []
                    label = f"{name} {path}#{ci}"
                    try:
                        bench_config(shape, name, CONFIGS[name], tokens, min_bytes, rs, copy_bw,
                                     configs=lambda M, c=c, path=path: (path, c, c), label=label)
                    except Exception as err:  # noqa: BLE001 - report and go on
                        log(f"  {shape} {label} FAILED: {type(err).__name__}: {str(err)[:300]}")
                        done = {r["M"] for r in rs}
                        rs += [dict(shape=shape, config=label, M=M, us=float("inf"), error=str(err)[:300])
                               for M in tokens if M not in done]
                    for r in rs:
                        scores.setdefault((path, ci, r["M"]), []).append((shape, name, r["us"]))
                    results += rs
                    on_done()
    best_t = {}
    for (path, ci, M), lst in scores.items():
        for shape, name, us in lst:
            key = (shape, name, M)
            best_t[key] = min(best_t.get(key, float("inf")), us)

    def score(path, ci, Ms, names=SWEPT):
        tot = 0.0
        for M in Ms:
            for shape, name, us in scores.get((path, ci, M), []):
                if name in names and math.isfinite(best_t[(shape, name, M)]):  # skip what no candidate ran
                    tot += us / best_t[(shape, name, M)]
        return tot

    def crossover(g, dot_by_m, names):
        # largest M where the GEMV winner is not slower than the dot winner (over `names`)
        gemv_max = 0
        for M in sorted(set(tokens_gemv) & set(dot_by_m)):
            if score("gemv", g, [M], names) <= score("dot", dot_by_m[M], [M], names):
                gemv_max = M
        return max(gemv_max, 1)
    win = {}
    if "dot" in paths:
        dot_by_m = {M: min(range(len(DOT_CANDIDATES)), key=lambda ci: score("dot", ci, [M])) for M in tokens_dot}
        win["dot"] = {M: DOT_CANDIDATES[ci] for M, ci in dot_by_m.items()}
    else:   # no dot timings: the per-layout crossovers in use are kept
        dot_by_m = {}
    if "gemv" in paths:
        # the joint config serves launches that mix layouts: M = 2..GEMV_MAX_M (none since session 10)
        # and M=1 for shapes GEMV_M1 does not list; with no such M it is chosen over all
        joint_ms = [M for M in tokens_gemv if 1 < M <= moe_configs.GEMV_MAX_M] or tokens_gemv
        g = min(range(len(GEMV_CANDIDATES)), key=lambda ci: score("gemv", ci, joint_ms))
        win.update(gemv=g, gemv_cfg=GEMV_CANDIDATES[g], gemv_layout={}, gemv_m1=m1_winners(scores))
        if dot_by_m:
            win["gemv_max_m"] = crossover(g, dot_by_m, SWEPT)
        for name, layout in LAYOUT_OF.items():
            gl = min(range(len(GEMV_CANDIDATES)), key=lambda ci: score("gemv", ci, tokens_gemv, (name,)))
            dl = {M: min(range(len(DOT_CANDIDATES)), key=lambda ci: score("dot", ci, [M], (name,)))
                  for M in dot_by_m}
            max_m = (crossover(gl, dl, (name,)) if dot_by_m else
                     moe_configs.GEMV_LAYOUT.get(layout, (moe_configs.GEMV_MAX_M, None))[0])
            win["gemv_layout"][layout] = (max_m, GEMV_CANDIDATES[gl])
    return win


def m1_winners(scores: dict) -> dict[tuple[str, int], dict]:
    """Batch-1 GEMV configs from a sweep's scores ({(path, candidate, M): [(shape, name, µs)]}):
    per (layout, hidden size) the fastest candidate at M=1, and per hidden size ("mixed", H) the one
    with the least sum of times relative to each layout's best (launches that mix layouts)."""
    t: dict = {}
    for (path, ci, M), lst in scores.items():
        if path == "gemv" and M == 1:
            for shape, name, us in lst:
                if math.isfinite(us):
                    t.setdefault(shape, {}).setdefault(name, {})[ci] = us
    out = {}
    for shape, by_name in t.items():
        H = SHAPES[shape]["H"]
        for name, us in by_name.items():
            out[(LAYOUT_OF[name], H)] = GEMV_CANDIDATES[min(us, key=us.get)]
        common = set.intersection(*(set(us) for us in by_name.values()))
        if len(by_name) > 1 and common:
            best = {name: min(us.values()) for name, us in by_name.items()}
            ci = min(common, key=lambda c: sum(us[c] / best[n] for n, us in by_name.items()))
            out[("mixed", H)] = GEMV_CANDIDATES[ci]
    return out


def _json_keys(m1: dict) -> dict:
    """GEMV_M1-style {(layout, hidden): config} with JSON-able keys "layout H=hidden"."""
    return {f"{lay} H={H}": c for (lay, H), c in m1.items()}


def _warm_worker(job) -> str:
    """Compile (into Triton's on-disk cache) the kernels one bench_config call will launch, on a
    16-expert layer of the same shapes: kernels depend on shapes and configs, not on E."""
    shape, name, cfg, tokens, one_launch = job
    sh = SHAPES[shape]
    E = 16
    try:
        b = mt.build_buckets(CONFIGS[name](E), sh["H"], sh["I"], dtype=torch.bfloat16, device=DEVICE, seed=0)
        x = torch.randn(max(tokens), sh["H"], device=DEVICE, dtype=torch.bfloat16)
        for M in tokens:
            w, ids = moe.route(routing(M, E, sh["k"], 0), sh["k"], True)
            moe.fused_moe(x[:M].contiguous(), ids, w, b, sh["I"], one_launch=one_launch,
                          config=cfg(M) if callable(cfg) else cfg)
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - the timing process meets (and reports) it again
        return f"compile/run error {shape} {name} M={tokens} {cfg and cfg[0]}: {type(err).__name__}: {str(err)[:300]}"
    return ""


def warm(jobs: list, workers: int) -> None:
    """Compile in parallel processes (Triton compiles one kernel per process at a time)."""
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        for err in pool.imap_unordered(_warm_worker, jobs):
            if err:
                log("  WARNING", err)
    log(f"compiled {len(jobs)} job(s) in {time.perf_counter() - t0:.0f} s with {workers} processes")


def summarize(results: list, copy_bw: float) -> list[str]:
    """Goal checks on the main table."""
    lines = []
    by = {(r["shape"], r["config"], r["M"]): r for r in results}
    for r in results:
        if r["config"] in ("bf16", "fp8", "int4", "int8", "int4_g32") or "#" in r["config"]:
            continue
        est = 0.0
        ok = True
        for fmt, b in r["by_format"].items():
            u = by.get((r["shape"], fmt, r["M"]))
            if u is None or not u["by_format"].get(fmt):
                ok = False
                break
            est += u["us"] * b / u["by_format"][fmt]
        if ok:
            r["uniform_est_us"] = est
            r["ratio"] = r["us"] / est
    for what, sel in (("mixed", lambda c: not c.endswith("per-bucket")),   # the goal: one launch per side
                      ("mixed per-bucket", lambda c: c.endswith("per-bucket"))):
        worst = [r for r in results if "ratio" in r and sel(r["config"])]
        if worst:
            w = max(worst, key=lambda r: r["ratio"])
            n_bad = sum(r["ratio"] > 1.1 for r in worst)
            lines.append(f"{what} <= 1.1x bytes-weighted uniform: {len(worst) - n_bad}/{len(worst)} met; worst "
                         f"{w['ratio']:.2f}x ({w['shape']} {w['config']} M={w['M']})")
    r = by.get(("235b", "int4", 1))
    if r:
        lines.append(f"int4 M=1 235B: {r['pct']:.1f}% of copy bandwidth (goal 75%): "
                     f"{'met' if r['pct'] >= 75 else 'missed'}")
    order_bad, n_order = [], 0
    for shape in SHAPES:
        for M in sorted({r["M"] for r in results}):
            if M > 64:
                continue
            t = {f: by[(shape, f, M)]["us"] for f in ("int4", "fp8", "bf16") if (shape, f, M) in by}
            n_order += len(t) == 3
            if len(t) == 3 and not (t["int4"] < t["fp8"] < t["bf16"]):
                order_bad.append(f"{shape} M={M} int4 {t['int4']:.1f} fp8 {t['fp8']:.1f} bf16 {t['bf16']:.1f}")
    lines.append("int4 < fp8 < bf16 for M <= 64: " + _verdict(n_order, order_bad))
    gm = [r for r in results if math.isfinite(r.get("grouped_mm_us", math.nan))]   # nan: the baseline failed
    bad = [f"{r['shape']} M={r['M']} {r['us']:.1f} vs {r['grouped_mm_us']:.1f}" for r in gm
           if not r["us"] <= r["grouped_mm_us"]]
    lines.append("bf16 <= torch._grouped_mm: " + _verdict(len(gm), bad))
    lines.append(f"copy bandwidth {copy_bw:.0f} GB/s")
    return lines


def _verdict(points: int, misses: list[str]) -> str:
    """A goal line's verdict: not measured (no point compared), met, or where it was missed."""
    if not points:
        return "not measured (no point has all it compares)"
    return f"met at all {points} points" if not misses else f"missed at {len(misses)} of {points}: " + "; ".join(misses)


def table(results: list) -> str:
    head = "| shape | config | M | path | µs | GB/s | % copy | uniform-weighted µs | ratio | grouped_mm µs |"
    out = [head, "|" + "---|" * 10]
    for r in sorted(results, key=lambda r: list(SHAPES).index(r["shape"])):  # stable: run order per shape
        if "#" in r["config"]:
            continue
        out.append(f"| {r['shape']} | {r['config']} | {r['M']} | {r['path']} | {r['us']:.1f} | {r['gbs']:.0f} | "
                   f"{r['pct']:.1f} | {r.get('uniform_est_us', float('nan')):.1f} | {r.get('ratio', float('nan')):.2f} | "
                   f"{r.get('grouped_mm_us', float('nan')):.1f} |")
    return "\n".join(out)


MIXED = ("int4+fp8", "int4+fp8+bf16")


def table_jobs(shapes, names, tokens, per_bucket) -> list:
    """Compile jobs of the main table under the launch configs now in moe_configs (after a sweep:
    the winners): one job per (shape, configuration, group of token counts sharing a config)."""
    groups: dict[str, list[int]] = {}
    for M in tokens:
        groups.setdefault(json.dumps(moe_configs.pick(M), sort_keys=True), []).append(M)
    jobs = []
    for shape in shapes:
        for n in names:
            for Ms in groups.values():    # config None: what fused_moe picks for the layer's layouts
                jobs.append((shape, n, None, Ms, True))
                if per_bucket and n in MIXED:
                    jobs.append((shape, n, None, Ms, False))
    return jobs


def save(out, meta, bw, results, results_sweep, checks=()) -> list[str]:
    """Goal lines; with `out`, (re)write results.json and table.md. Called after every configuration
    (and sweep candidate), so a run that is cut short keeps everything it measured."""
    lines = summarize(results, bw)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(dict(meta=meta, copy_bw=bw, results=results, sweep=results_sweep, checks=list(checks),
                           configs=dict(gemv=moe_configs.GEMV, gemv_max_m=moe_configs.GEMV_MAX_M,
                                        gemv_layout=moe_configs.GEMV_LAYOUT, dot=moe_configs.DOT,
                                        gemv_m1=_json_keys(moe_configs.GEMV_M1))),
                      f, indent=1, default=str)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table(results) + "\n\n" + "\n".join(lines) + "\n"
                    + "".join(f"\ncheck {c}" for c in checks) + "\n")
    return lines


def main(argv=None) -> int:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(prog="mixprec bench-moe", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="30b,235b")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--min-mb", type=float, default=256.0, help="touched MB per timed replay (cold weights)")
    ap.add_argument("--sweep", action="store_true", help="time launch-config candidates, use the winners")
    ap.add_argument("--sweep-shapes", default="235b,30b", help="shapes the sweep times")
    ap.add_argument("--sweep-paths", default="gemv,dot", help="paths whose candidates the sweep times")
    ap.add_argument("--check", action="store_true", help="SQNR vs moe_reference at realistic sizes (runs last)")
    ap.add_argument("--per-bucket", action="store_true", help="also time one launch per bucket (mixed configs)")
    ap.add_argument("--out", default=None, help="folder for results.json and table.md (rewritten as rows come)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                    help="processes that compile the kernels first (1: compile on first use)")
    a = ap.parse_args(argv)
    paths = a.sweep_paths.split(",")
    if not torch.cuda.is_available():
        print("bench-moe needs a CUDA device", file=sys.stderr)
        return 2
    shapes = a.shapes.split(",")
    tokens = [int(t) for t in a.tokens.split(",")]
    names = a.configs.split(",")
    for n in names:
        if n not in CONFIGS:
            print(f"unknown config {n!r}; choose from {list(CONFIGS)}", file=sys.stderr)
            return 2

    def stage(what):
        log(f"[{time.perf_counter() - t0:.0f} s] {what}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                argv=sys.argv[1:] if argv is None else argv)
    log(f"device {meta['device']} torch {meta['torch']} triton {meta['triton']} {meta['date']}")
    bw = copy_bandwidth()
    log(f"copy bandwidth (1 GiB copy_, r+w): {bw:.0f} GB/s")
    results: list = []
    results_sweep: list = []
    min_bytes = a.min_mb * 1e6
    if a.sweep:
        if a.workers > 1:
            stage("compiling the sweep candidates")
            jobs = []
            for shape in a.sweep_shapes.split(","):
                for n in SWEPT:
                    if "gemv" in paths:
                        for c in GEMV_CANDIDATES:
                            jobs.append((shape, n, ("gemv", c, c), SWEEP_GEMV_M, True))
                    if "dot" in paths:
                        for c in DOT_CANDIDATES:
                            jobs.append((shape, n, ("dot", c, c), SWEEP_DOT_M, True))
            warm(jobs, a.workers)
        stage("sweep")
        win = sweep(SWEEP_GEMV_M, SWEEP_DOT_M, min_bytes, bw, results_sweep,
                    on_done=lambda: save(a.out, meta, bw, results, results_sweep), shapes=a.sweep_shapes.split(","),
                    paths=paths)
        if "gemv_cfg" in win:
            moe_configs.GEMV["up"] = moe_configs.GEMV["down"] = win["gemv_cfg"]
            moe_configs.GEMV_LAYOUT.update(win["gemv_layout"])   # layouts not swept (int8) keep theirs
            moe_configs.GEMV_M1.update(win["gemv_m1"])
            win["gemv_m1"] = _json_keys(win["gemv_m1"])
        if "gemv_max_m" in win:
            moe_configs.GEMV_MAX_M = win["gemv_max_m"]
        if "dot" in win:
            moe_configs.DOT[:] = [(M, c) for M, c in sorted(win["dot"].items())] + [(1 << 30, win["dot"][max(win["dot"])])]
        log("sweep winners:", json.dumps(win, default=str))
        meta["sweep_winners"] = win
        save(a.out, meta, bw, results, results_sweep)
    if a.workers > 1:  # the table's kernels under the configs it will use (the winners after a sweep)
        stage("compiling the table's kernels")
        warm(table_jobs(shapes, names, tokens, a.per_bucket), a.workers)
    stage("table")
    # configuration-major (both shapes per configuration), per-bucket rows last: a run cut short
    # loses the least important rows
    runs = [(n, True, None) for n in names]
    if a.per_bucket:
        runs += [(n, False, n + " per-bucket") for n in names if n in MIXED]
    for n, one_launch, label in runs:
        for shape in shapes:
            try:
                bench_config(shape, n, CONFIGS[n], tokens, min_bytes, results, bw, one_launch=one_launch,
                             baseline=(n == "bf16" and one_launch), label=label)
            except Exception as err:  # noqa: BLE001 - report and go on with the next configuration
                log(f"  {shape} {label or n} FAILED: {type(err).__name__}: {str(err)[:300]}")
            save(a.out, meta, bw, results, results_sweep)
    checks: list = []
    if a.check:
        stage("checks")
        for n in names:
            for shape in shapes:
                try:
                    for line in check_correct(shape, n, CONFIGS[n]):
                        log("check", line)
                        checks.append(line)
                except Exception as err:  # noqa: BLE001
                    checks.append(f"{shape} {n}: FAILED {type(err).__name__}: {str(err)[:300]}")
                    log("check", checks[-1])
                save(a.out, meta, bw, results, results_sweep, checks)
    meta["elapsed_s"] = round(time.perf_counter() - t0)
    lines = save(a.out, meta, bw, results, results_sweep, checks)
    log(table(results))
    for line in lines:
        log(line)
    stage("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
