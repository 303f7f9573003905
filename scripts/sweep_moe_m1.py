"""GEMV configs of MoE layers (uniform int4 unless --config) at decode sizes, against the pick
(moe_configs.pick): each side on its own (the gate/up candidates of UP / UP_M with the picked down
side, the down candidates of DOWN / DOWN_M with the picked gate/up side), or --pairs on both. Route
+ fused_moe per layer in CUDA graphs over cold weight copies (as `bench-moe`), every candidate
checked against the default (SQNR >= 40 dB), ROUNDS timings in alternating order (median). GPU only.
Session 31's sweep: benchmarks/moe_diag/session31_sweep_m1_h100.log.

    python scripts/sweep_moe_m1.py                      # M = 1: UP / DOWN
    python scripts/sweep_moe_m1.py --tokens 2,4,8       # the GEMV rows of 2-8 tokens: UP_M / DOWN_M
    python scripts/sweep_moe_m1.py --tokens 2,4,8 --config int4+fp8 --pairs   # GEMV pairs, mixed layers
    python scripts/sweep_moe_m1.py --config rt_mixed --shapes 30b --mixed-m1  # M=1 K tiles of mixed layers
    python scripts/sweep_moe_m1.py --config fp8 --shapes 235b                 # M=1, 235B fp8 layers
The candidate tables are importable (scripts/diag_mixed_m1_regs.py compiles UP_MIXED / DOWN_MIXED)."""
import argparse
import os, statistics, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixprec.kernels import moe, moe_configs
from mixprec.kernels import moe_bench as mb

B = dict(BKD=128, BKF=128, BKI=128, num_stages=1)
def c(bn, bkq, w, **kw):
    return dict(B, BN=bn, BKQ=bkq, num_warps=w, **kw)

# fp8 layers (dot rows before session 33, at 1 token on the 235B and at 2-4 tokens): the word loops
# with longer fp8 K tiles, in UP["235b"] / UP_M and DOWN["235b"] / DOWN_M
FP8_UP = {"4/512/1gu-F512": c(4, 512, 1, gu=True, f16=True, BKD=256, BKF=512, BKI=256),
          "8/512/2gu-F512": c(8, 512, 2, gu=True, f16=True, BKD=256, BKF=512, BKI=256),
          "16/512/4gu-F512": c(16, 512, 4, gu=True, f16=True, BKD=256, BKF=512, BKI=256)}
FP8_DOWN = {"32/256/4-F256": c(32, 256, 4, f16=True, BKD=128, BKF=256),
            "64/256/8-F256": c(64, 256, 8, f16=True, BKD=128, BKF=256),
            "16/512/4-F512": c(16, 512, 4, f16=True, BKD=256, BKF=512)}
# int4 at batch 1 on the 235B: more programs per output tile (moe_triton's SPLIT: K chunks, fp32
# partials, the last program of a tile finishes it), last swept in session 6 before the f16 loops
SPLIT_UP = {"s2-16/512/4": c(16, 512, 4, f16=True, split=2), "s2-32/512/4": c(32, 512, 4, f16=True, split=2),
            "s4-32/256/4": c(32, 256, 4, f16=True, split=4), "s4-16/512/2": c(16, 512, 2, f16=True, split=4)}
SPLIT_DOWN = {"s2-32/256/4": c(32, 256, 4, f16=True, split=2), "s2-64/256/8": c(64, 256, 8, f16=True, split=2),
              "s2-16/256/2": c(16, 256, 2, f16=True, split=2)}
# int4 on the tensor cores (gemv_mma, session 35): gate / up of 32 or 16 rows, 64 or 32 down rows
# (4 or 2 column tiles per lane), 2-8 warps. Session 35 also timed these with the loads in Triton's
# cp.async pipeline, with register caps (maxnreg 80 / 88) and with the group after next asked of L2
# (prefetch.global.L2): all slower (moe_diag/session35_int4_mma_*)
# (session 37: one-warp programs won on the dot path's 8-pair blocks, hence the /1 candidates)
MMA_UP = {f"mma{bn}/{w}": c(bn, 512, w, gu=True, f16=True, mma=True)
          for bn, w in ((32, 4), (32, 8), (16, 4), (16, 2), (32, 1), (16, 1), (32, 2))}
