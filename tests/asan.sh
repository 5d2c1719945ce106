#!/usr/bin/env bash
# Memory safety of the CUDA kernels without a GPU: the host-emulation build of csrc/
# compiled with AddressSanitizer + UBSan (out-of-bounds global and shared-memory accesses,
# misaligned or otherwise undefined accesses, UB in index math), loaded instead of the normal
# emulation build (CONVMIXER_EXT_EMU_LIB), and the emulated-kernel tests run under it
# (triton is not imported: its binary does not run under ASan).  Usage: tests/asan.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUTDIR=build/asan
mkdir -p "$OUTDIR"
echo "building the sanitized emulation library (ASan + UBSan)"
g++ -std=c++20 -O1 -g -fPIC -shared -pthread -fsanitize=address,undefined \
  -fno-sanitize-recover=undefined -fno-omit-frame-pointer -fvisibility=hidden \
  csrc/fused_dw_emu.cpp -o "$OUTDIR/_cmx_emu_asan.so"
echo "running the emulated-kernel tests under the sanitizers"
rm -f "$OUTDIR"/report.*
# reports go to files: pytest captures stderr, and a sanitizer abort would lose them
status=0
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$OUTDIR/report" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$OUTDIR/report" \
CONVMIXER_EXT_EMU_LIB="$OUTDIR/_cmx_emu_asan.so" \
CONVMIXER_EXT_REQUIRE_BACKENDS=cuda_emu CONVMIXER_EXT_NO_TRITON=1 \
  $PY -m pytest -q -p no:cacheprovider tests/test_passes.py tests/test_layer.py \
  tests/test_reliability.py tests/test_pointwise.py tests/test_strides.py \
  -k "cuda_emu or index" -x || status=$?
if compgen -G "$OUTDIR/report.*" > /dev/null; then
  echo "sanitizer reports:"
  grep -v "^    #[1-9][0-9]" "$OUTDIR"/report.* | head -60
  status=1
fi
exit $status
