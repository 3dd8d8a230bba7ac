# syntax=docker/dockerfile:1
# The kvfleet operator image: slim Python, kvfleet, and only what `kvfleet operator` imports
# (kopf, the kubernetes client, pydantic, PyYAML, prometheus-client) -- no torch. Runs as a non-root user.
# Build from the repository root (docs/images.md):
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kvfleet/operator:0.1.0 .
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
# Installed with the version ranges of pyproject.toml; tests/helm/test_images.py checks that
# `kvfleet operator` needs nothing else.
ARG OPERATOR_PACKAGES="kopf kubernetes pydantic pyyaml prometheus-client"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kvfleet
WORKDIR /src
# setuptools builds every package pyproject.toml lists, so all of them come in.
COPY pyproject.toml README.md ./
COPY kvfleet/ kvfleet/
COPY operator/ operator/
COPY worker/ worker/
COPY kernels/ kernels/
RUN python - > requirements.txt <<'PY'
import os, re, sys, tomllib

wanted = set(os.environ["OPERATOR_PACKAGES"].split())
found = set()
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
    if name in wanted:
        found.add(name)
        print(requirement)
if wanted - found:
    sys.exit(f"OPERATOR_PACKAGES: {sorted(wanted - found)} are not dependencies in pyproject.toml")
PY
RUN /opt/kvfleet/bin/pip install -r requirements.txt \
 && /opt/kvfleet/bin/pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/kvfleet /opt/kvfleet
ENV PATH=/opt/kvfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that the kubelet can check runAsNonRoot.
USER 65532:65532
ENTRYPOINT ["kvfleet"]
CMD ["operator"]
