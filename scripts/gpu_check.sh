#!/usr/bin/env bash
# One call on a GPU machine: builds the extension from this working tree, runs the CUDA
# tests (tests/python/test_cuda.py and, at the same time, the shared suite's CUDA cases),
# the CUDA benchmark (benchmarks/bench_batch_norm.py --device cuda --quick, skipped where
# it does not exist) and a short kernel probe, and prints a summary table last.
# Needs a Python with a CUDA build of torch, nvcc, cmake, ninja (optional), pybind11 and
# pytest; no network. A failing step does not stop the next ones; each has a time limit,
# and the whole run keeps within TBN_GPU_CHECK_BUDGET seconds.
#
#   PYTHON                interpreter (default /opt/torch/.venv/bin/python, else python3)
#   OUT                   logs and results (default build/gpu-check/out); at most 8 files:
#                         summary.txt build.log test_cuda.log suite.log bench.log probe.log
#                         and up to two benchmark result files under bench/
#   MAX_JOBS              compile jobs (default 16)
#   TORCH_CUDA_ARCH_LIST  architectures to compile (default: those of the visible GPUs)
#   TBN_GPU_CHECK_BUDGET  seconds for the whole run (default 400: under 7 minutes)
#   TBN_BUILD_DIR         CMake build directory (default build/gpu-check/cmake); one that
#                         gpu_ab.sh already built leaves the build step little to do
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
begin=$SECONDS
budget="${TBN_GPU_CHECK_BUDGET:-400}"
out="${OUT:-$root/build/gpu-check/out}"
mkdir -p "$out"
export TBN_BUILD_DIR="${TBN_BUILD_DIR:-$root/build/gpu-check/cmake}"
# The build installs into the source package, as an editable install does.
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
export TBN_OUT="$out"

# PYTHON, MAX_JOBS, CUDA_HOME, TORCH_CUDA_ARCH_LIST and build_extension.
source "$root/scripts/gpu_env.sh"

names=()
results=()
seconds=()
# Of each step started and not yet finished: its process, log and start.
step_pid=()
step_log=()
step_t0=()
step_status="$(mktemp -d)"
trap 'rm -rf "$step_status"' EXIT

# start_step NAME LIMIT LOG FUNCTION: starts FUNCTION in a fresh bash under a time limit,
# in the background, output to $out/LOG; finish_steps records how it ended.
start_step() {
  local name="$1" limit="$2" log="$out/$3" fn="$4" i=${#names[@]}
  local left=$((budget - (SECONDS - begin) - 5))
  ((limit > left)) && limit=$left
  names+=("$name")
  results+=("SKIP (no time left)")
  seconds+=(0)
  if ((limit < 15)); then
    echo "=== $name: skipped, no time left" | tee -a "$log"
    return
  fi
  echo "=== $name (limit ${limit}s)"
  step_log[i]="$log"
  step_t0[i]=$SECONDS
  (
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$fn"); $fn" >"$log" 2>&1
    echo "$? $SECONDS $limit" >"$step_status/$i"
  ) &
  step_pid[i]=$!
}

# finish_steps: waits for every step started; records PASS, FAIL(rc), TIMEOUT or SKIP and
# the seconds it ran.
finish_steps() {
  local i rc end limit status
  for i in "${!step_pid[@]}"; do
    wait "${step_pid[$i]}"
    # (A step that died before writing its status reports as such.)
    rc=lost end=$SECONDS limit=0
    read -r rc end limit <"$step_status/$i" || true
    status="PASS"
    case $rc in
      0) ;;
      lost) status="FAIL (no status)" ;;
      124 | 137) status="TIMEOUT after ${limit}s" ;;
      5) status="NO TESTS (pytest rc 5)" ;;
      77) status="SKIP" ;;
      *) status="FAIL (rc $rc)" ;;
    esac
    results[i]="$status"
    seconds[i]=$((end - step_t0[i]))
    echo "=== ${names[$i]}: $status"
    tail -n 12 "${step_log[$i]}" | sed 's/^/    /'
  done
  step_pid=()
}

# run_step NAME LIMIT LOG FUNCTION: a step alone.
run_step() {
  start_step "$@"
  finish_steps
}

step_env() {
  set -x
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm,clocks.max.mem --format=csv
  "$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
  nvcc --version | tail -2
  cmake --version | head -1
  ninja --version
  echo "$ROOT"
  # (A tree that gpu_ab.sh exported lies inside the repository but is not its checkout.)
  if [ "$(git -C "$ROOT" rev-parse --show-toplevel 2>/dev/null)" = "$ROOT" ]; then
    git -C "$ROOT" log -1 --oneline
    git -C "$ROOT" status --short | head -20
  fi
  nproc
}

step_build() {
  source "$ROOT/scripts/gpu_env.sh"
  build_extension "$ROOT" "$TBN_BUILD_DIR" "$MAX_JOBS"
}

step_test_cuda() {
  "$PYTHON" -m pytest "$ROOT/tests/python/test_cuda.py" -v --tb=short -rfEs --durations=15 -p no:cacheprovider
}

