#!/bin/bash
# Device side, one call (~9 min): kernel tests on the GPU (Triton + CUDA decode step, in
# parallel), the CUDA-graph engine tests, then the kernel study.
# carry: [".carry/sm90", ".carry/fi", ".carry/s", ".cache/rlkv-cuda"]
# prepare here: bash ../shared/gpu/prepare.sh; python -m rlkv_vllm.ops.cuda_build .cache/rlkv-cuda
# Env: BUDGET (s, default 580), KSTUDY_ARGS (kernel-study args), TEST_ARGS (extra test paths).
set -uo pipefail
t0=$(date +%s)
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - t0) )); }
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee $OUT/gpu.txt
echo "setup $(( $(date +%s) - t0 ))s"
timeout $(( $(left) - 330 )) python3 -m pytest -q -rA -p no:cacheprovider -n 8 --timeout 300 tests/ops \
  2>&1 | tee $OUT/pytest-ops.log | grep -E "^(FAILED|ERROR)|passed|failed|^E " | cut -c1-200 | tail -15
echo "op tests done at $(( $(date +%s) - t0 ))s"
timeout $(( $(left) - 120 )) python3 -m pytest -q -rA -p no:cacheprovider --timeout 300 \
  tests/backends/test_cuda_graphs.py ${TEST_ARGS:-} 2>&1 | tee $OUT/pytest-graphs.log \
  | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|^E " | cut -c1-200 | tail -15
echo "engine tests done at $(( $(date +%s) - t0 ))s"
unset TRITON_F32_DEFAULT  # bf16 timing: vLLM's defaults
timeout $(( $(left) - 5 )) python3 benchmarks/kernel_study.py --deadline-s $(( $(left) - 40 )) ${KSTUDY_ARGS:-} \
  --out $OUT/kernel-study.json > $OUT/kernel-study.log 2>&1
echo "kernel study rc=$? at $(( $(date +%s) - t0 ))s"; grep -E "^ctx|unavailable|Error" $OUT/kernel-study.log | tail -14
