# syntax=docker/dockerfile:1
# Serving image (GPU): the official vLLM OpenAI image plus rlkv-vllm; the entrypoint runs `vllm serve`
# with --attention-backend picked for the image's vLLM. From the repo root:
#   docker build -f deploy/docker/serve.Dockerfile -t rlkv-vllm-serve:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 -v "$PWD/pattern.json:/etc/rlkv/pattern.json:ro" \
#     rlkv-vllm-serve:0.1.0 deepseek-ai/DeepSeek-R1-Distill-Llama-8B --max-model-len 32768
# v0.26.0 is the vLLM that RLKV's GPU results were measured on; any tag of 0.26-0.33 builds the same way.
ARG VLLM_TAG=v0.26.0
FROM vllm/vllm-openai:${VLLM_TAG}

# a head pattern to bake in: a file name in deploy/docker/patterns/ (empty: mount one at run time)
ARG RLKV_PATTERN=""

# rlkv-vllm from this source tree (it is not on PyPI); the bind mount keeps the source out of the layers,
# and vLLM stays the image's own (rlkv-vllm does not depend on it)
RUN --mount=type=bind,target=/tmp/rlkv-src,rw \
    python3 -m pip install --no-cache-dir /tmp/rlkv-src

COPY deploy/docker/entrypoint.py /usr/local/bin/rlkv-entrypoint
COPY deploy/docker/patterns/ /opt/rlkv/patterns/
# the base image runs as root: serve as an unprivileged user, its caches (Hugging Face, Triton) in its home
RUN useradd --no-log-init --create-home --uid 10001 rlkv \
    && mkdir -p /etc/rlkv /home/rlkv/.cache/huggingface \
    && if [ -n "$RLKV_PATTERN" ]; then cp "/opt/rlkv/patterns/$RLKV_PATTERN" /etc/rlkv/pattern.json; fi \
    && chown -R rlkv:rlkv /home/rlkv/.cache
# numeric: Kubernetes runAsNonRoot can only verify a numeric user
USER 10001:10001
ENV HF_HOME=/home/rlkv/.cache/huggingface \
    RLKV_HEADS=/etc/rlkv/pattern.json \
    RLKV_SPARSITY=0.5

EXPOSE 8000
# model download and load take minutes: unhealthy only after the start period
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "/usr/local/bin/rlkv-entrypoint"]
CMD []
