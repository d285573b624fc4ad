# Sourced by scripts/demo.sh and scripts/test.sh: prepares a fresh machine and builds the
# extension into a virtual environment (.venv, or $TBN_VENV), then activates it.
set -euo pipefail

TBN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TBN_VENV="${TBN_VENV:-$TBN_ROOT/.venv}"

# System packages: a compiler and GoogleTest for the C++ suite (Debian).
if ! [ -f /usr/include/gtest/gtest.h ] || ! command -v g++ >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install g++ libgtest-dev"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ libgtest-dev >/dev/null
  else
    echo "[setup] warning: g++ or libgtest-dev missing and apt-get unavailable" >&2
  fi
fi

if [ ! -x "$TBN_VENV/bin/python" ]; then
  echo "[setup] creating $TBN_VENV"
  python3 -m venv "$TBN_VENV"
fi
# torch 2.13.0 is the CPU build; the others are the build and test tools (onnx, onnxscript
# and onnxruntime for the ONNX export test).
"$TBN_VENV/bin/pip" install -q --disable-pip-version-check \
  "torch==2.13.0" pybind11 cmake ninja setuptools wheel \
  pytest hypothesis expecttest numpy scikit-learn matplotlib onnx onnxscript onnxruntime

echo "[setup] building torch_batchnorm (log: $TBN_VENV/build.log)"
if ! (cd "$TBN_ROOT" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$TBN_VENV/bin/pip" install --no-build-isolation --no-deps -e . >"$TBN_VENV/build.log" 2>&1); then
  tail -n 40 "$TBN_VENV/build.log" >&2
  echo "[setup] build failed" >&2
  exit 1
fi
# shellcheck disable=SC1091
source "$TBN_VENV/bin/activate"
