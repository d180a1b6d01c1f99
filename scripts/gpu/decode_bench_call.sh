#!/bin/bash
# Device side, one call (~2-4 min): the decode_step micro-benchmark, v2 (the default kernel)
# against v1, Llama-8B and Qwen-32B shapes at batch 8/64/256/512 plus an fp8 (e4m3) case, which also
# times FA3's fp8 queries taken as they are against dequantize_query's copy first.
# carry: [".carry/sm90", ".carry/fi", ".carry/s"]
# prepare here: bash ../shared/gpu/prepare.sh
# usage: bash scripts/gpu/decode_bench_call.sh [decode_bench.py args]
# Env: BUDGET (s, default 580). Results: $OUT/decode_bench.json, $OUT/decode-bench.log.
set -uo pipefail
t0=$(date +%s)
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - t0) )); }
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
unset TRITON_F32_DEFAULT  # bf16 timing: vLLM's defaults
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee $OUT/gpu.txt
echo "setup $(( $(date +%s) - t0 ))s"
timeout $(( $(left) - 5 )) python3 scripts/gpu/decode_bench.py "$@" 2>&1 | tee $OUT/decode-bench.log \
  | grep -vE "^(INFO|WARNING|DEBUG)" | cut -c1-260
rc=${PIPESTATUS[0]}
echo "decode bench rc=$rc at $(( $(date +%s) - t0 ))s"