step_suite() {
  if [ ! -d "$ROOT/tests/python" ] || [ -z "$(ls "$ROOT"/tests/python/test_*.py 2>/dev/null | grep -v test_cuda.py)" ]; then
    echo "no test suite besides test_cuda.py"
    exit 77
  fi
  # The shared suite's CUDA cases: everything parametrized with the "cuda" device.
  "$PYTHON" -m pytest "$ROOT/tests/python" --ignore="$ROOT/tests/python/test_cuda.py" -k cuda \
    -q --tb=short -rfEs --durations=10 -p no:cacheprovider
}

step_bench() {
  local script="$ROOT/benchmarks/bench_batch_norm.py" dir
  if [ ! -f "$script" ]; then
    echo "benchmarks/bench_batch_norm.py is missing: benchmark skipped"
    exit 77
  fi
  dir="$(mktemp -d)"
  "$PYTHON" "$script" --device cuda --quick --out "$dir"
  local rc=$?
  # Bring back at most two result files, tables first.
  mkdir -p "$TBN_OUT/bench"
  find "$dir" -type f \( -name '*.md' -o -name '*.json' -o -name '*.csv' -o -name '*.txt' \) |
    awk '{ print (/\.md$/ ? 0 : /\.json$/ ? 1 : 2) "\t" $0 }' | sort | head -n 2 | cut -f2- |
    while read -r f; do cp "$f" "$TBN_OUT/bench/"; done
  echo "result files: $(find "$dir" -type f | wc -l) (up to two copied to bench/)"
  exit $rc
}

