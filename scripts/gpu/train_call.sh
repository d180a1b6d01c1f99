#!/bin/bash
# Device side: one rlkv train step at a realistic size (Llama-8B-R1 shape, dummy bf16 weights, colocated
# on one GPU) against stock generation in the same call (benchmarks/train_study.py). Two calls:
#   prepare here once:  bash ../shared/gpu/prepare.sh && bash ../shared/gpu/prepare_train.sh
#   call 1: carry [".carry/train"], command: bash scripts/gpu/train_unpack_call.sh (also runs the fused CUDA tests)
#   call 2 (within 30 s of call 1's reply): carry [".carry/sm90", ".carry/fi", ".carry/s", ".cache/rlkv-cuda"],
#           command: BUDGET=560 bash scripts/gpu/train_call.sh [train_study.py args]
# Result: $OUT/train.json (+ train.log). Default workload: 32 prompts x 4 samples x 256 in / 2048 new.
set -uo pipefail
t0=$(date +%s)
[ -d /tmp/site_train/ray ] || { echo "no /tmp/site_train: the machine went cold after call 1; run call 1 again"; exit 3; }
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
unset TRITON_F32_DEFAULT  # bf16 timing runs: vLLM's defaults
# rlkv_trainer is trainer/ (package_dir in setup.py): a link makes it importable without installing
mkdir -p /tmp/site_rlkv && ln -sfn "$PWD/trainer" /tmp/site_rlkv/rlkv_trainer
export PYTHONPATH=/tmp/site_train:/tmp/site_rlkv:$PYTHONPATH
python3 -c "import ray, math_verify, rlkv_trainer; print('ray', ray.__version__, 'math-verify ok')" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
echo "setup $(( $(date +%s) - t0 ))s"
left=$(( ${BUDGET:-560} - ($(date +%s) - t0) ))
timeout $left python3 benchmarks/train_study.py --model /tmp/llama8b --max-new-tokens 2048 --max-model-len 2560 \
  --train-timeout $(( left - 200 )) --stock-timeout 300 "$@" --out $OUT/train.json > $OUT/train.log 2>&1
echo "train study rc=$?"; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore|\(pid)" $OUT/train.log | tail -15
echo "total $(( $(date +%s) - t0 ))s"