MMA_DOWN = {f"dmma{bn}/{w}": c(bn, 256, w, f16=True, mma=True)
            for bn, w in ((64, 4), (64, 8), (32, 4), (32, 2), (64, 1), (32, 1), (64, 2))}
UP = {
    "235b": {"cur": None, **MMA_UP, "16/512/4gu": c(16, 512, 4, gu=True, f16=True), "32/512/4": c(32, 512, 4, f16=True),
             "32/512/4gu": c(32, 512, 4, gu=True, f16=True), "32/256/4gu": c(32, 256, 4, gu=True, f16=True),
             "32/256/4": c(32, 256, 4, f16=True), "64/256/8": c(64, 256, 8, f16=True), "8/512/2gu": c(8, 512, 2, gu=True, f16=True),
             # fp8 / mixed layers
             **FP8_UP, "4/512/2gu-F512": c(4, 512, 2, gu=True, f16=True, BKD=256, BKF=512, BKI=256),
             "8/512/4gu-F1024": c(8, 512, 4, gu=True, f16=True, BKD=256, BKF=1024, BKI=512),
             # K split over 2-4 programs per tile (gate and up in separate programs: no gu), session 34
             **SPLIT_UP},
    "30b": {"cur": None, **MMA_UP, "16/512/4gu-f16": c(16, 512, 4, gu=True, f16=True), "8/512/2gu": c(8, 512, 2, gu=True),
            "8/512/2gu-f16": c(8, 512, 2, gu=True, f16=True), "16/256/4gu": c(16, 256, 4, gu=True),
            "32/256/4gu": c(32, 256, 4, gu=True),
            # int8 layers (GEMV_LAYOUT's int8 row at M=1 on the 30B; BKI 256 won on the 235B, session 33)
            "8/512/2gu-I256": c(8, 512, 2, gu=True, f16=True, BKD=256, BKF=512, BKI=256),
            # int4: K = 2048 in 1-2 tiles (fewer dependent loads per program), session 34
            "16/1024/4gu": c(16, 1024, 4, gu=True), "16/1024/4gu-f16": c(16, 1024, 4, gu=True, f16=True),
            "8/1024/2gu": c(8, 1024, 2, gu=True), "32/1024/8gu": c(32, 1024, 8, gu=True),
            "16/2048/8gu": c(16, 2048, 8, gu=True),
            # more warps per launch (ncu, session 34: 2.8 warps per scheduler, an instruction every 2.1 cycles)
            "8/512/4gu": c(8, 512, 4, gu=True), "16/512/8gu": c(16, 512, 8, gu=True), "8/256/4gu": c(8, 256, 4, gu=True),
            "16/256/8gu": c(16, 256, 8, gu=True), "4/512/4gu": c(4, 512, 4, gu=True)},
}
# layers mixing layouts at M=1 (GEMV_M1's "mixed" row: BN 4, one warp, K tiles BKQ 512 / BKF 256 /
# BKD 256 / BKI 256): the other layouts' K tiles as long as the int4 one's in loop steps
UP_MIXED = {"cur": None, "4/512/1gu-f16-K512": c(4, 512, 1, gu=True, f16=True, BKD=512, BKF=512, BKI=512),
            "4/512/1gu-f16-F512": c(4, 512, 1, gu=True, f16=True, BKD=256, BKF=512, BKI=256),
            "8/512/2gu-f16-K512": c(8, 512, 2, gu=True, f16=True, BKD=512, BKF=512, BKI=512),
            # int4 slots on the tensor-core tiles (gemv_mma: BN 16 / 32 gate and up in one loop)
            "16/512/4gu-mma": c(16, 512, 4, gu=True, f16=True, mma=True, BKF=512),
            "32/512/4gu-mma": c(32, 512, 4, gu=True, f16=True, mma=True, BKF=512)}
