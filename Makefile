# The README's two commands:
#   make bench  -- virtual environment, install, the headline benchmark on this device
#                  (python -m sparsevit bench: block-sparse MLPs, DynamicViT, fused masked
#                  attention on a GPU, each vs dense; table, JSON and PNG in $(BENCH_OUT));
#                  BENCH_FLAGS= (empty) for the full run instead of --quick
#   make test   -- virtual environment, install with the test extra (the extension's
#                  C++ CPU kernels built wherever there is a C++ compiler, its CUDA
#                  kernels when a toolkit is present), the whole test suite
# On a machine whose Python already has torch (e.g. a GPU box without network):
#   make test SYSTEM_PYTHON=1   uses python3 as it is, installing nothing from the network.

PYTHON ?= python3
VENV ?= .venv
MAX_JOBS ?= $(shell nproc)
BENCH_OUT ?= bench-out
BENCH_FLAGS ?= --quick
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

.PHONY: install test bench gpu-check clean

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
	$(PY) -m sparsevit bench $(BENCH_FLAGS) --out $(BENCH_OUT)

# On a GPU machine whose python3 already has torch/Triton: build, the self-test of every
# op and backend on the GPU (python -m sparsevit check), every test on the GPU,
# compute-sanitizer (memcheck, racecheck) over the CUDA-backend tests, then the full
# suites and the headline benchmark; logs and JSON go to $(GPU_OUT).
GPU_OUT ?= gpu-out
SUITES ?= tokens blocksparse attention
gpu-check:
	mkdir -p $(GPU_OUT)
	$(MAKE) install SYSTEM_PYTHON=1 > $(GPU_OUT)/build.log 2>&1 || (tail -50 $(GPU_OUT)/build.log; exit 1)
	$(PYTHON) -m sparsevit check --device cuda --json $(GPU_OUT)/check.json > $(GPU_OUT)/check.log 2>&1; echo "check exit $$?"; tail -25 $(GPU_OUT)/check.log
	$(PYTHON) -m sparsevit info --json $(GPU_OUT)/info.json > $(GPU_OUT)/info.log 2>&1; grep -A6 "GPU architecture" $(GPU_OUT)/info.log
	$(PYTHON) -m pytest tests -q -p no:cacheprovider > $(GPU_OUT)/tests.log 2>&1; tail -3 $(GPU_OUT)/tests.log
	for tool in memcheck racecheck; do \
	  compute-sanitizer --tool $$tool --error-exitcode 9 $(PYTHON) -m pytest tests/ops -q -k cuda -p no:cacheprovider \
	    > $(GPU_OUT)/sanitizer-$$tool.log 2>&1; echo "$$tool exit $$?"; tail -2 $(GPU_OUT)/sanitizer-$$tool.log; \
	done
	for suite in $(SUITES); do \
	  $(PYTHON) benchmarks/run.py --suite $$suite --out $(GPU_OUT)/$$suite.json > $(GPU_OUT)/$$suite.log 2>&1; tail -40 $(GPU_OUT)/$$suite.log; \
	done
	$(PYTHON) -m sparsevit bench --out $(GPU_OUT) > $(GPU_OUT)/bench.log 2>&1; tail -25 $(GPU_OUT)/bench.log

clean:
	rm -rf build *.egg-info sparsevit/_C*.so $(BENCH_OUT)
