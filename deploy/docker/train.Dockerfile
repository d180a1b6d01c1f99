# syntax=docker/dockerfile:1
# Trainer image for Ray (KubeRay head, workers and the RayJob's driver alike): the vLLM OpenAI image, whose
# vLLM the rollout workers run, plus rlkv-vllm[train] (Ray, math-verify, datasets, ...). From the repo root:
#   docker build -f deploy/docker/train.Dockerfile -t rlkv-vllm-train:0.1.0 .
# Every pod of a Ray cluster must run the same Ray: it is pinned here and in deploy/k8s/training (rayVersion).
ARG VLLM_TAG=v0.26.0
FROM vllm/vllm-openai:${VLLM_TAG}

ARG RAY_VERSION=2.60.0
# KubeRay's health probes call wget inside the Ray containers; Ubuntu's archive keeps no old versions to pin
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
# ray[default]: the dashboard and job server that a RayJob submits through
RUN --mount=type=bind,target=/tmp/rlkv-src,rw \
    python3 -m pip install --no-cache-dir "/tmp/rlkv-src[train]" "ray[default]==${RAY_VERSION}"
# the shipped recipes at a fixed path, for `rlkv train --config /opt/rlkv/configs/...`
COPY trainer/configs/ /opt/rlkv/configs/

RUN useradd --no-log-init --create-home --uid 10001 rlkv
# numeric: Kubernetes runAsNonRoot can only verify a numeric user
USER 10001:10001
WORKDIR /home/rlkv
ENV HF_HOME=/home/rlkv/.cache/huggingface
# KubeRay gives every Ray container its command; the vLLM image's `vllm serve` entrypoint must not wrap it
ENTRYPOINT []
CMD ["bash"]