DOWN_MIXED = {"cur": None, "32/256/4-f16-K256": c(32, 256, 4, f16=True, BKD=256, BKF=256, BKI=256),
              "32/256/4-f16-F256": c(32, 256, 4, f16=True, BKF=256),
              "32/256/8-f16-K256": c(32, 256, 8, f16=True, BKD=256, BKF=256, BKI=256),
              "32/256/4-mma": c(32, 256, 4, f16=True, mma=True, BKF=256),
              "64/256/4-mma": c(64, 256, 4, f16=True, mma=True, BKF=256)}
DOWN = {
    "235b": {"cur": None, **MMA_DOWN, "32/512/4": c(32, 512, 4, f16=True), "16/512/4": c(16, 512, 4, f16=True),
             "64/256/8": c(64, 256, 8, f16=True), "16/256/2": c(16, 256, 2, f16=True),
             **FP8_DOWN, "32/512/8-F512": c(32, 512, 8, f16=True, BKD=256, BKF=512), **SPLIT_DOWN},
    "30b": {"cur": None, **MMA_DOWN, "32/256/4-f16": c(32, 256, 4, f16=True), "16/256/2": c(16, 256, 2), "16/256/4": c(16, 256, 4),
            "64/256/8": c(64, 256, 8),
            # int4: K = 768 in one tile, session 34
            "32/1024/4-f16": c(32, 1024, 4, f16=True), "16/1024/4-f16": c(16, 1024, 4, f16=True),
            "32/1024/8": c(32, 1024, 8), "64/1024/8-f16": c(64, 1024, 8, f16=True),
            "32/256/8-f16": c(32, 256, 8, f16=True), "16/256/4-f16": c(16, 256, 4, f16=True),
            "16/256/8-f16": c(16, 256, 8, f16=True), "8/256/4-f16": c(8, 256, 4, f16=True)},
}
# 2-8 tokens (moe_configs.GEMV_LAYOUT's intq row, both sides: BN 32, BKQ 256, 4 warps, gu, f16)
UP_M = {"cur": None, **MMA_UP, "16/512/4gu": c(16, 512, 4, gu=True, f16=True), "32/512/4gu": c(32, 512, 4, gu=True, f16=True),
        "16/256/4gu": c(16, 256, 4, gu=True, f16=True), "64/256/8gu": c(64, 256, 8, gu=True, f16=True),
        "32/256/4": c(32, 256, 4, f16=True),
        **FP8_UP, "32/256/4gu-F256": c(32, 256, 4, gu=True, f16=True, BKF=256)}
DOWN_M = {"cur": None, **MMA_DOWN, "16/512/4": c(16, 512, 4, f16=True), "32/512/4": c(32, 512, 4, f16=True),
          "64/256/8": c(64, 256, 8, f16=True), "16/256/2": c(16, 256, 2, f16=True), "32/256/4-f32": c(32, 256, 4),
          **FP8_DOWN}
