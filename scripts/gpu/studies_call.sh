#!/bin/bash
# Device side, one call (<= 10 min): the kernel study, then the engine study (configs in
# order until the call's budget is spent). usage: bash scripts/gpu/studies_call.sh CONFIG...
# carry: [".carry/sm90", ".carry/fi", ".carry/s", ".carry/data"]
# prepare here: bash ../shared/gpu/prepare.sh; mkdir -p .carry/data && cp ../shared/data/head-patterns/rlkv/DeepSeek-R1-Distill-Llama-8B.tsv .carry/data/
# KSTUDY_ARGS: kernel-study args; KSTUDY_S: its time cap (s); STUDY_ARGS: extra engine args.
# Results: $OUT/kernel-study.json, $OUT/engine.json and their logs.
set -uo pipefail
t0=$(date +%s)
left() { echo $(( ${BUDGET:-575} - ($(date +%s) - t0) )); }
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
unset TRITON_F32_DEFAULT  # bf16 timing runs: vLLM's defaults
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee $OUT/gpu.txt
echo "setup $(( $(date +%s) - t0 ))s"
timeout $(( ${KSTUDY_S:-150} + 60 )) python3 benchmarks/kernel_study.py --deadline-s ${KSTUDY_S:-150} ${KSTUDY_ARGS:-} \
  --out $OUT/kernel-study.json > $OUT/kernel-study.log 2>&1
echo "kernel study rc=$? at $(( $(date +%s) - t0 ))s"; grep "^ctx" $OUT/kernel-study.log | tail -12
python3 benchmarks/engine_study.py --model /tmp/llama8b --load-format dummy \
  --pattern .carry/data/DeepSeek-R1-Distill-Llama-8B.tsv --dtype bfloat16 --gpu-mem 0.9 \
  --max-num-seqs 512 --max-model-len 4096 --num-prompts 256 --input-len 1024 --output-len 2048 \
  ${STUDY_ARGS:-} --configs "$@" --deadline-s $(( $(left) - 5 )) \
  --out $OUT/engine.json > $OUT/engine.log 2>&1
echo "engine study rc=$?"; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/engine.log | tail -20
echo "total $(( $(date +%s) - t0 ))s"
