#!/usr/bin/env bash
# A GPU session in as few device calls as possible: install the way a user does, check it,
# run the test suite on CUDA tensors, compute-sanitizer over the CUDA kernels, CUDA-graph
# capture of a training step, the benchmarks. Output lands in $OUT (the device tool's
# folder) or benchmarks/results/.
#
#   bash benchmarks/gpu_run.sh                  # all stages (may exceed one 10-min call)
#   bash benchmarks/gpu_run.sh build test       # stages: build test sanitize graph bench passes
#                                               #         model static (predicted vs measured)
#   BENCH_ARGS="--sweep --model" bash benchmarks/gpu_run.sh bench
#
# Within a 15-minute device budget: benchmarks/gpu_session.sh (two calls, time caps set).
#
# build: a wheel carried in dist/ (built elsewhere: `make wheel`, then copy build/wheel/*.whl
# to dist/) is installed as is — the cross-version test of one build; otherwise
# `pip install --no-build-isolation --no-deps .` (a user's install on a machine without
# network). Never editable. Then `python -m convmixer_ext` must report the CUDA and Triton
# backends available and its probes passing, or the run stops here.
# Every later stage imports the installed package: Python runs from build/gpu-run, where
# only `benchmarks` (a link) is importable besides site-packages.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python}
STAGES=${*:-build test sanitize graph bench passes model static}
BENCH_ARGS=${BENCH_ARGS:---shapes cm1536 --modes eval train_fwdbwd --providers eager compile auto cuda triton triton_tc}
# whole model: ConvMixer-1536/20 (k=9) and a CIFAR-size one, training step (images/s, peak
# memory) and inference for eager / compile / auto / fused+pointwise (BN2 folded)
MODEL_ARGS=${MODEL_ARGS:---no-blocks --model --ks 9 --dtypes bfloat16}
# Per-stage wall-clock caps in seconds (0: none), so that one device call ends with every
# stage's output even when a stage runs long: T_TEST=180 T_BENCH=150 ... A capped stage is
# interrupted with SIGINT (the benchmark keeps the cases measured so far).
cap() { local t=$1; shift; if [[ ${t:-0} -gt 0 ]]; then timeout -s INT -k 10 "$t" "$@"; else "$@"; fi; }
# The CUDA-tensor test run: in parallel where pytest-xdist is there; the tests that only
# compile for targets or build (no GPU needed, run by CI) are left out.
TEST_PATHS=${TEST_PATHS:-$ROOT/tests}   # (a call with little device time: a few test files)
TEST_ARGS=${TEST_ARGS:---ignore=$ROOT/tests/test_targets.py --ignore=$ROOT/tests/test_static.py --ignore=$ROOT/tests/test_build.py --ignore=$ROOT/tests/test_benchmarks.py}
# (each worker with its share of the cores: OpenMP's spinning threads, 16 per worker, made
# two CPU gradchecks of 0.3 s run past 150 s under 12 workers)
if $PY -c "import xdist" 2>/dev/null; then
  TEST_ARGS="-n ${TEST_WORKERS:-8} $TEST_ARGS"
  TEST_OMP=$(( $(nproc) / ${TEST_WORKERS:-8} > 0 ? $(nproc) / ${TEST_WORKERS:-8} : 1 ))
fi
if $PY -c "import pytest_timeout" 2>/dev/null; then TEST_ARGS="--timeout 150 $TEST_ARGS"; fi
RUN=$ROOT/build/gpu-run
mkdir -p "$RUN"
ln -sfn "$ROOT/benchmarks" "$RUN/benchmarks"
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
inpkg() { (cd "$RUN" && "$@"); }   # run with the installed package, not the source tree
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
if has build; then
  echo "== build"
  whl=$(ls dist/convmixer_ext-*.whl 2>/dev/null | head -1)
  if [[ -n "$whl" ]]; then
    echo "installing the carried wheel $whl"
    $PY -m pip install --no-deps --force-reinstall "$whl" > "$RES/build.log" 2>&1
  else
    $PY -m pip install --no-build-isolation --no-deps . > "$RES/build.log" 2>&1
  fi || { tail -30 "$RES/build.log"; exit 1; }
  inpkg $PY -m convmixer_ext | tee "$RES/selfcheck.txt"
  inpkg $PY - <<'EOF' || { echo "FAILED: a backend that must be there is missing"; exit 1; }
