#!/bin/bash
# Device side, one call: engine study on the Llama-8B-R1 shape (dummy bf16 weights), published
# RLKV pattern; memory-bound workload. usage: bash scripts/gpu/engine_call.sh CONFIG [CONFIG...]
# carry: [".carry/sm90", ".carry/fi", ".carry/s", ".carry/data"]
# prepare here: bash ../shared/gpu/prepare.sh; mkdir -p .carry/data && cp ../shared/data/head-patterns/rlkv/DeepSeek-R1-Distill-Llama-8B.tsv .carry/data/
# Extra study args in STUDY_ARGS (e.g. --latency ...). Result: $OUT/engine.json
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
unset TRITON_F32_DEFAULT  # bf16 timing runs: vLLM's defaults
echo "setup $(( $(date +%s) - t0 ))s"
python3 benchmarks/engine_study.py --model /tmp/llama8b --load-format dummy \
  --pattern .carry/data/DeepSeek-R1-Distill-Llama-8B.tsv --dtype bfloat16 --gpu-mem 0.9 \
  --max-num-seqs 512 --max-model-len 4096 --num-prompts 256 --input-len 1024 --output-len 2048 \
  ${STUDY_ARGS:-} --configs "$@" --deadline-s $(( ${BUDGET:-575} - ($(date +%s) - t0) )) \
  --out $OUT/engine.json 2>&1 | tee $OUT/engine.log | grep -vE "^(INFO|WARNING|DEBUG)" | tail -25
echo "total $(( $(date +%s) - t0 ))s"
