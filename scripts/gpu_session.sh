#!/usr/bin/env bash
# One device call: GPU tests of the whole model, then the runtime benchmark on full-size
# Qwen3-30B-A3B shapes (synthetic weights in the real packed formats). Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
STAGE=${1:-all}
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  timeout 240 python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -15
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 -m mixprec bench --synthetic qwen3-30b-a3b --mix ${MIXES:-bf16,fp8,int4,mixed} \
    --batch ${BATCHES:-1,8,32,64} --prompt-len 128 --gen-len ${GEN:-128} --json "$OUT/bench_30b.json" 2>&1 \
    | tee "$OUT/bench_30b.log" | grep -v "^\s*$" | tail -40
fi
