# Both targets do all set-up themselves on a fresh machine: a venv in .venv, then the install.
# TORCH is the torch requirement installed first, TORCH_INDEX the package index it comes from:
#   make test                                                      torch==2.13.0 from PyPI (on Linux x86_64 PyPI's
#                                                                  wheel is the CUDA build, several GB, with its triton)
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu      the CPU build (no GPU needed; triton from PyPI)
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ    one CUDA build (the indexes pytorch.org lists)
# (This project's machines carry the CPU wheel of torch 2.13.0 locally, which pip takes for the default.)
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# timm (the real-model tests) and the torchvision it imports: --no-deps and pinned, so they can never pull another
# torch (torchvision 0.28.0 is the release built for torch 2.13.0; it comes from TORCH_INDEX, as torch does).
# Next to a CPU torch from PyPI's CUDA torchvision, tests/helpers.import_timm lets its Python side import.
TORCHVISION ?= torchvision==0.28.0
TIMM ?= timm==1.0.31
VENV := .venv
PY := $(VENV)/bin/python
# Without a CUDA device the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py decides).
PYTEST_ARGS ?= -n 2

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev,demo]"
	$(PY) -m pip install -q --no-deps "$(TORCHVISION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --no-deps "$(TIMM)"
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
