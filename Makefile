# Both targets do all set-up themselves on a fresh machine: a venv in .venv, then the install.
# TORCH picks the torch build: the default is the CPU wheel this project's machines carry;
# on a GPU machine use e.g. `make test TORCH=torch` for a CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# Without a CUDA device the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py decides).
PYTEST_ARGS ?= -n 2

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m scratchops verify
	$(PY) -m scratchops demo --min-accuracy 0.95

bench: setup
	$(PY) -m scratchops bench

clean:
	rm -rf $(VENV) build *.egg-info
