#!/usr/bin/env bash
# Compiles and links the CUDA kernels against a CUDA build of torch on a machine that has
# nvcc but no GPU, so that CUDA code which does not build never lands. Nothing runs on a
# GPU here; scripts/gpu_check.sh does that on a GPU machine.
#
# The virtual environment with the CUDA build of torch lives outside the clone and is
# reused by later runs; the build goes to a temporary directory.
#
#   TBN_CUDA_VENV         venv to use or create  (default ~/.cache/torch_batchnorm/venv-cu)
#   TBN_CUDA_TORCH        torch requirement for it (default torch==2.14.1)
#   TORCH_CUDA_ARCH_LIST  GPU architectures       (default "8.0;9.0", from CMakeLists.txt)
#   MAX_JOBS              parallel compile jobs   (default: all cores)
#   CUDACXX, CUDA_HOME    the CUDA toolkit        (default /usr/local/cuda, else nvcc on PATH)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TBN_CUDA_VENV:-$HOME/.cache/torch_batchnorm/venv-cu}"
torch_req="${TBN_CUDA_TORCH:-torch==2.14.1}"
jobs="${MAX_JOBS:-$(nproc)}"

log() { echo "[ci_cuda_build] $*"; }
fail() {
  echo "[ci_cuda_build] FAIL: $*" >&2
  exit 1
}

# The toolkit: CUDACXX, else CUDA_HOME, else /usr/local/cuda, else the nvcc on PATH (which
# may be a wrapper script outside the toolkit, so it comes last).
if [ -n "${CUDACXX:-}" ]; then
  nvcc="$CUDACXX"
elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  nvcc="$CUDA_HOME/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
else
  nvcc="$(command -v nvcc || true)"
fi
[ -n "$nvcc" ] && [ -x "$nvcc" ] || fail "no nvcc: set CUDA_HOME or CUDACXX, or put the CUDA toolkit's bin/ on PATH"
cuda_home="$(cd "$(dirname "$nvcc")/.." && pwd)"
# torch's CMake config looks for the toolkit through CUDA_HOME and the nvcc on PATH.
export CUDACXX="$nvcc" CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$PATH"
log "nvcc: $nvcc ($("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
# Satisfied requirements are not fetched again, so a warm venv costs a second here.
log "ensuring $torch_req, cmake, ninja, pybind11, numpy in $venv"
# numpy only keeps torch from warning at import.
"$venv/bin/python" -m pip install -q "$torch_req" cmake ninja pybind11 numpy \
  || fail "could not install $torch_req into $venv"

torch_info="$("$venv/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "")')" \
  || fail "torch does not import from $venv"
read -r torch_version torch_cuda <<<"$torch_info"
[ -n "${torch_cuda:-}" ] || fail "torch $torch_version in $venv is not a CUDA build"
log "torch $torch_version (CUDA $torch_cuda)"

prefix_path="$("$venv/bin/python" -c 'import torch, pybind11; print(torch.utils.cmake_prefix_path + ";" + pybind11.get_cmake_dir())')"
build="$(mktemp -d "${TMPDIR:-/tmp}/tbn-cuda-build.XXXXXX")"
trap 'rm -rf "$build"' EXIT

start=$SECONDS
"$venv/bin/cmake" -S "$root" -B "$build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix_path" \
  -DPython_EXECUTABLE="$venv/bin/python" \
  -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" \
  -DTBN_BUILD_PYTHON=ON \
  -DTBN_WITH_CUDA=ON >"$build/configure.log" 2>&1 || {
  cat "$build/configure.log"
  fail "CMake configure failed"
}
grep "torch_batchnorm:" "$build/configure.log" || true
"$venv/bin/cmake" --build "$build" --parallel "$jobs" || fail "build failed"
archs="$(grep -o 'code=sm_[0-9a-z]*' "$build/build.ninja" | sort -u | sed 's/code=//' | paste -sd, -)"
[ -n "$archs" ] || fail "the CUDA sources were compiled for no GPU architecture"

# The package as an editable install lays it out: sources plus the installed _C and lib/.
stage="$build/stage"
mkdir -p "$stage"
cp -r "$root/python/torch_batchnorm" "$stage/"
"$venv/bin/cmake" --install "$build" --prefix "$stage/torch_batchnorm" >/dev/null || fail "install failed"
# Loading the library resolves every symbol of the CUDA kernels against torch; the
# dispatcher then must hold a CUDA kernel for every op.
PYTHONPATH="$stage" "$venv/bin/python" - <<'EOF' || fail "the built package lacks CUDA kernels"
import torch
import torch_batchnorm as tbn

assert tbn.with_cuda, "compiled_with_cuda() is false"
ops = [
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_stats",
    "batch_norm_forward_with_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]
for op in ops:
    name = f"torch_batchnorm::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
EOF

log "OK: CUDA kernels compiled for $archs and linked against torch $torch_version" \
  "(CUDA $torch_cuda, nvcc $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')) in $((SECONDS - start)) s"
