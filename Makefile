# The two commands of the README. Both set up .venv (if absent), install torch and the
# test/bench dependencies, build the package in place (the CUDA kernel library when nvcc
# is found, plus the host-emulation build of the same kernels), then test or benchmark.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy pytest pytest-xdist hypothesis timm ninja matplotlib tqdm pytest-benchmark \
        scikit-learn "setuptools>=70.1" wheel
# The oldest supported pair (the GPU image's): a second venv for `make test-compat`.
COMPAT_VENV ?= .venv-compat
CPY := $(COMPAT_VENV)/bin/python
COMPAT_SPEC ?= torch==2.11.0 triton==3.6.0
# triton 3.6's interpreter needs numpy < 2.4 (see backends._interpreter_problem)
COMPAT_DEPS := "numpy<2.4" pytest pytest-xdist hypothesis
COMPAT_TESTS := tests/test_passes.py tests/test_errors.py tests/test_build.py \
                tests/test_limits.py tests/test_dispatch.py tests/test_opcheck.py \
                tests/test_selfcheck.py
# nvcc on PATH may be a wrapper script: point the build at the real toolkit root.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
# Compiled libraries kept under a key of their compile command, compiler and sources
# (setup.py): `make wheel` after `make build` copies them instead of compiling the same
# source again. BUILD_CACHE= turns it off.
BUILD_CACHE ?= $(CURDIR)/build/lib-cache
export CONVMIXER_EXT_BUILD_CACHE := $(BUILD_CACHE)
# Kernel backends whose absence fails the tests instead of skipping them.
REQUIRE ?= all-kernels
# `make test` runs the suite in this many processes (one core each), test by test in the
# order tests/conftest.py sets, but for the two sets of files it keeps in one process each
# (the real-target compiles with the static report; the emulated CUDA blocks): --dist
# loadscope with the scopes tests/conftest.py draws; 1: serially.
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope \
         --no-loadscope-reorder,)

# The build's switches: the emulation library always, a CUDA build that fails stops here when
# a toolkit is found (a user's `pip install .` drops it with a notice instead).
BUILD_FLAGS := CONVMIXER_EXT_BUILD_EMU=1 $(if $(CUDA_HOME),CONVMIXER_EXT_BUILD_CUDA=1)

.PHONY: setup libraries build test asan-lib test-asan wheel compat-setup test-compat bench clean

$(VENV)/.deps-stamp: pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

setup: $(VENV)/.deps-stamp

# The kernel libraries compiled into the build cache (setup.py's compile_libraries: no
# torch, no setuptools, so `make -j2 build` runs it beside the venv's install); the install
# then copies them.
libraries:
	$(BUILD_FLAGS) $(PYTHON) -c "import setup, sys; sys.exit(setup.compile_libraries())"

build: setup libraries
	$(BUILD_FLAGS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(if $(XDIST),OMP_NUM_THREADS=1) CONVMIXER_EXT_REQUIRE_BACKENDS=$(REQUIRE) \
	  $(VPY) -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

# The CUDA kernels' host-emulation build under AddressSanitizer + UBSan (memory safety of
# global and shared-memory accesses without a GPU).
asan-lib:
	bash tests/asan.sh --build

test-asan: build
	bash tests/asan.sh $(VPY)

# The wheel a user's `pip install .` builds: isolated (setuptools only, no torch in the
# build environment), py3-none-<platform>, CUDA kernels for sm_80/sm_90 + PTX.
wheel: setup libraries
	rm -rf build/wheel
	CONVMIXER_EXT_BUILD_EMU=1 $(VPY) -m pip wheel -q --no-deps -w build/wheel .
	$(VPY) tests/check_wheel.py build/wheel/*.whl

# That one wheel installed next to the oldest supported torch + triton: the kernel tests
# run against the installed wheel (from build/, so the source tree does not shadow it),
# then the covering set's code paths (every value of every constexpr, five kernel sizes:
# benchmarks/targets.py, PATHS_KS) are compiled for sm_90 by that triton, the GPU image's
# version (the benchmark shapes' own specializations, 40% more compiles, by make test's).
$(COMPAT_VENV)/.deps-stamp: Makefile
	test -x $(CPY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(CPY) -m pip install -q $(COMPAT_SPEC) $(COMPAT_DEPS)
	touch $@

compat-setup: $(COMPAT_VENV)/.deps-stamp

test-compat: wheel compat-setup
	$(CPY) -m pip install -q --force-reinstall --no-deps build/wheel/*.whl
	cd build && $(if $(XDIST),OMP_NUM_THREADS=1) CONVMIXER_EXT_REQUIRE_BACKENDS=$(REQUIRE) \
	  ../$(CPY) -m pytest -q -p no:cacheprovider $(XDIST) --rootdir=.. -c ../pyproject.toml \
	  $(addprefix ../,$(COMPAT_TESTS)) -k "not timm and not folded_model"
	PYTHONPATH=. $(CPY) -m benchmarks.targets --set paths --arch 90 \
	  --json build/targets-compat.json

bench: build
	$(VPY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info convmixer_ext/*.so convmixer_ext/_build_info.py benchmarks/out
