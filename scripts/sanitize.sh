#!/usr/bin/env bash
# The native kernels' tests under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Usage: scripts/sanitize.sh [extra pytest arguments]
#
# Builds csrc/ with -fsanitize=address,undefined into build/sanitize (its own
# build folder; the installed library is left alone), with
# SRIGL_POISON_SCRATCH so that every per-thread scratch buffer is handed out
# full of NaN (a read of scratch the current call did not write shows in an
# output). Then runs the native tests against that library: Python loads it
# through SRIGL_JAX_NATIVE_LIB, with the ASan runtime preloaded (the
# interpreter itself is not instrumented). A sanitizer report stops the
# process that hits it, which fails the run. Not part of the default test
# run: about 5 minutes on 2 cores.
#
# Environment: PYTHON (default .venv/bin/python), SANITIZE_BUILD_DIR
# (default build/sanitize), CXX (the compiler; its runtime is preloaded).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BUILD=${SANITIZE_BUILD_DIR:-$ROOT/build/sanitize}
CXX=${CXX:-g++}

SANITIZE="-fsanitize=address,undefined -fno-omit-frame-pointer"
mkdir -p "$(dirname "$BUILD")"
cmake -S . -B "$BUILD" \
  -DCMAKE_CXX_COMPILER="$CXX" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$PYTHON" \
  -DCMAKE_CXX_FLAGS="$SANITIZE -DSRIGL_POISON_SCRATCH" \
  -DCMAKE_SHARED_LINKER_FLAGS="$SANITIZE" >"$BUILD.cmake.log" 2>&1 ||
  { cat "$BUILD.cmake.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)"
LIB="$BUILD/libsrigl_condensed.so"
if ! nm -D "$LIB" | grep __asan_init >/dev/null; then
  echo "sanitize.sh: $LIB is not instrumented (see $BUILD.cmake.log)" >&2
  exit 1
fi

export SRIGL_JAX_NATIVE_LIB="$LIB"
# The ASan runtime must come first; libstdc++ with it, or ASan finds no
# __cxa_throw to intercept (the interpreter does not link libstdc++) and
# aborts at jaxlib's first C++ exception.
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so):$("$CXX" -print-file-name=libstdc++.so)"
# Python and jaxlib leak at exit by design; leak reports would drown the rest.
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export JAX_PLATFORMS=cpu

# The tests must run the instrumented library, not fall back to XLA.
"$PYTHON" - "$LIB" <<'EOF'
import os, sys
from srigl_jax.condensed import _native_lib
lib = _native_lib._load()[0]
assert lib is not None, _native_lib.native_error()
assert os.path.samefile(lib._name, sys.argv[1]), lib._name
print(f"sanitize.sh: testing {lib._name}")
EOF

"$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_condensed.py tests/test_conv_native.py tests/test_conv_independent.py \
  tests/test_untrusted.py tests/test_grouped_condensed.py "$@"
echo "sanitize.sh: no sanitizer report"