# Kernel probe: ours against torch (whatever torch picks) on ResNet-50 shapes at batch 32
# and on large tensors, with a check of the results, a profile of the kernels, and the GPU
# time per call over benchmarks/gpu_time.py's cases.
step_probe() {
  "$PYTHON" - <<'EOF'
import statistics
import time
import traceback

import torch
import torch_batchnorm as tbn

torch.manual_seed(0)
dev = "cuda"
failed = []


def section(fn):
    """Runs one part of the probe; a failure is printed and the next part still runs."""
    print(f"\n## {fn.__doc__}")
    try:
        fn()
    except Exception:
        traceback.print_exc()
        failed.append(fn.__name__)
    torch.cuda.empty_cache()
    return fn


def timed(fn, iters=25, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def make(shape, dtype, cl):
    x = torch.randn(shape, device=dev).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


copy_gbs = 0.0


@section
def copy_rate():
    """device-to-device copy rate (read + write)"""
    global copy_gbs
    src = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e6
    print(f"{copy_gbs:.0f} GB/s")


@section
def resnet50():
    """ResNet-50 shapes, batch 32, training: ours vs torch (ratio = torch / ours, > 1: ours faster)"""
    shapes = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
              (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]
    print(f"{'shape':>22} {'dtype':>9} {'layout':>6} {'fwd+bwd ms':>10} {'torch':>7} {'ratio':>6} "
          f"{'fwd ratio':>9} {'max|dy|':>9} {'max|dx|':>9}")
    ratios = []
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16 input, float32 parameters (AMP)
        for cl in (False, True):
            for c, hw in shapes:
                shape = (32, c, hw, hw)
                x, g = make(shape, dtype, cl), make(shape, dtype, cl)
                ours, ref = tbn.BatchNorm2d(c).to(dev), torch.nn.BatchNorm2d(c).to(dev)
                xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
                yo, yr = ours(xo), ref(xr)
                yo.backward(g)
                yr.backward(g)
                dy = (yo.float() - yr.float()).abs().max().item()
                dx = (xo.grad.float() - xr.grad.float()).abs().max().item()

                def step(m, xx):
                    xx.grad = None
                    m(xx).backward(g)

                t_o, t_r = timed(lambda: step(ours, xo)), timed(lambda: step(ref, xr))
                with torch.no_grad():
                    f_o, f_r = timed(lambda: ours(x)), timed(lambda: ref(x))
                ratios.append((t_r / t_o, shape, str(dtype)[6:], "CL" if cl else "NCHW"))
                print(f"{str(shape):>22} {str(dtype)[6:]:>9} {'CL' if cl else 'NCHW':>6} {t_o:10.3f} "
                      f"{t_r:7.3f} {t_r / t_o:6.2f} {f_r / f_o:9.2f} {dy:9.2e} {dx:9.2e}")
    print("slowest relative to torch:", "; ".join(f"{r:.2f} {s} {d} {l}" for r, s, d, l in sorted(ratios)[:6]))


@section
def large():
    """large tensors: GB/s counting each tensor read or written once, and % of the copy rate"""
    for dtype in (torch.float32, torch.bfloat16):
        for shape, cl in (((64, 64, 128, 128), False), ((64, 64, 128, 128), True), ((1 << 16, 2048), False)):
            x, g = make(shape, dtype, cl), make(shape, dtype, cl)
            nbytes = x.numel() * x.element_size()
            m = (tbn.BatchNorm2d(shape[1]) if x.dim() == 4 else tbn.BatchNorm1d(shape[1])).to(dev)
            xg = x.clone().requires_grad_()
            rows = []
            with torch.no_grad():
                rows.append(("train fwd (x, y)", 2, timed(lambda: m(x), iters=10)))
                m.eval()
                rows.append(("eval fwd (x, y)", 2, timed(lambda: m(x), iters=10)))
                m.train()
            y = m(xg)
            rows.append(("train bwd (x, dy, dx)", 3,
                         timed(lambda: torch.autograd.grad(y, xg, g, retain_graph=True), iters=10)))
            for what, k, t in rows:
                gbs = k * nbytes / t / 1e6
                print(f"{str(tuple(shape)):>20} {str(dtype)[6:]:>9} {'CL' if cl else '':>2} {what:>22}: "
                      f"{t:7.3f} ms {gbs:6.0f} GB/s {100 * gbs / max(copy_gbs, 1):5.1f}%")
            del x, g, xg, y


@section
def host():
    """host time against GPU time of a training step (module forward+backward, float32):
where issuing a step takes the host longer than its kernels run on the GPU, the step is
host-bound; then the API calls and the host's costliest operations per step say why"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    api = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaMemsetAsync",
           "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMalloc")
    print(f"{'shape':>20} {'layout':>6} {'impl':>5} {'issue us':>8} {'step us':>8} {'GPU us':>7}"
          "  per step: API calls; costliest host operations (self us)")
    for c, hw, cl in ((256, 14, False), (256, 14, True), (2048, 7, False), (16, 4, False)):
        shape = (32 if hw > 4 else 8, c, hw, hw)
        x = make(shape, torch.float32, cl).requires_grad_()
        g = torch.randn_like(x)
        for name, m in (("ours", tbn.BatchNorm2d(c).to(dev)), ("torch", torch.nn.BatchNorm2d(c).to(dev))):
            inputs = [x, *m.parameters()]

            def step():
                torch.autograd.grad(m(x), inputs, g)

            for _ in range(10):
                step()
            torch.cuda.synchronize()
            n = 50
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            issued = time.perf_counter() - t0  # grad() returns once the backward is enqueued
            torch.cuda.synchronize()
            done = time.perf_counter() - t0
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            gpu = sum(getattr(e, "self_device_time_total", 0) for e in events
                      if e.device_type == DeviceType.CUDA) / 10
            calls = ", ".join(f"{e.key} {e.count / 10:g}" for e in events if e.key in api)
            costly = sorted((e for e in events if e.device_type == DeviceType.CPU),
                            key=lambda e: -e.self_cpu_time_total)[:5]
            print(f"{str(shape):>20} {'CL' if cl else 'NCHW':>6} {name:>5} {issued / n * 1e6:8.1f} "
                  f"{done / n * 1e6:8.1f} {gpu:7.1f}  {calls}")
            print(" " * 26 + "; ".join(f"{e.key} {e.self_cpu_time_total / 10:.1f}" for e in costly))


@section
def gpu_time():
    """GPU time per call, ours and torch's: the kernels' device time (benchmarks/gpu_time.py),
which the wall-clock timings of small layers hide behind the host's, and the costliest
kernels of each call"""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
    import gpu_time as gt

    results = {"ours": gt.measure(calls=8)}
    print(gt.table(results))
    print()
    print(gt.kernel_table(results))


if failed:
    raise SystemExit(f"probe sections failed: {failed}")
EOF
}

export ROOT="$root"
run_step env 30 summary.txt step_env
env_log="$(cat "$out/summary.txt")"
# Limits per step; the budget cuts the later ones short when earlier ones run long (on an
# H100 machine's 16 cores the build took 92-111 s while the CUDA kernels were one file,
# each test step 47-95 s).
run_step build 240 build.log step_build
if [ "${results[1]}" = "PASS" ]; then
  # The two test steps share the GPU, which their small cases leave mostly idle; the timed
  # steps run alone.
  start_step test_cuda 120 test_cuda.log step_test_cuda
  start_step suite_cuda 120 suite.log step_suite
  finish_steps
  run_step bench 90 bench.log step_bench
  run_step probe 90 probe.log step_probe
else
  for s in test_cuda suite_cuda bench probe; do
    names+=("$s")
    results+=("SKIP (build failed)")
    seconds+=(0)
  done
fi

pytest_line() { grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" "$out/$1" 2>/dev/null | tail -1 | tr -d '='; }
{
  echo "$env_log"
  echo
  echo "pytest test_cuda.py: $(pytest_line test_cuda.log)"
  echo "pytest suite (cuda): $(pytest_line suite.log)"
  echo
  printf '%-12s %-24s %8s\n' step status seconds
  for i in "${!names[@]}"; do
    printf '%-12s %-24s %8s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}"
  done
  printf '%-12s %-24s %8s\n' total "" $((SECONDS - begin))
  echo "logs: $out"
} >"$out/summary.txt.new"
mv "$out/summary.txt.new" "$out/summary.txt"
echo
tail -n +1 "$out/summary.txt" | sed -n '/^pytest test_cuda/,$p'
for r in "${results[@]}"; do
  case "$r" in PASS | SKIP* | NO\ TESTS*) ;; *) exit 1 ;; esac
done
