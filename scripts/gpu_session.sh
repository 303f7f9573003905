#!/usr/bin/env bash
# One device call: GPU tests, the runtime benchmark on full-size Qwen3-30B-A3B shapes (synthetic
# weights in the real packed formats), reduced-layer Qwen3-235B-A22B steps, load throughput.
# Stages: tests | bench | bench235 | load (default: all) | parallel (needs NPROC GPUs, default 2)
# | parallel235 (needs 4 GPUs); the last two are not in the default. Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
STAGES=${*:-tests bench bench235 load}
for STAGE in $STAGES; do
  case $STAGE in
  tests)
    timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu.py tests/test_attention_kernels.py} \
      2>&1 | tee "$OUT/tests.log" | tail -8 ;;
  bench)
    timeout ${BENCH_TIMEOUT:-400} python3 -m mixprec bench --synthetic qwen3-30b-a3b --mix ${MIXES:-bf16,fp8,int4,mixed} \
      --batch ${BATCHES:-1,8,32,64} --prompt-len 128 --gen-len ${GEN:-128} --json "$OUT/bench_30b.json" 2>&1 \
      | tee "$OUT/bench_30b.log" | grep -v "^\s*$" | tail -40 ;;
  bench235)
    # two layer counts: per-layer step time = difference / layers, extrapolated to 94 layers
    for L in ${LAYERS235:-4 8}; do
      timeout ${BENCH235_TIMEOUT:-150} python3 -m mixprec bench --synthetic qwen3-235b-a22b --layers $L --mix ${MIX235:-int4} \
        --batch ${BATCHES235:-1,32} --prompt-len 128 --gen-len 64 --json "$OUT/bench_235b_L$L.json" 2>&1 \
        | tee "$OUT/bench_235b_L$L.log" | grep -v "^\s*$" | tail -8
    done ;;
  load)
    timeout ${LOAD_TIMEOUT:-200} python3 scripts/bench_load.py /tmp/loadfx --layers ${LOAD_LAYERS:-1} 2>&1 | tee "$OUT/load.log" | tail -6 ;;
  parallel)
    # the single-GPU reference on GPU 0 (the GPU tests on GPU 1 meanwhile), then each layout in
    # PRUNS ("|"-separated) on NPROC GPUs
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
    P="--mix ${PMIX:-mixed} ${PLAYERS:+--layers $PLAYERS} --batch=${PBATCHES-1,8,32} --gen-len ${GEN:-128} --out $OUT/parallel${PLAYERS}"
    if [ -n "${TESTS-x}" ]; then
      CUDA_VISIBLE_DEVICES=1 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
        ${TESTS:-tests/test_gpu.py tests/test_attention_kernels.py tests/test_moe_kernels.py} > "$OUT/tests.log" 2>&1 &
    fi
    CUDA_VISIBLE_DEVICES=0 timeout ${REF_TIMEOUT:-240} python3 scripts/bench_parallel.py $P 2>&1 | tee "$OUT/parallel_tp1.log" | tail -12
    wait; [ -f "$OUT/tests.log" ] && tail -5 "$OUT/tests.log"
    IFS='|' read -ra RUNS <<< "${PRUNS:---tp 2|--ep 2}"
    for RUN in "${RUNS[@]}"; do
      timeout ${RUN_TIMEOUT:-240} python3 -m torch.distributed.run --nproc-per-node ${NPROC:-2} scripts/bench_parallel.py $RUN $P 2>&1 \
        | tee "$OUT/parallel_${RUN// /}.log" | grep -v "^\s*$" | tail -40
    done ;;
  parallel235)
    # Qwen3-235B-A22B shapes on 4 GPUs: greedy / teacher-forced check on 8 layers against one GPU,
    # then tok/s of all 94 layers (no single-GPU reference: it does not fit one card)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    P="--arch qwen3-235b-a22b --mix ${PMIX235:-fp8}"
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 scripts/bench_parallel.py $P --layers 8 --batch '' --out $OUT/p235_L8 2>&1 | tail -3
    for RUN in "--tp 4" "--ep 4"; do
      timeout 120 python3 -m torch.distributed.run --nproc-per-node 4 scripts/bench_parallel.py $RUN $P --layers 8 --batch '' \
        --out $OUT/p235_L8 2>&1 | tee "$OUT/p235_L8_${RUN// /}.log" | grep -v "^\s*$" | tail -30
    done
    IFS='|' read -ra RUNS <<< "${RUNS235:---tp 4|--ep 4}"
    for RUN in "${RUNS[@]}"; do
      timeout ${RUN235_TIMEOUT:-200} python3 -m torch.distributed.run --nproc-per-node 4 scripts/bench_parallel.py $RUN $P --no-check \
        --batch ${PBATCHES235:-1,32} --gen-len 64 --out $OUT/p235 2>&1 | tee "$OUT/p235_${RUN// /}.log" | grep -v "^\s*$" | tail -12
    done ;;
  esac
done
