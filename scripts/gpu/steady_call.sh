#!/bin/bash
# Device side, one call: the steady-state reasoning-trace study (benchmarks/engine_study.py --steady) on the
# Llama-8B-R1 shape (dummy bf16 weights) with the published RLKV pattern, stock and RLKV on the same
# model runner (vLLM's default, V2 on 0.26 GPUs; VLLM_USE_V2_MODEL_RUNNER=0 for V1; each result records it). usage: bash scripts/gpu/steady_call.sh CONFIG [CONFIG...]
# carry: [".carry/sm90", ".carry/fi", ".carry/s", ".carry/data", ".cache/rlkv-cuda"]
# (.carry/data: the Llama-8B pattern; for SHAPE runs also the shape config and the pattern to resample)
# Workload (WORKLOAD overrides it): gpu_memory_utilization 0.9, max_num_seqs 1024 (above what any config
# holds), a closed loop of max_num_seqs + 25% requests, prompts 100-500, outputs from the reasoning
# distribution (mean 3,252, cap 8,192), a 90 s window after 45 s of warm-up, 30 profiled steps.
# Result: $OUT/steady.json (+ steady.log)
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
unset TRITON_F32_DEFAULT  # bf16 timing runs: vLLM's defaults
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee $OUT/gpu.txt
echo "setup $(( $(date +%s) - t0 ))s"
# SHAPE=a model-shapes config.json (carried in .carry/data) + PATTERN_FROM=a published pattern: write the
# dummy-weight folder MODEL and the resampled PATTERN first (scripts/gpu/shape_model.py)
if [ -n "${SHAPE:-}" ]; then
  python3 scripts/gpu/shape_model.py "$SHAPE" "$MODEL" --pattern-from "$PATTERN_FROM" --pattern-out "$PATTERN" || exit 1
fi
WORKLOAD=${WORKLOAD:---gpu-mem 0.9 --max-num-seqs 1024 --max-model-len 8704 --warmup-s 45 --window-s 90 --profile-steps 30 --profile-start 300}
python3 benchmarks/engine_study.py --steady --model ${MODEL:-/tmp/llama8b} --load-format dummy \
  --pattern ${PATTERN:-.carry/data/DeepSeek-R1-Distill-Llama-8B.tsv} --dtype bfloat16 $WORKLOAD \
  ${STUDY_ARGS:-} --configs "$@" --deadline-s $(( ${BUDGET:-575} - ($(date +%s) - t0) )) \
  --out $OUT/steady.json > $OUT/steady.log 2>&1
echo "steady study rc=$?"; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/steady.log | tail -25
echo "total $(( $(date +%s) - t0 ))s"
