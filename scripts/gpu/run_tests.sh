#!/bin/bash
# Device side (lent GPU, vLLM 0.26.0): run tests. usage: bash scripts/gpu/run_tests.sh [pytest args]
# carry: [".carry/sm90", ".carry/fi", ".carry/s"]
set -uo pipefail
t0=$(date +%s)
source scripts/gpu/setup.sh || exit 1
echo "setup $(( $(date +%s) - t0 ))s"
python3 -m pytest -q -rA -p no:cacheprovider --timeout 560 "$@" 2>&1 | tee $OUT/pytest.log \
  | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|^E " | cut -c1-200
echo "total $(( $(date +%s) - t0 ))s"
