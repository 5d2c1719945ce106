# The two commands of the README. Both set up .venv (if absent), install torch and the
# test/bench dependencies, build the package in place (CUDA kernels when nvcc is found,
# plus the host-emulation build of the same kernels), then test or benchmark.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy pytest hypothesis timm ninja matplotlib tqdm pytest-benchmark scikit-learn
# nvcc on PATH may be a wrapper script: point torch at the real toolkit root.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
# Kernel backends whose absence fails `make test` instead of skipping their tests.
REQUIRE ?= all-kernels

.PHONY: setup build test test-asan bench clean

$(VENV)/.deps-stamp: pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

setup: $(VENV)/.deps-stamp

build: setup
	CONVMIXER_EXT_BUILD_EMU=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	CONVMIXER_EXT_REQUIRE_BACKENDS=$(REQUIRE) $(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The CUDA kernels' host-emulation build under AddressSanitizer + UBSan (memory safety of
# global and shared-memory accesses without a GPU).
test-asan: build
	bash tests/asan.sh $(VPY)

bench: build
	$(VPY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info convmixer_ext/*.so convmixer_ext/_build_info.py benchmarks/out
