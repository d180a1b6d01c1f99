#!/usr/bin/env bash
# Set up (if needed), then serve a tiny local model with RLKV at sparsity 0.5, send one
# chat request through the openai client, print the answer and the KV capacity gain.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec .venv/bin/rlkv demo "$@"
