#!/bin/bash
# Device side, one call: GPU tests in parallel workers on the one GPU (engine tests keep vLLM's
# memory check low). carry: [".carry/sm90", ".carry/fi", ".carry/s", ".cache/rlkv-cuda"]
# usage: bash scripts/gpu/tests_call.sh [pytest args]   (default: the whole GPU-relevant suite)
# The whole suite does not fit one 10-minute call: the kernel tests (tests/ops, ~560 s with 8
# workers, mostly Triton compiles) and the engine tests (tests/backends tests/test_soak.py
# tests/test_config_errors.py; each starts engines, so fewer workers: WORKERS=4) go in two calls.
# Env: BUDGET (s, default 570), WORKERS (pytest -n, default 6), TEST_TIMEOUT (s per test, default 400).
# At BUDGET pytest gets SIGINT, so it still prints every failure's reason and its summary.
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
echo "setup $(( $(date +%s) - t0 ))s"
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(tests/ops tests/backends tests/test_soak.py tests/test_config_errors.py)
timeout -s INT -k 25 $(( ${BUDGET:-570} - ($(date +%s) - t0) - 25 )) python3 -m pytest -v -p no:cacheprovider \
  -n ${WORKERS:-6} --timeout ${TEST_TIMEOUT:-400} -rfE --tb=short --durations=15 "${args[@]}" 2>&1 \
  | tee $OUT/pytest.log | grep -E "(FAILED|ERROR|SKIPPED) |passed|failed|^E |Timeout|KeyboardInterrupt" | cut -c1-200 | tail -40
grep -c " PASSED " $OUT/pytest.log | sed 's/^/PASSED lines: /'
echo "total $(( $(date +%s) - t0 ))s"
