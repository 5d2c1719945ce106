#!/usr/bin/env bash
# A whole GPU session in two calls of at most 400 s each: with ~30 s to start a machine per
# call, both fit a 15-minute device budget (the second call needs 4 minutes left to start).
# Each call runs benchmarks/gpu_run.sh stages under time caps and packs what they wrote
# into one archive, $OUT/results.tgz (the device tool returns at most 8 files). Carry dist/
# (a wheel from `make wheel`) to test the one-build-every-torch claim; without it the call
# builds with `pip install --no-build-isolation --no-deps .`.
#
#   bash benchmarks/gpu_session.sh 1   # the suite, memcheck, graph capture, block benchmark
#   bash benchmarks/gpu_session.sh 2   # racecheck, per-pass times, k = 9..31 with
#                                      # torch.compile, whole model, static report vs all
#   bash benchmarks/gpu_session.sh 3   # after a kernel change, in one call: the suite,
#                                      # both sanitizers, per-pass and block times, CUDA
#                                      # and tensor cores against eager at k = 3, 9, 31 (eval and training)
#   bash benchmarks/gpu_session.sh 4   # 16-bit NCHW, for "auto" and the model: each kernel
#                                      # of the tensor-core passes under the profiler, the
#                                      # kernel backends side by side at k = 3..15, and (where
#                                      # Nsight Compute is there) the counters and stall
#                                      # reasons of B2a, B2b and F2
#   bash benchmarks/gpu_session.sh 5   # after a tensor-core change, in ~3 minutes: its tests,
#                                      # each kernel's time, bf16 NCHW blocks against the
#                                      # CUDA library
#   bash benchmarks/gpu_session.sh 6   # call 5, then Nsight Compute's stall reasons for
#                                      # B2b, B2a and eval (~6 minutes)
#   bash benchmarks/gpu_session.sh 7   # a session's last check, in ~6 minutes: the suite,
#                                      # CUDA-graph capture (the tensor-core kernels too),
#                                      # each tensor-core kernel's time, bf16 NCHW blocks
#                                      # against eager and the CUDA library at k = 3, 9, 31
#   bash benchmarks/gpu_session.sh 8   # the tensor-core tilings side by side, in ~5 minutes:
#                                      # their tests, each tensor-core kernel's time in the
#                                      # tilings 1, 2 and 2w (images per program, warps) at
#                                      # k = 3, 9, 31 (bf16 NCHW): which to make the default
#   bash benchmarks/gpu_session.sh 9   # the saved convolution output against recomputing it,
#                                      # in ~5 minutes: the tests of both, each tensor-core
#                                      # kernel's time both ways, bf16 NCHW blocks (default,
#                                      # save_conv=False, eager) at k = 3, 9, 31
#   bash benchmarks/gpu_session.sh 10  # the CUDA library's saved convolution output, in ~5
#                                      # minutes: its tests, each pass both ways (fp32 and
#                                      # bf16 NCHW, k = 9, 31), fp32 NCHW training blocks
#                                      # (default, save_conv=False, eager) at k = 9, 31
#   bash benchmarks/gpu_session.sh 11  # the CUDA library's L2 prefetches on and off, in ~5
#                                      # minutes: the CUDA tests, each pass both ways (fp32
#                                      # and bf16, NCHW and channels_last, k = 3, 9), fp32
#                                      # blocks (cuda-prefetch, cuda-noprefetch, eager) at k = 3, 9, 31;
#                                      # at k = 9 the passes include F2 and B1 reading the
#                                      # saved u through their direct kernels
#   bash benchmarks/gpu_session.sh 12  # the Triton CUDA-core kernels after the tap-major
#                                      # weight and channels_last dW kernel, in ~5 minutes:
#                                      # their tests, each kernel's time (fp32 and bf16, both
#                                      # layouts, k = 3, 9), blocks (triton, cuda, eager) at
#                                      # k = 3, 9, 31 in channels_last, k = 3, 9 in NCHW
#   bash benchmarks/gpu_session.sh 13  # the CUDA library's F2 / eval on tensor cores (the
#                                      # default; cuda-notc: CONVMIXER_EXT_CUDA_TC=0), in ~4
#                                      # minutes: its tests and the CUDA paths', then bf16 and
#                                      # fp16 NCHW blocks (cuda, cuda-notc, triton_tc, eager)
#                                      # at k = 3, 7, 9, 15: eval is F2 alone, the kernel's own
#                                      # time
#   bash benchmarks/gpu_session.sh 14  # the whole suite on 14 workers, then bf16 NCHW eval
#                                      # blocks (auto, cuda, cuda-notc, triton_tc) at k = 3,
#                                      # 7, 9, 31, in ~3 minutes: "auto" after a dispatch change
#   bash benchmarks/gpu_session.sh 15  # run10's open questions, in ~5 minutes: fp16 and bf16
#                                      # NCHW blocks, fp16 first this time (bf16 eval on tensor
#                                      # cores ran slow and spread at k = 3 and 7, fp16 did
#                                      # not), eval and training at k = 3, 7, 9 (training: the
#                                      # default tiling "2", #15's k = 9 / k = 3 ratio), then
#                                      # Nsight Compute on the CUDA tensor-core F2 (k = 3,
#                                      # both dtypes)
#   bash benchmarks/gpu_session.sh 16  # the CUDA library's F1 and B2 on tensor cores
#                                      # (opt-in: cuda-tcall, CONVMIXER_EXT_CUDA_TC=all), in
#                                      # ~5 minutes: their tests, then bf16 and fp16 NCHW
#                                      # training blocks (cuda, cuda-tcall, cuda-tcfused,
#                                      # cuda-tcall-save, triton_tc, eager) at k = 3, 7, 9, 15
#                                      # (u saved from k = 7, and by -save at k = 3) and
#                                      # Nsight Compute on bwd_mma_kernel (k = 9): #15's
#                                      # k = 9 / k = 3 ratio, and fp16 triton_tc training with
#                                      # du stored split; then on cm768-448 (2 x 2 tiles a
#                                      # plane) B2's du pass against du on every tile's halo
#                                      # (cuda-tcall against cuda-tcfused, k = 9, 15) and
#                                      # Nsight Compute on du_kernel and bwd_mma_kernel there
#   bash benchmarks/gpu_session.sh 17  # the CUDA library's tensor-core F2 taking its tile in
#                                      # several images a block (cp.async: the next image's
#                                      # halo loads while one convolves; opt-in:
#                                      # CONVMIXER_EXT_CUDA_TC_IMAGES, providers cuda-img2,
#                                      # cuda-img4), in ~4 minutes: its tests, then fp16 and
#                                      # bf16 NCHW eval blocks (cuda, cuda-img2, cuda-img4,
#                                      # eager) at k = 3, 7, 9, 15 (#15's eval target), and
#                                      # Nsight Compute on apply_mma_kernel at k = 3 (fp16),
#                                      # one image and four
#
# Timings of the first session (H200, 2026-11-26): machine start ~30 s, install and
# self-check ~40 s, the suite ~170 s on 12 workers, memcheck ~30 s, racecheck ~40 s (its
# quick set), graph check ~40 s, the block benchmark ~2 s per case (torch.compile ~30 s per
# case more).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:?"which call: 1 to 17"}
DEST=${OUT:?"OUT must name the folder that comes back"}
RES=$(mktemp -d)
export OUT=$RES PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
status=0
# Nsight Compute on one launch of each named tensor-core kernel (bf16 NCHW, k = 9: triton_tc's
# passes; NCU_PASSES, NCU_TAG name others): issue, occupancy, pipes, DRAM, and where warps
# stall (WarpStateStats).
NCU_PASSES=${NCU_PASSES:---ks 9 --dtypes bfloat16 --layouts nchw --backends triton_tc}
NCU_TAG=${NCU_TAG:-k9}
ncu_one() {  # NCU kernel extra-metrics (a metric this ncu lacks fails the run: retried bare)
  # (NCU_LAUNCHES: launches of the kernel profiled)
  (cd build/gpu-run && timeout -k 5 45 "$1" --kernel-name "$2" \
    --launch-count "${NCU_LAUNCHES:-1}" \
    --csv --section WarpStateStats --metrics gpu__time_duration.sum,\
smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,\
launch__grid_size,launch__block_size,\
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
smsp__issue_active.avg.pct_of_peak_sustained_active$3 \
    python -m benchmarks.passes $NCU_PASSES --out "$OUT/ncu-run") \
    > "$OUT/ncu-$2-$NCU_TAG.csv" 2>&1 && ! grep -q "==ERROR==" "$OUT/ncu-$2-$NCU_TAG.csv"
}
nsight() {
  local NCU kern r STALLS=""
  # cycles per issued instruction spent in each stall reason (the WarpStateStats section's
  # own metrics; its CSV prints only the rules built on them)
  for r in long_scoreboard short_scoreboard mio_throttle lg_throttle barrier wait \
      math_pipe_throttle not_selected dispatch_stall no_instruction membar branch_resolving \
      drain sleeping tex_throttle imc_miss selected; do
    STALLS+="${STALLS:+,}smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
  done
  NCU=$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/ncu 2>/dev/null)
  if [[ -z "$NCU" ]]; then echo "no Nsight Compute (ncu) on this machine"; return 0; fi
  for kern in "$@"; do
    echo "== Nsight Compute: $kern, passes $NCU_PASSES"
    ncu_one "$NCU" "$kern" ",$STALLS" || ncu_one "$NCU" "$kern" "" || echo "ncu: rc $?"
    grep -i "stall\|issue_active\|duration" "$OUT/ncu-$kern-$NCU_TAG.csv" | cut -d, -f5,13- \
      | head -40
  done
}
case "$CALL" in
  1)
    TEST_WORKERS=12 T_TEST=170 T_SANITIZE=35 SANITIZE_TOOLS=memcheck T_GRAPH=50 \
    T_BENCH=80 BENCH_ARGS="--shapes cm1536 --ks 3 9 --modes eval train_fwdbwd --providers \
eager auto cuda triton triton_tc --dtypes bfloat16 float32" \
      timeout -k 5 390 bash benchmarks/gpu_run.sh build test sanitize graph bench || status=$?
    ;;
  2)
    T_SANITIZE=40 SANITIZE_TOOLS=racecheck T_PASSES=70 PASSES_ARGS="--ks 3 9 31 --layouts \
nchw" T_BENCH=100 BENCH_ARGS="--shapes cm1536 --ks 9 31 --modes eval train_fwdbwd \
--providers eager compile cuda triton_tc --dtypes bfloat16 --layouts nchw" T_STATIC=50 \
    T_MODEL=70 timeout -k 5 390 bash benchmarks/gpu_run.sh build sanitize passes bench static \
      model || status=$?
    ;;
  3)
    TEST_WORKERS=12 T_TEST=95 T_SANITIZE=35 T_PASSES=70 PASSES_ARGS="--ks 3 9 31 --backends \
cuda triton_tc" T_BENCH=95 BENCH_ARGS="--shapes cm1536 --ks 3 9 31 --modes eval train_fwdbwd \
--providers eager cuda triton_tc --dtypes bfloat16 float32" \
      timeout -k 5 370 bash benchmarks/gpu_run.sh build test sanitize passes bench || status=$?
    ;;
  4)
    T_PASSES=80 PASSES_ARGS="--ks 3 9 31 --dtypes bfloat16 --layouts nchw --backends \
triton_tc --kernels" T_BENCH=130 BENCH_ARGS="--shapes cm1536 --ks 3 7 9 15 --modes eval \
train_fwdbwd --providers cuda triton triton_tc --dtypes bfloat16 --layouts nchw" \
      timeout -k 5 300 bash benchmarks/gpu_run.sh build passes bench || status=$?
    nsight _bwd_dx_kernel _bwd_du_kernel _apply_kernel
    ;;
  5|6)
    TEST_PATHS="$PWD/tests/test_tensor_cores.py $PWD/tests/test_dispatch.py" TEST_WORKERS=8 \
    T_TEST=60 T_PASSES=50 PASSES_ARGS="--ks 3 9 31 --dtypes bfloat16 --layouts nchw --backends \
triton_tc --kernels" T_BENCH=60 BENCH_ARGS="--shapes cm1536 --ks 3 9 31 --modes eval \
train_fwdbwd --providers cuda triton_tc --dtypes bfloat16 --layouts nchw" \
      timeout -k 5 220 bash benchmarks/gpu_run.sh build test passes bench || status=$?
    [[ "$CALL" == 6 ]] && nsight _bwd_dx_kernel _bwd_du_kernel _apply_kernel
    ;;
  7)
    TEST_WORKERS=14 T_TEST=110 T_GRAPH=60 T_PASSES=50 PASSES_ARGS="--ks 3 9 31 --dtypes \
bfloat16 --layouts nchw --backends triton_tc --kernels" T_BENCH=100 BENCH_ARGS="--shapes \
cm1536 --ks 3 9 31 --modes eval train_fwdbwd --providers eager cuda triton_tc --dtypes \
bfloat16 --layouts nchw" \
      timeout -k 5 350 bash benchmarks/gpu_run.sh build test graph passes bench || status=$?
    ;;
  8)
    TEST_PATHS="$PWD/tests/test_tensor_cores.py" TEST_WORKERS=8 T_TEST=90 T_PASSES=200 \
    PASSES_ARGS="--ks 3 9 31 --dtypes bfloat16 --layouts nchw --backends triton_tc --kernels \
--tc-tilings 1 2 2w" \
      timeout -k 5 340 bash benchmarks/gpu_run.sh build test passes || status=$?
    ;;
  9)
    TEST_PATHS="$PWD/tests/test_tensor_cores.py $PWD/tests/test_passes.py \
$PWD/tests/test_api.py::test_saved_conv_output_changes_no_result" \
    TEST_WORKERS=12 T_TEST=90 T_PASSES=90 PASSES_ARGS="--ks 3 9 31 --dtypes bfloat16 --layouts \
nchw --backends triton_tc --kernels --u both" T_BENCH=130 BENCH_ARGS="--shapes cm1536 --ks 3 9 \
31 --modes eval train_fwdbwd --providers eager triton_tc triton_tc-recompute --dtypes bfloat16 \
--layouts nchw" \
      timeout -k 5 340 bash benchmarks/gpu_run.sh build test passes bench || status=$?
    ;;
  10)
    TEST_PATHS="$PWD/tests/test_passes.py $PWD/tests/test_cuda_paths.py \
$PWD/tests/test_api.py::test_saved_conv_output_changes_no_result" \
    TEST_WORKERS=12 T_TEST=90 T_PASSES=110 PASSES_ARGS="--ks 9 31 --dtypes float32 bfloat16 \
--layouts nchw --backends cuda --u both" T_BENCH=120 BENCH_ARGS="--shapes cm1536 --ks 9 31 \
--modes train_fwdbwd --providers eager cuda cuda-recompute --dtypes float32 --layouts nchw" \
      timeout -k 5 340 bash benchmarks/gpu_run.sh build test passes bench || status=$?
    ;;
  11)
    TEST_PATHS="$PWD/tests/test_passes.py $PWD/tests/test_cuda_paths.py" \
    TEST_WORKERS=12 T_TEST=80 T_PASSES=110 PASSES_ARGS="--ks 3 9 --dtypes float32 bfloat16 \
--backends cuda --prefetch both" T_BENCH=130 BENCH_ARGS="--shapes cm1536 --ks 3 9 31 --modes \
eval train_fwdbwd --providers eager cuda-prefetch cuda-noprefetch --dtypes float32" \
      timeout -k 5 340 bash benchmarks/gpu_run.sh build test passes bench || status=$?
    ;;
  12)
    TEST_PATHS="$PWD/tests/test_passes.py $PWD/tests/test_layer.py" \
    TEST_WORKERS=12 T_TEST=90 T_PASSES=110 PASSES_ARGS="--ks 3 9 --dtypes float32 bfloat16 \
--backends triton --kernels" T_BENCH=130 BENCH_ARGS="--shapes cm1536 --ks 3 9 31 --modes \
eval train_fwdbwd --providers eager cuda triton --dtypes float32 bfloat16 --layouts \
channels_last nchw" \
      timeout -k 5 340 bash benchmarks/gpu_run.sh build test passes bench || status=$?
    ;;
  13)
    TEST_PATHS="$PWD/tests/test_cuda_tensor_cores.py $PWD/tests/test_cuda_paths.py" \
    TEST_WORKERS=12 T_TEST=70 T_BENCH=150 BENCH_ARGS="--shapes cm1536 --ks 3 7 9 15 --modes \
eval train_fwdbwd --providers eager cuda cuda-notc triton_tc --dtypes bfloat16 float16 \
--layouts nchw" \
      timeout -k 5 280 bash benchmarks/gpu_run.sh build test bench || status=$?
    ;;
  14)
    TEST_WORKERS=14 T_TEST=150 T_BENCH=70 BENCH_ARGS="--shapes cm1536 --ks 3 7 9 31 --modes \
eval --providers auto cuda cuda-notc triton_tc --dtypes bfloat16 --layouts nchw" \
      timeout -k 5 260 bash benchmarks/gpu_run.sh build test bench || status=$?
    ;;
  15)
    T_BENCH=170 BENCH_ARGS="--shapes cm1536 --ks 3 7 9 --modes eval train_fwdbwd --providers \
cuda triton_tc eager --dtypes float16 bfloat16 --layouts nchw" \
      timeout -k 5 220 bash benchmarks/gpu_run.sh build bench || status=$?
    NCU_LAUNCHES=2 NCU_TAG=k3 NCU_PASSES="--ks 3 --dtypes float16 bfloat16 --layouts nchw \
--backends cuda" nsight apply_mma_kernel
    ;;
  16)
    TEST_PATHS="$PWD/tests/test_cuda_tensor_cores.py $PWD/tests/test_tensor_cores.py" \
    TEST_WORKERS=12 T_TEST=60 T_BENCH=170 BENCH_ARGS="--shapes cm1536 --ks 3 7 9 15 --modes \
train_fwdbwd --providers cuda cuda-tcall cuda-tcall-save triton_tc eager --dtypes bfloat16 \
float16 --layouts nchw" \
      timeout -k 5 280 bash benchmarks/gpu_run.sh build test bench || status=$?
    CONVMIXER_EXT_CUDA_TC=all NCU_LAUNCHES=2 NCU_TAG=b2-k9 NCU_PASSES="--ks 9 --dtypes \
bfloat16 float16 --layouts nchw --backends cuda" nsight bwd_mma_kernel
    mkdir -p "$RES/multi-tile"
    OUT="$RES/multi-tile" T_BENCH=60 BENCH_ARGS="--shapes cm768-448 --ks 9 15 --modes \
train_fwdbwd --providers cuda-tcall cuda-tcfused triton_tc --dtypes bfloat16 float16 \
--layouts nchw" timeout -k 5 80 bash benchmarks/gpu_run.sh bench || status=$?
    CONVMIXER_EXT_CUDA_TC=all NCU_LAUNCHES=1 NCU_TAG=du-k9 NCU_PASSES="--shapes cm768-448 \
--ks 9 --dtypes bfloat16 --layouts nchw --backends cuda" nsight du_kernel bwd_mma_kernel
    ;;
  17)
    TEST_PATHS="$PWD/tests/test_cuda_tensor_cores.py" \
    TEST_WORKERS=12 T_TEST=50 T_BENCH=150 BENCH_ARGS="--shapes cm1536 --ks 3 7 9 15 --modes \
eval --providers cuda cuda-img2 cuda-img4 eager --dtypes float16 bfloat16 --layouts nchw" \
      timeout -k 5 240 bash benchmarks/gpu_run.sh build test bench || status=$?
    for img in 1 4; do
      CONVMIXER_EXT_CUDA_TC_IMAGES=$img NCU_LAUNCHES=1 NCU_TAG=k3-img$img NCU_PASSES="--ks 3 \
--dtypes float16 --layouts nchw --backends cuda" nsight apply_mma_kernel
    done
    ;;
  *) echo "call must be 1 to 17"; exit 2 ;;
esac
tar czf "$DEST/results.tgz" -C "$RES" .
ls -la "$RES"
exit $status
