#!/usr/bin/env bash
# One call on a GPU machine does it all: build, the test suite on CUDA tensors,
# compute-sanitizer (memcheck, racecheck) over the CUDA kernels, the benchmarks.
# Everything lands in $OUT (the device tool's folder) or benchmarks/results/.
#   BENCH_ARGS="--sweep --model" bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python}
status=0
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
echo "== build"
CONVMIXER_EXT_BUILD_EMU=1 $PY -m pip install --no-build-isolation --no-deps -e . \
  > "$RES/build.log" 2>&1 || { tail -30 "$RES/build.log"; exit 1; }
echo "== tests (CUDA tensors)"
CONVMIXER_EXT_REQUIRE_BACKENDS=all-kernels $PY -m pytest -q -p no:cacheprovider tests \
  > "$RES/tests.log" 2>&1 || status=1
tail -5 "$RES/tests.log"
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
for tool in memcheck racecheck; do
  echo "== compute-sanitizer $tool"
  "$SAN" --tool "$tool" --error-exitcode 3 $PY benchmarks/sanitize_cases.py \
    > "$RES/sanitizer-$tool.log" 2>&1 || status=1
  tail -3 "$RES/sanitizer-$tool.log"
done
echo "== benchmarks"
$PY -m benchmarks --out "$RES" ${BENCH_ARGS:-} > "$RES/bench.log" 2>&1 || status=1
tail -40 "$RES/bench.log"
exit $status
