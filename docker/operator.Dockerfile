# syntax=docker/dockerfile:1
# The kvflock operator image: slim Python, kvflock, and only what `kvflock operator` imports
# (kopf, the kubernetes client, pydantic, PyYAML, prometheus-client) -- no torch. Runs as a non-root user.
# Build from the repository root after `make wheel` (docs/images.md):
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kvflock/operator:0.1.0 .
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
# At the locked versions; tests/helm/test_images.py checks that `kvflock operator` needs nothing else.
ARG OPERATOR_PACKAGES="kopf kubernetes pydantic pyyaml prometheus-client"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kvflock
# kvflock's wheel as `make wheel` builds it and `make wheel-check` tests it; without its
# dependencies (torch, transformers), which the operator never imports.
COPY requirements/lock.txt /tmp/kvflock/lock.txt
COPY dist/ /tmp/kvflock/dist/
RUN /opt/kvflock/bin/pip install --constraint /tmp/kvflock/lock.txt ${OPERATOR_PACKAGES} \
 && /opt/kvflock/bin/pip install --no-deps /tmp/kvflock/dist/kvflock-*-py3-none-any.whl

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/kvflock /opt/kvflock
ENV PATH=/opt/kvflock/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that the kubelet can check runAsNonRoot.
USER 65532:65532
ENTRYPOINT ["kvflock"]
CMD ["operator"]
