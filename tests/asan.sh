#!/usr/bin/env bash
# Memory safety of the CUDA kernels without a GPU: the host-emulation build of csrc/
# compiled with AddressSanitizer + UBSan (out-of-bounds global and shared-memory accesses,
# misaligned or otherwise undefined accesses, UB in index math), loaded instead of the normal
# emulation build (CONVMIXER_EXT_EMU_LIB), and the emulated-kernel tests run under it
# (triton is not imported: its binary does not run under ASan).
# Usage: tests/asan.sh [python]  (builds the library if it is missing or older than csrc/)
#        tests/asan.sh --build   (builds it only: CI does so beside make test's setup)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=build/asan
LIB="$OUTDIR/_cmx_emu_asan.so"
build() {
  mkdir -p "$OUTDIR"
  echo "building the sanitized emulation library (ASan + UBSan; -g1: the line tables its reports need)"
  g++ -std=c++20 -O1 -g1 -fPIC -shared -pthread -fsanitize=address,undefined \
    -fno-sanitize-recover=undefined -fno-omit-frame-pointer -fvisibility=hidden \
    csrc/fused_dw_emu.cpp -o "$LIB.tmp"
  mv "$LIB.tmp" "$LIB"
}
if [ "${1:-}" = "--build" ]; then
  build
  exit 0
fi
PY=${1:-.venv/bin/python}
if [ ! -f "$LIB" ] || [ -n "$(find csrc tests/asan.sh -newer "$LIB" -print -quit)" ]; then
  build
else
  echo "the sanitized emulation library is up to date ($LIB)"
fi
echo "running the emulated-kernel tests under the sanitizers"
rm -f "$OUTDIR"/report.*
# reports go to files: pytest captures stderr, and a sanitizer abort would lose them. The
# pass-level files: every kernel, code path and stride case (the layer-level files run the
# same kernels again, at CI's time)
status=0
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$OUTDIR/report" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$OUTDIR/report" \
CONVMIXER_EXT_EMU_LIB="$LIB" \
CONVMIXER_EXT_REQUIRE_BACKENDS=cuda_emu CONVMIXER_EXT_NO_TRITON=1 \
  $PY -m pytest -q -p no:cacheprovider tests/test_passes.py tests/test_strides.py \
  tests/test_cuda_paths.py tests/test_cuda_tensor_cores.py \
  -k "cuda_emu or index or kernel_paths or activation_ids or prefetch or tensor_cores or mma" \
  -x || status=$?
if compgen -G "$OUTDIR/report.*" > /dev/null; then
  echo "sanitizer reports:"
  grep -v "^    #[1-9][0-9]" "$OUTDIR"/report.* | head -60
  status=1
fi
# The tier must catch what it is for: a planted bug that takes the 16-byte path on a
# misaligned tensor has to be reported as a misaligned access.
echo "planted misalignment (CMX_TEST_PLANT_MISALIGNMENT=1) must be reported"
planted=$(LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
  ASAN_OPTIONS="detect_leaks=0" CMX_TEST_PLANT_MISALIGNMENT=1 \
  CONVMIXER_EXT_EMU_LIB="$LIB" \
  CONVMIXER_EXT_NO_TRITON=1 $PY -c "
import torch
from convmixer_ext.backends import get_impl
x = torch.randn(2 * 3 * 8 * 8 + 1)[1:].view(2, 3, 8, 8)  # 4 bytes past 16-byte alignment
get_impl('cuda_emu').stats(x, torch.randn(3, 1, 3, 3), torch.randn(3), 'gelu')
" 2>&1 || true)
if grep -q "misaligned address" <<< "$planted"; then
  echo "  reported: $(grep -m1 'misaligned address' <<< "$planted")"
else
  echo "  NOT reported: the sanitizer tier misses misaligned vector accesses"
  status=1
fi
exit $status
