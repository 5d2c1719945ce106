#!/usr/bin/env bash
# A whole GPU session in two calls of about 9 minutes each (a 15-minute device budget, as
# the device tool lends it): each call runs benchmarks/gpu_run.sh stages under time caps
# and packs what they wrote into one archive, $OUT/results.tgz (the tool returns at most 8
# files). Carry dist/ (a wheel from `make wheel`) to test the one-build-every-torch claim;
# without it the call builds with `pip install --no-build-isolation --no-deps .`.
#
#   bash benchmarks/gpu_session.sh 1   # suite, sanitizers, graph capture, block benchmark
#   bash benchmarks/gpu_session.sh 2   # per-pass times, k = 15..31, torch.compile at k=9,
#                                      # whole model, static report against all of it
#
# Timings of the first session (H200, 2026-11-26): machine start ~30 s, install and
# self-check ~40 s, the suite ~170 s on 12 workers, memcheck ~30 s, racecheck > 35 s
# (its quick set), graph check ~40 s, the block benchmark ~2 s per case (torch.compile
# ~30 s per case more).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:?"which call: 1 or 2"}
DEST=${OUT:?"OUT must name the folder that comes back"}
RES=$(mktemp -d)
export OUT=$RES PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
status=0
case "$CALL" in
  1)
    TEST_WORKERS=12 T_TEST=190 T_SANITIZE=40 SANITIZE_TOOLS="memcheck racecheck" T_GRAPH=60 \
    T_BENCH=130 BENCH_ARGS="--shapes cm1536 --modes eval train_fwdbwd --providers eager \
auto cuda triton triton_tc --dtypes bfloat16 float32" \
      timeout -k 5 530 bash benchmarks/gpu_run.sh build test sanitize graph bench || status=$?
    ;;
  2)
    T_PASSES=100 PASSES_ARGS="--ks 3 9 31" T_BENCH=150 BENCH_ARGS="--shapes cm1536 \
--ks 9 15 31 --modes eval train_fwdbwd --providers eager compile cuda triton_tc \
--dtypes bfloat16 --layouts nchw" T_MODEL=100 T_STATIC=90 \
      timeout -k 5 530 bash benchmarks/gpu_run.sh build passes bench model static \
      || status=$?
    ;;
  *) echo "call must be 1 or 2"; exit 2 ;;
esac
tar czf "$DEST/results.tgz" -C "$RES" .
ls -la "$RES"
exit $status
