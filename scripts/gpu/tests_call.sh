#!/bin/bash
# Device side, one call: the GPU test suite (kernel tests, engine tests: eager, CUDA graphs, gated,
# bf16/fp16, soak), in parallel workers on the one GPU (engine tests keep vLLM's memory check low).
# carry: [".carry/sm90", ".carry/fi", ".carry/s", ".cache/rlkv-cuda"]
# usage: bash scripts/gpu/tests_call.sh [pytest args]   (default: the whole GPU-relevant suite)
# Env: BUDGET (s, default 570), WORKERS (pytest -n, default 6).
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
echo "setup $(( $(date +%s) - t0 ))s"
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(tests/ops tests/backends tests/test_soak.py tests/test_config_errors.py)
timeout $(( ${BUDGET:-570} - ($(date +%s) - t0) )) python3 -m pytest -v -p no:cacheprovider -n ${WORKERS:-6} \
  --timeout 400 "${args[@]}" 2>&1 | tee $OUT/pytest.log \
  | grep -E "(PASSED|FAILED|ERROR|SKIPPED) |passed|failed|^E " | grep -vE " PASSED " | cut -c1-200 | tail -30
grep -c " PASSED " $OUT/pytest.log | sed 's/^/PASSED lines: /'
echo "total $(( $(date +%s) - t0 ))s"