import convmixer_ext as cx
av = cx.available_backends()
missing = {b: av[b] for b in ("cuda", "triton") if av[b] is not True}
assert not missing, missing
EOF
fi
if has test; then
  echo "== tests (CUDA tensors)"
  # one process collects first (importing, assertion-rewriting and caching the test modules
  # and plugins), then the workers start: on a fresh machine 12 workers collecting at once
  # once spent a whole 75 s stage limit importing hypothesis
  (cd "$RUN" && cap 60 $PY -m pytest --collect-only -q -p no:cacheprovider \
    --rootdir="$ROOT" -c "$ROOT/pyproject.toml" $TEST_PATHS > "$RES/collect.log" 2>&1) || true
  # shellcheck disable=SC2086
  (cd "$RUN" && if [[ -n ${TEST_OMP:-} ]]; then export OMP_NUM_THREADS=$TEST_OMP; fi &&
    CONVMIXER_EXT_FAILURE_LOG="$RES/test-failures.log" \
    CONVMIXER_EXT_REQUIRE_BACKENDS=all-kernels cap "${T_TEST:-0}" $PY -m pytest -rfE \
    -p no:cacheprovider $TEST_ARGS --rootdir="$ROOT" -c "$ROOT/pyproject.toml" $TEST_PATHS) \
    > "$RES/tests.log" 2>&1 || status=1
  tail -15 "$RES/tests.log"
fi
if has sanitize; then
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    echo "== compute-sanitizer $tool"
    quick=0; [[ $tool == racecheck ]] && quick=1   # racecheck: the smaller case set
    SANITIZE_QUICK=$quick inpkg cap "${T_SANITIZE:-0}" "$SAN" --tool "$tool" --error-exitcode 3 $PY "$ROOT/benchmarks/sanitize_cases.py" \
      > "$RES/sanitizer-$tool.log" 2>&1 || status=1
    tail -3 "$RES/sanitizer-$tool.log"
  done
fi
if has graph; then
  echo "== CUDA-graph capture of a training step"
  inpkg cap "${T_GRAPH:-0}" $PY -m benchmarks.graph_check > "$RES/graph.log" 2>&1 || status=1
  tail -8 "$RES/graph.log"
fi
if has bench; then
  echo "== benchmarks: $BENCH_ARGS"
  # shellcheck disable=SC2086
  inpkg cap "${T_BENCH:-0}" $PY -m benchmarks --out "$RES" $BENCH_ARGS > "$RES/bench.log" 2>&1 || status=1
  tail -60 "$RES/bench.log"
fi
if has passes; then
  echo "== per-pass times (F1, F2, B1, B2 of each kernel backend, alone)"
  inpkg cap "${T_PASSES:-0}" $PY -m benchmarks.passes --out "$RES" ${PASSES_ARGS:-} \
    > "$RES/passes.log" 2>&1 || status=1
  tail -8 "$RES/passes.log"
fi
if has static; then
  echo "== static report: predicted against measured"
  measured=$(ls "$RES"/*.json 2>/dev/null | grep -v -e static -e predicted -e -model)
  # shellcheck disable=SC2086
  inpkg cap "${T_STATIC:-0}" $PY -m benchmarks.static --shapes cm1536 --json "$RES/static.json" \
    --md "$RES/static-vs-measured.md" ${measured:+--measured $measured} > "$RES/static.log" \
    2>&1 || status=1
  grep -A40 "Measured against predicted" "$RES/static-vs-measured.md" | head -40
fi
if has model; then
  echo "== whole-model benchmark: $MODEL_ARGS"
  # shellcheck disable=SC2086
  inpkg cap "${T_MODEL:-0}" $PY -m benchmarks --out "$RES" $MODEL_ARGS > "$RES/bench-model.log" 2>&1 || status=1
  tail -20 "$RES/bench-model.log"
fi
exit $status
