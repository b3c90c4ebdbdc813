# Every target sets up what it needs from nothing: a venv in .venv with the pinned dependencies,
# the package installed editable, the extension hpml_ops._C built in place (incrementally).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-stamp
EXT := build/.ext-stamp
# hpml_ops/ops/schema.py: the list of ops and their schemas, from which setup.py writes the C++ one.
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') \
  hpml_ops/ops/schema.py setup.py pyproject.toml
# Every benchmark program (benchmarks/bench_<stem>.py, one per op and one per whole step).
BENCHES := $(sort $(wildcard benchmarks/bench_*.py))

# /usr/local/bin/nvcc may be a wrapper; the toolkit is /usr/local/cuda (setup.py finds it too).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: setup build test train bench gpu-build-check lint format clean

setup: $(DEPS)

$(DEPS): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	HPML_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(EXT)

# The full compiler output (nvcc -Xptxas=-v: registers, spills, shared memory) stays in
# build/build.log; the console shows what was built and why.
$(EXT): $(DEPS) $(SOURCES)
	mkdir -p build
	@echo "building hpml_ops._C (log: build/build.log)"
	@if ! $(PY) setup.py build_ext --inplace > build/build.log 2>&1; then \
	  tail -n 60 build/build.log; echo "build failed: see build/build.log"; exit 1; fi
	@grep -E '^\[hpml_ops build\]' build/build.log || true
	touch $@

# The whole suite on the best ISA variant of the CPU kernels this CPU runs, then the C++ kernels'
# tests under each variant below it (ATEN_CPU_CAPABILITY, tools/test_cpu_variants.py).
test: $(EXT)
	$(PY) -m pytest -q
	$(PY) tools/test_cpu_variants.py

# The README's main command: an MLP with batch norm on scikit-learn's breast-cancer data, trained
# with the fused ops (cpp on CPU, triton on a GPU) and, from the same initial weights and data
# order, in plain PyTorch; prints the comparison table and writes runs/breast_cancer/ (metrics.json,
# train.png, checkpoint.pt). One thread: a 30-64-32-1 MLP at batch 32 is far too small for
# intra-op threads to help, and on a shared machine they make the timing erratic.
train: $(EXT)
	$(PY) -m hpml_ops.train --dataset breast_cancer --compare-reference --warmup-steps 30 \
	  --threads 1 --log-every 5 --out runs/breast_cancer

bench: $(EXT)
	for b in $(BENCHES); do $(PY) $$b; done

gpu-build-check: $(EXT)
	$(PY) tools/gpu_build_check.py

lint: $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(DEPS)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build hpml_ops/*.so .pytest_cache
