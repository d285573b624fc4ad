# Sourced by the scripts that run on a GPU machine (gpu_check.sh, gpu_ab.sh): the Python,
# CUDA toolkit and architectures to build with, and build_extension. The machine already
# has torch, nvcc, cmake, ninja (optional) and pybind11; nothing is fetched.
#
#   PYTHON                interpreter (default /opt/torch/.venv/bin/python, else python3)
#   MAX_JOBS              compile jobs (default 16)
#   CUDA_HOME             the toolkit (default /usr/local/cuda, else the nvcc on PATH)
#   TORCH_CUDA_ARCH_LIST  architectures to compile (default: those of the visible GPUs)

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x /opt/torch/.venv/bin/python ] && PYTHON=/opt/torch/.venv/bin/python
fi
export PYTHON
export MAX_JOBS="${MAX_JOBS:-16}"

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
[ -n "$CUDA_HOME" ] && export PATH="$CUDA_HOME/bin:$PATH"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd';' -)"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"

# build_extension SRC BUILD JOBS: builds the source tree SRC with the CUDA kernels into
# BUILD and installs it into SRC/python/torch_batchnorm, as an editable install does; then
# checks that it imports with them from there. Returns non-zero at the first failing step
# (chained, since callers may run it where `set -e` is off).
build_extension() {
  local src="$1" build="$2" jobs="$3" prefix opts=()
  prefix="$("$PYTHON" -c 'import torch, pybind11; print(torch.utils.cmake_prefix_path + ";" + pybind11.get_cmake_dir())')" || {
    echo "build_extension: $PYTHON has no torch or pybind11" >&2
    return 1
  }
  command -v ninja >/dev/null && opts=(-G Ninja)
  [ -f "$build/CMakeCache.txt" ] && opts=()  # keep the generator of an earlier run
  [ -n "$CUDA_HOME" ] && opts+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME")
  (
    set -x
    cmake -S "$src" -B "$build" "${opts[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$PYTHON" \
      -DTBN_BUILD_PYTHON=ON -DTBN_WITH_CUDA=ON -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" &&
      cmake --build "$build" --parallel "$jobs" &&
      cmake --install "$build" --prefix "$src/python/torch_batchnorm" >/dev/null &&
      PYTHONPATH="$src/python${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$src" <<'PY'
import os, sys
import torch_batchnorm as t
where = os.path.realpath(t.__file__)
assert where.startswith(os.path.realpath(sys.argv[1]) + os.sep), f"imported {where}, not the build in {sys.argv[1]}"
assert t.with_cuda, "built without CUDA kernels"
print("torch_batchnorm", t.__version__, "from", where, "with_cuda", t.with_cuda)
PY
  )
}
