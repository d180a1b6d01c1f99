#!/bin/bash
# Device side, one call (~9 min): kernel tests on the GPU, CUDA-graph engine tests, kernel study.
# carry: [".carry/sm90", ".carry/fi", ".carry/s"]
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh || exit 1
echo "setup $(( $(date +%s) - t0 ))s"
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - t0) )); }
timeout $(( $(left) - 150 )) python3 -m pytest -q -rA -p no:cacheprovider --timeout 400 \
  tests/ops tests/backends/test_cuda_graphs.py "$@" 2>&1 | tee $OUT/pytest.log \
  | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|^E " | cut -c1-200
echo "tests done at $(( $(date +%s) - t0 ))s"
timeout $(( $(left) - 10 )) python3 benchmarks/kernel_study.py ${KSTUDY_ARGS:-} \
  --out $OUT/kernel-study.json 2>&1 | tee $OUT/kernel-study.log | grep -v "^ctx" | tail -5
grep "^ctx" $OUT/kernel-study.log | tail -30
echo "total $(( $(date +%s) - t0 ))s"
