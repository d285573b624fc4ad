#!/usr/bin/env bash
# The C++ suite: configures the library with its GoogleTest suite into build/cpp against
# the torch of the active Python, builds it, and runs ctest (GoogleTest binaries, the
# example built from an empty folder against the installed package, and state shared
# with Python). Extra arguments go to ctest, e.g. `scripts/test_cpp.sh -R Module`.
#
# Environment: PYTHON (default: python), MAX_JOBS (default: 2), TBN_CPP_BUILD_DIR
# (default: build/cpp), TBN_WITH_CUDA (default: AUTO).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
PYTHON_EXE="$(command -v "$PYTHON")"
JOBS="${MAX_JOBS:-2}"
BUILD="${TBN_CPP_BUILD_DIR:-$ROOT/build/cpp}"
TORCH_PREFIX="$("$PYTHON_EXE" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# ctest from the same CMake that configures, so the generated test files match it.
CMAKE="$(command -v cmake)"
CTEST="$(dirname "$CMAKE")/ctest"
GENERATOR=()
if [ ! -f "$BUILD/CMakeCache.txt" ] && command -v ninja >/dev/null; then
  GENERATOR=(-G Ninja)
fi

"$CMAKE" -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DPython_EXECUTABLE="$PYTHON_EXE" \
  -DTBN_BUILD_TESTS=ON \
  -DTBN_WITH_CUDA="${TBN_WITH_CUDA:-AUTO}"
MAX_JOBS="$JOBS" "$CMAKE" --build "$BUILD" --parallel "$JOBS"
MAX_JOBS="$JOBS" "$CTEST" --test-dir "$BUILD" --output-on-failure --parallel "$JOBS" "$@"
