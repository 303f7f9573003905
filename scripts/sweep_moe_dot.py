"""Launch configs of the fused MoE against the current pick (moe_configs.pick) at decode /
small-batch sizes, on real mixed layers: dot-path BN, K split (programs per output tile),
pipeline stages, warps; or (--gemv) every GEMV candidate of moe_bench.GEMV_CANDIDATES; or (--down)
those for the down side alone, the gate/up side keeping the pick's path and config.

Per (shape, layer mix, tokens M): route + fused_moe per layer in CUDA graphs over cold weight
copies (as `bench-moe`), every candidate checked against the default config (SQNR >= 40 dB)
before it is timed, --rounds times in alternating order (the median is reported). Prints one
line per M with each candidate's µs and the winner. GPU only.

    python scripts/sweep_moe_dot.py --tokens 1,2,4,8,16 --grid "64,1,3,4;64,2,3,4" [--out rows.json]
    python scripts/sweep_moe_dot.py --gemv --tokens 1 --configs rt_mixed,int4+fp8
    python scripts/sweep_moe_dot.py --gemv-gu --tokens 1 --configs fp8,bf16,rt_mixed
    python scripts/sweep_moe_dot.py --down --tokens 1,2 --configs int4,fp8,rt_mixed
    python scripts/sweep_moe_dot.py --f16 --grid "" --tokens 1,2,4 --configs fp8,rt_mixed   (pick vs pick + f16)
    python scripts/sweep_moe_dot.py --apart --grid "" --tokens 16,32,64 --configs int4+fp8,perproj

--apart: the pick with the int4 buckets of each dot side that mixes layouts in a launch of their own
on 8-pair tensor-core blocks (a config's "intq" row, moe._apart; "apart/w1", "apart/w2": one or two
warps per gate/up program), and ("blocks/w1", "blocks/w2") a dot side of int4 buckets only beside a
side of other layouts on those blocks itself (the pick keeps such a layer on one BM-16 alignment);

--grid: ";"-separated candidates "BN,split,stages,warps[,BM[,BKD]][,KEY=VALUE...]" (BM 16, 128-wide K
tiles unless given; KEY: another key of a moe_configs row, e.g. BKQ=256 or mma=1, or maxnreg=96
(ptxas's register cap, both sides); DBN / DW: the down side's BN / warps where they differ from the
gate/up side's);
--down-grid times the grid's candidates on the down side alone (the gate/up side as picked);
--old-rows adds the session-4 M <= 128 dot row (BN 128, 64-wide dense / int8 K tiles) with and
without 128-wide K tiles. Layer mixes: moe_bench.CONFIGS (`rt_mixed`: the runtime's `mixed`
preset: half the experts int4, a quarter fp8 with bf16 down, a quarter int8 W8A8 with fp8 down)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixprec.kernels import moe  # noqa: E402
from mixprec.kernels import moe_configs  # noqa: E402
from mixprec.kernels import moe_bench as mb  # noqa: E402

BASE = dict(BM=16, BN=64, BKD=128, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=3)

# --down: K chunks of 3 (30B down K = 768, 235B 1536) beside the GEMV candidates
DOWN_EXTRA = [dict(BN=bn, BKD=128, BKF=256, BKQ=256, BKI=256, num_warps=w, num_stages=1, split=3)
              for bn, w in ((32, 4), (64, 4), (64, 8), (128, 8))]


def down_candidates() -> list[dict]:
    """The GEMV candidates without the gate/up key (`gu`), duplicates dropped, and DOWN_EXTRA."""
    out = []
    for c in mb.GEMV_CANDIDATES + DOWN_EXTRA:
        c = {k: v for k, v in c.items() if k != "gu"}
        if c not in out:
            out.append(c)
    return out


def candidates(grid: str, old_rows: bool, gemv: tuple[str, list[dict]] | None) -> dict:
    """name -> (path, config); "default" -> None (moe_configs.pick). gemv: (name prefix, GEMV
    candidate list) instead of the dot grid."""
    out = {"default": None}
    if gemv:
        prefix, cands = gemv
        out.update({f"{prefix}#{i}": ("gemv", c, c) for i, c in enumerate(cands)})
        return out
    for item in filter(None, grid.split(";")):
        fields = item.split(",")
        named = dict(f.split("=") for f in fields if "=" in f)    # e.g. BKQ=256
        bn, sp, st, nw, *rest = (int(v) for v in fields if "=" not in v)
        bm, bkd = (rest + [16, 128][len(rest):])[:2]
        name = (f"bn{bn}s{sp}st{st}w{nw}" + (f"bm{bm}" if bm != 16 else "") + (f"bkd{bkd}" if bkd != 128 else "")
                + "".join(f"{k.lower()}{v}" for k, v in named.items()))
        dbn, dw = int(named.pop("DBN", bn)), int(named.pop("DW", nw))
        up = dict(BASE, BM=bm, BN=bn, BKD=bkd, split=sp, num_stages=st, num_warps=nw,
                  **{k: int(v) for k, v in named.items()})
        out[name] = ("dot", up, dict(up, BN=dbn, num_warps=dw))
    if old_rows:
        old = dict(BM=16, BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=3)
        out["dot1"] = ("dot", old, old)
        out["dot1k128"] = ("dot", dict(old, BKD=128, BKI=128), dict(old, BKD=128, BKI=128))
    return out


def with_blocks(pick: tuple, layouts: tuple[set, set], hidden: int, kind: str, warps: int) -> tuple:
    """The pick with its dot sides' int4 buckets on 8-pair blocks (--apart), those of the uniform
    int4 layers' last moe_configs.DOT_INTQ_MMA row of this hidden size, `warps` per gate/up
    program: kind "apart" names the block row as the "intq" row of each dot side mixing int4 with
    other layouts; "blocks" puts a dot side of int4 buckets only on the row itself. Other sides as
    picked."""
    last = moe_configs.DOT_INTQ_MMA[hidden][-1]
    out = list(pick)
    for i, lays in ((0, layouts[0]), (2, layouts[1])):
        row = dict(last["up"], num_warps=warps) if i == 0 else last["down"]
        if pick[i] != "dot" or "intq" not in lays or pick[i + 1].get("mma"):
            continue
        if kind == "apart" and len(lays) > 1:
            out[i + 1] = dict(pick[i + 1], intq=row)
        elif kind == "blocks" and lays == {"intq"}:
            out[i + 1] = row
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="30b,235b")
    ap.add_argument("--configs", default="int4,fp8,int4+fp8,rt_mixed")
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--grid", default="64,1,3,4;64,2,3,4;64,4,3,4;64,8,3,4;32,4,3,4;32,8,3,4;128,4,3,4;128,8,3,4;"
                                      "64,16,3,4;64,8,2,4")
    ap.add_argument("--old-rows", action="store_true")
    ap.add_argument("--apart", action="store_true", help="int4 buckets on 8-pair blocks beside other layouts")
    ap.add_argument("--gemv", action="store_true", help="the GEMV candidates instead of the dot grid")
    ap.add_argument("--gemv-gu", action="store_true", help="only the GEMV candidates with gate and up in one loop")
    ap.add_argument("--down", action="store_true", help="the GEMV candidates on the down side only")
    ap.add_argument("--down-grid", action="store_true", help="the --grid candidates on the down side only")
    ap.add_argument("--min-mb", type=float, default=256.0, help="cold bytes per timed replay")
    ap.add_argument("--rounds", type=int, default=2, help="timings per candidate (median), in alternating order")
    ap.add_argument("--f16", action="store_true",
                    help="also the pick with f16 on (int4 and fp8 W8A8 GEMV slots in packed fp16) and, with "
                         "--gemv / --gemv-gu / --down, every candidate with f16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gemv = (("gemvgu", mb.GEMV_GU_CANDIDATES) if a.gemv_gu else
            ("down", down_candidates()) if a.down else ("gemv", mb.GEMV_CANDIDATES) if a.gemv else None)
    cands = candidates(a.grid, a.old_rows, gemv)
    if a.f16:
        cands.update({f"{cn}f16": (c[0], dict(c[1], f16=True), dict(c[2], f16=True)) for cn, c in list(cands.items())
                      if c is not None and c[0] == "gemv"})
        cands["default+f16"] = "pick+f16"
    if a.apart:
        cands.update({f"{kind}/w{w}": (kind, w) for kind in ("apart", "blocks") for w in (1, 2)})
    tokens = [int(t) for t in a.tokens.split(",")]
    bw = mb.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s", flush=True)
    rows, t0 = [], time.time()
    for shape in a.shapes.split(","):
        sh = mb.SHAPES[shape]
        k, I = sh["k"], sh["I"]
        for name in a.configs.split(","):
            layers, x, lgs, touched_fmt, copies = mb.cold_layers(shape, mb.CONFIGS[name], tokens, a.min_mb * 1e6)
            b0 = layers[0]
            touched = {M: sum(t.values()) for M, t in touched_fmt.items()}
            for M in tokens:
                c = copies[M]
                xm, lg = x[:M].contiguous(), lgs[M]
                pick = moe_configs.pick(M, *moe.side_layouts(b0), hidden=sh["H"])
                confs = {}
                for cn, cfg in cands.items():
                    if cfg is None:
                        conf = None
                    elif isinstance(cfg, tuple) and cfg[0] in ("apart", "blocks"):
                        conf = with_blocks(pick, moe.side_layouts(b0), sh["H"], *cfg)
                    elif cfg == "pick+f16":     # the pick, its GEMV sides with f16
                        conf = tuple(dict(c, f16=True) if isinstance(c, dict) and pick[i - 1] == "gemv" else c
                                     for i, c in enumerate(pick))
                    elif a.down or a.down_grid:   # the gate/up side as picked, the candidate on the down side
                        conf = (*pick[:2], cfg[0], cfg[-1])
                    else:
                        conf = (cfg[0], cfg[1], cfg[-1])
                    confs[cn] = conf
                # rounds in alternating order: a drift of the GPU's speed over the sweep reaches
                # every candidate alike (one pass: twins differed by ~5%, moe_diag/session18_sweep_down_*)
                times, sqnr_of = mb.time_configs(layers[:c], xm, lg, k, I, confs, a.rounds, f"{shape} {name} M={M}")
                line = []
                for cn in cands:
                    us = statistics.median(times[cn]) if times[cn] else float("inf")
                    rows.append(dict(shape=shape, config=name, M=M, cand=cn, us=us, rounds=times[cn], sqnr=sqnr_of[cn],
                                     touched=touched[M]))
                    line.append(f"{cn}={us:.1f}")
                best = min((r for r in rows if (r["shape"], r["config"], r["M"]) == (shape, name, M)),
                           key=lambda r: r["us"])
                print(f"{shape} {name:9s} M={M:3d} " + " ".join(line) + f" | best {best['cand']} {best['us']:.1f} "
                      f"({100 * touched[M] / best['us'] / 1e3 / bw:.0f}%) [{time.time() - t0:.0f}s]", flush=True)
            del layers, b0
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
