#!/usr/bin/env bash
# A GPU session in as few device calls as possible: build, the test suite on CUDA tensors,
# compute-sanitizer (memcheck, racecheck) over the CUDA kernels, the benchmarks.
# Output lands in $OUT (the device tool's folder) or benchmarks/results/.
#
#   bash benchmarks/gpu_run.sh                  # all stages (may exceed one 10-min call)
#   bash benchmarks/gpu_run.sh build test       # stages: build test sanitize bench model
#   BENCH_ARGS="--sweep --model" bash benchmarks/gpu_run.sh bench
#
# The default benchmark preset is bounded (ConvMixer-1536/20 block, k = 3/7/9, fp32 and
# bf16, NCHW and channels_last, eval and fwd+bwd, eager / compile / cuda / triton) so
# that it fits one call; pass BENCH_ARGS for the full default set of python -m benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python}
STAGES=${*:-build test sanitize bench model}
BENCH_ARGS=${BENCH_ARGS:---shapes cm1536 --modes eval train_fwdbwd --providers eager compile cuda triton}
# whole model: ConvMixer-1536/20 (k=9) and a CIFAR-size one, training step (images/s, peak
# memory) and inference for eager / compile / fused / fused+pointwise (BN2 folded)
MODEL_ARGS=${MODEL_ARGS:---no-blocks --model --ks 9 --dtypes bfloat16}
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
if has build; then
  echo "== build"
  CONVMIXER_EXT_BUILD_EMU=1 $PY -m pip install --no-build-isolation --no-deps -e . \
    > "$RES/build.log" 2>&1 || { tail -30 "$RES/build.log"; exit 1; }
  grep -E "spill stores" "$RES/build.log" | sort | uniq -c | head
fi
if has test; then
  echo "== tests (CUDA tensors)"
  CONVMIXER_EXT_REQUIRE_BACKENDS=all-kernels $PY -m pytest -q -p no:cacheprovider tests \
    > "$RES/tests.log" 2>&1 || status=1
  tail -15 "$RES/tests.log"
fi
if has sanitize; then
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool"
    "$SAN" --tool "$tool" --error-exitcode 3 $PY benchmarks/sanitize_cases.py \
      > "$RES/sanitizer-$tool.log" 2>&1 || status=1
    tail -3 "$RES/sanitizer-$tool.log"
  done
fi
if has bench; then
  echo "== benchmarks: $BENCH_ARGS"
  # shellcheck disable=SC2086
  $PY -m benchmarks --out "$RES" $BENCH_ARGS > "$RES/bench.log" 2>&1 || status=1
  tail -60 "$RES/bench.log"
fi
if has model; then
  echo "== whole-model benchmark: $MODEL_ARGS"
  # shellcheck disable=SC2086
  $PY -m benchmarks --out "$RES" $MODEL_ARGS > "$RES/bench-model.log" 2>&1 || status=1
  tail -20 "$RES/bench-model.log"
fi
exit $status
