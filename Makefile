# The README's two commands:
#   make bench  -- virtual environment, install, quick benchmark on this device, table
#   make test   -- virtual environment, install with the test extra (CUDA extension
#                  built when a toolkit is present), the whole test suite
# On a machine whose Python already has torch (e.g. a GPU box without network):
#   make test SYSTEM_PYTHON=1   uses python3 as it is, installing nothing from the network.

PYTHON ?= python3
VENV ?= .venv
MAX_JOBS ?= $(shell nproc)
BENCH_OUT ?= bench-out
export MAX_JOBS

ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST
endif

ifeq ($(SYSTEM_PYTHON),1)
PY := $(PYTHON)
DEPS_STAMP :=
else
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
endif

.PHONY: install test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the CUDA extension compiles against the torch already installed.
$(VENV)/.deps-installed: setup.py | $(VENV)/bin/python
	$(PY) -m pip install --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -m pip install "torch>=2.4" numpy
	touch $@

install: $(DEPS_STAMP)
ifeq ($(SYSTEM_PYTHON),1)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
else
	$(PY) -m pip install --no-build-isolation -e ".[test,bench]"
endif

test: install
	$(PY) -c "import sparsevit; sparsevit.backends()"
	$(PY) -m pytest tests

bench: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/run.py --suite tokens --quick --out $(BENCH_OUT)/tokens.json

clean:
	rm -rf build *.egg-info sparsevit/_C*.so $(BENCH_OUT)
