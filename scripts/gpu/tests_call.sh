#!/bin/bash
# Device side, one call: the GPU test suite (engine tests: eager, CUDA graphs, gated, bf16/fp16).
# carry: [".carry/sm90", ".carry/fi", ".carry/s"]
# usage: bash scripts/gpu/tests_call.sh [pytest args]   (default: the backend tests)
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh || exit 1
echo "setup $(( $(date +%s) - t0 ))s"
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(tests/backends)
timeout $(( ${BUDGET:-570} - ($(date +%s) - t0) )) python3 -m pytest -q -rA -p no:cacheprovider \
  --timeout 400 "${args[@]}" 2>&1 | tee $OUT/pytest.log \
  | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|^E " | cut -c1-200
echo "total $(( $(date +%s) - t0 ))s"
