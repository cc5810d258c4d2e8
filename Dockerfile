# syntax=docker/dockerfile:1
#
# packserve on NVIDIA GPUs.
#
#   docker build -t packserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v "$PWD/models:/models:ro" \
#       -e PACKSERVE_MODEL=/models/my-model -e PACKSERVE_API_KEY=change-me packserve:0.1.0
#
# Every `packserve serve` option has a PACKSERVE_* variable (serve/envs.py); arguments after the image name are
# passed to `packserve serve` too. See deploy/README.md.
#
# Torch and xformers are pinned as a pair: an xformers release loads its kernels only with the torch it was built
# for (0.0.35 <-> torch 2.10). Change the three ARGs together.
#
# The base is NVIDIA's CUDA "base" flavour (the CUDA runtime, cudart, without the math libraries): torch's cu128
# wheels bring their own cuBLAS/cuDNN/NCCL, so the "runtime" flavour's copies would only add ~2 GB. The host needs
# an NVIDIA driver for CUDA 12.8 and the NVIDIA container toolkit.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv holding CUDA torch, xformers and packserve (not editable).
FROM ${CUDA_IMAGE} AS build

ARG TORCH_VERSION=2.10.0
ARG XFORMERS_VERSION=0.0.35
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Ubuntu's package versions are fixed by the pinned base image tag; pinning each one here as well would break the
# build at every Ubuntu security update (old versions leave the archive), so DL3008 is ignored for apt only.
# g++: the CPU operators (kernels/csrc) are compiled here, with torch.utils.cpp_extension (ninja comes from pip).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The heavy layers first, so that code changes do not re-download torch: the CUDA build of torch from PyTorch's
# index (PyPI's default build may target another CUDA), then the xformers build for that torch.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "xformers==${XFORMERS_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY serve ./serve
COPY kernels ./kernels
COPY loadtest ./loadtest

# The README's install command for a GPU host (see its Deployment section): the same project, not editable, with
# the xformers extra instead of the test extra; torch stays pinned to the CUDA build installed above. The project is
# spelled "./" rather than "." because hadolint (DL3013) recognises only that form as a local path, not a package.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "xformers==${XFORMERS_VERSION}" "./[xformers]" \
    && packserve --help

# The CPU operators, built ahead for both ISA levels (AVX-512 and AVX2 builds run on any CPU of that level), so a
# container on a CPU host (or the CPU side of a GPU host) never compiles at start (the runtime stage has no g++).
# --ship puts them inside the venv (found first), where a cache volume mounted over the home folder (the Kubernetes
# manifests mount an emptyDir there) cannot hide them.
RUN PACKSERVE_CACHE_DIR=/tmp/packserve-build packserve build-kernels --isa all --ship \
    && rm -rf /tmp/packserve-build

# ---------------------------------------------------------------------------------------------------------------
# runtime: the venv, a non-root user, and a C compiler plus Python headers, which Triton needs at run time to build
# its small CUDA launcher the first time a kernel runs.
FROM ${CUDA_IMAGE} AS runtime

LABEL org.opencontainers.image.title="packserve" \
      org.opencontainers.image.description="LLM inference server with packed prefill (OpenAI-compatible API, Prometheus metrics)" \
      org.opencontainers.image.version="0.1.0"

ENV DEBIAN_FRONTEND=noninteractive

# Same reasoning as above for DL3008 (apt versions come from the pinned base image).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 packserve \
    && useradd --system --uid 10001 --gid packserve --create-home --home-dir /home/packserve packserve \
    && mkdir -p /models \
    && chown packserve:packserve /models

COPY --from=build /opt/venv /opt/venv

# Configuration is PACKSERVE_* variables (serve/envs.py); these are the image's defaults.
# PACKSERVE_HOST: listen on every interface (the server's own default, 127.0.0.1, is unreachable from outside).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/packserve \
    TRITON_CACHE_DIR=/home/packserve/.cache/triton \
    HF_HOME=/home/packserve/.cache/huggingface \
    PACKSERVE_HOST=0.0.0.0 \
    PACKSERVE_PORT=8000 \
    PACKSERVE_CACHE_DIR=/home/packserve/.cache/packserve

USER 10001:10001
WORKDIR /home/packserve

# Checkpoints (config.json + safetensors + tokenizer) are mounted here: PACKSERVE_MODEL=/models/<folder>.
VOLUME ["/models"]
EXPOSE 8000

# /health answers 200 while the engine is alive and 503 once it died or shutdown began; urlopen raises on both a
# refused connection and a non-2xx status. Python instead of curl: the image ships no curl. The start period covers
# model load (and the demo model's first build).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PACKSERVE_PORT', '8000'), timeout=4)"]

# The installed console script, exec form: it runs as PID 1 and receives SIGTERM directly (graceful drain).
ENTRYPOINT ["/opt/venv/bin/packserve", "serve"]