# --pairs: (gate/up, down) GEMV configs for both sides (down None: the pick's down side), for
# layers whose launches mix layouts (their pick: the dot path from 2 tokens, moe_configs.GEMV_MAX_M)
_RT = moe_configs.GEMV_MIXED[frozenset({"intq", "fp8", "int8", "dense"})][0]
PAIRS = {"cur": None,
         "joint": (moe_configs.GEMV["up"], moe_configs.GEMV["down"]),
         "intq-row": (moe_configs.GEMV_LAYOUT["intq"][1],) * 2,
         "intq-row-f16down": (moe_configs.GEMV_LAYOUT["intq"][1], c(32, 256, 4, f16=True, BKF=256)),
         "16/512/4gu+32/8": (c(16, 512, 4, gu=True, f16=True, BKF=256), c(32, 256, 8, f16=True, BKF=256)),
         "intq-row-up-only": (moe_configs.GEMV_LAYOUT["intq"][1], None),
         # fp8 K tiles as long in loop steps as the int4 ones (what won at M=1, session 32): session 33
         "intq-row-F256": (dict(moe_configs.GEMV_LAYOUT["intq"][1], BKF=256),) * 2,
         "16/512/4gu-F512+32/8": (c(16, 512, 4, gu=True, f16=True, BKF=512), c(32, 256, 8, f16=True, BKF=256)),
         "intq-row-F256up": (dict(moe_configs.GEMV_LAYOUT["intq"][1], BKF=256), moe_configs.GEMV_LAYOUT["intq"][1]),
         # GEMV_MIXED's row of the runtime's mixed preset, and its fp8 / bf16 tiles lengthened
         "rt-row": (_RT["up"], _RT["down"]),
         "rt-row-F512up": (dict(_RT["up"], BKF=512), _RT["down"]),
         "rt-row-D256down": (_RT["up"], dict(_RT["down"], BKD=256)),
         "rt-row-D256": (dict(_RT["up"], BKD=256), dict(_RT["down"], BKD=256)),
         # their int4 slots on the tensor-core tiles (gemv_mma; the mixed rows never had them)
         "intq-row-mma": (dict(moe_configs.GEMV_LAYOUT["intq"][1], mma=True),) * 2,
         "rt-row-mma": (dict(_RT["up"], mma=True), dict(_RT["down"], mma=True))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--shapes", default="235b,30b")
    ap.add_argument("--config", default="int4", help="a layer mix of moe_bench.CONFIGS")
    ap.add_argument("--pairs", action="store_true", help="PAIRS on both sides instead of UP / DOWN per side")
    ap.add_argument("--mixed-m1", action="store_true", help="M=1 of a layer mixing layouts: UP_MIXED / DOWN_MIXED")
    ap.add_argument("--only", default="", help="comma-separated candidate names to time (with cur), e.g. mma32/4,dmma64/4")
    args = ap.parse_args()
    TOKENS = [int(t) for t in args.tokens.split(",")]
    ROUNDS = 3
    bw = mb.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s", flush=True)
    for shape, M in ((s, m) for s in args.shapes.split(",") for m in TOKENS):
        sh = mb.SHAPES[shape]
        k, I = sh["k"], sh["I"]
        layers, x, lgs, touched_fmt, copies = mb.cold_layers(shape, mb.CONFIGS[args.config], [M], 256e6)
        b0, cn, xm, lg = layers[0], copies[M], x[:M].contiguous(), lgs[M]
        touched = sum(touched_fmt[M].values())
        up_l, down_l = moe.side_layouts(b0)
        pick = moe_configs.pick(M, up_l, down_l, hidden=sh["H"])
        print(shape, f"M={M}", "pick", pick, flush=True)
        confs = {}
        mixed = len(up_l | down_l) > 1
        # UP_MIXED / DOWN_MIXED: the 30B's one-warp rows; the 235B's mixed layers take UP / DOWN
        up_m1, down_m1 = (UP_MIXED, DOWN_MIXED) if mixed and args.mixed_m1 and shape == "30b" else (UP[shape], DOWN[shape])
        tables = ((("both", PAIRS),) if args.pairs else
                  (("up", up_m1 if M == 1 else UP_M), ("down", down_m1 if M == 1 else DOWN_M)))
        for side, table in tables:
            for name, cfg in table.items():
                if cfg is None:
                    conf, name = None, "cur"
                elif side == "both":
                    conf = ("gemv", cfg[0], *(pick[2:] if cfg[1] is None else ("gemv", cfg[1])))
                else:
                    conf = ("gemv", cfg, *pick[2:]) if side == "up" else (*pick[:2], "gemv", cfg)
                    name = f"{side}:{name}"
                confs[name] = conf
        if args.only:
            keep = set(args.only.split(","))
            confs = {n: v for n, v in confs.items() if n == "cur" or n.split(":", 1)[-1] in keep}
        times, _ = mb.time_configs(layers[:cn], xm, lg, k, I, confs, ROUNDS, f"{shape} M={M}")
        for n, ts in times.items():
            if not ts:
                continue
            us = statistics.median(ts)
            print(f"  {shape} M={M} {n:22s} {us:7.2f} us  {100 * touched / us / 1e3 / bw:5.1f}%  rounds {' '.join(f'{t:.2f}' for t in ts)}",
                  flush=True)
        del layers, b0
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
