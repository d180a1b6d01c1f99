#!/bin/bash
# Device side, one call: engine study on the Llama-8B-R1 shape (dummy bf16 weights), published
# RLKV pattern, memory-bound workload. usage: bash scripts/gpu/engine_call.sh CONFIG [CONFIG...]
# carry: [".carry/sm90", ".carry/fi", ".carry/s", ".carry/data", ".cache/rlkv-cuda"]
# prepare here: bash ../shared/gpu/prepare.sh; mkdir -p .carry/data && cp ../shared/data/head-patterns/rlkv/DeepSeek-R1-Distill-Llama-8B.tsv .carry/data/
# Workload (WORKLOAD overrides it): the same 16 GiB KV budget for every config (RLKV's ring
# comes out of it), 160 prompts x 1536 in / 2048 out, max_num_seqs 160 (no config is capped
# below what its KV cache holds), so stock and RLKV up to s=0.6 stay KV-bound.
# Extra study args in STUDY_ARGS (e.g. --latency ...). Result: $OUT/engine.json
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
unset TRITON_F32_DEFAULT  # bf16 timing runs: vLLM's defaults
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee $OUT/gpu.txt
echo "setup $(( $(date +%s) - t0 ))s"
WORKLOAD=${WORKLOAD:---kv-bytes 17179869184 --max-num-seqs 160 --max-model-len 3584 --num-prompts 160 --input-len 1536 --output-len 2048}
python3 benchmarks/engine_study.py --model /tmp/llama8b --load-format dummy \
  --pattern .carry/data/DeepSeek-R1-Distill-Llama-8B.tsv --dtype bfloat16 $WORKLOAD \
  ${STUDY_ARGS:-} --configs "$@" --deadline-s $(( ${BUDGET:-575} - ($(date +%s) - t0) )) \
  --out $OUT/engine.json > $OUT/engine.log 2>&1
echo "engine study rc=$?"; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/engine.log | tail -25
echo "total $(( $(date +%s) - t0 ))s"
