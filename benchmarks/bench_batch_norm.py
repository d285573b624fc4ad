"""torch_batchnorm against torch's own BatchNorm, side by side in one process.

For every case (shape, memory layout, dtype, thread count, mode) each implementation is
warmed up, then timed in interleaved rounds (ours, torch, textbook, ours, ...) so that
drifting clocks and noisy neighbours hit all of them alike; the reported time is the
median round. A round runs enough calls to last a few milliseconds.

Implementations:
  ours      torch_batchnorm (the functional op, or the module for the "module" cases)
  torch     torch.nn.functional.batch_norm (the module torch.nn.BatchNormNd for "module")
            On CUDA: whatever torch picks (cuDNN where it applies)
  native    CUDA only: torch with cuDNN disabled, its own CUDA kernels
  textbook  BatchNorm written with plain tensor ops (mean, var, broadcasting), a baseline

Modes: train_fwd (batch statistics, running stats updated), train_fwd_bwd (the same plus
the backward for input, weight and bias), eval_fwd (running statistics).

Roofline: "bytes" is the traffic a streaming implementation cannot avoid, in multiples of
the input size: eval forward reads x and writes y (2); training forward needs the whole
batch's statistics before the first output, so a tensor larger than the caches is read
twice and written once (3); training forward+backward adds a reduction over dy and x and
a pass that reads dy and x and writes dx (3 + 5 = 8). The roofline is a large tensor
copy (dst.copy_(src): read + write) timed in the same run with the same thread count;
"% roofline" is the achieved bandwidth bytes/time over the copy's. Inputs that stay in
cache can exceed 100%.

    python benchmarks/bench_batch_norm.py                 # CPU, full suite
    python benchmarks/bench_batch_norm.py --quick         # CPU smoke run, < 1 minute
    python benchmarks/bench_batch_norm.py --device cuda   # CUDA suite (needs a CUDA build)

Writes <out>/cpu.{json,md,png} or <out>/cuda-<gpu>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import torch_batchnorm as tbn

MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
# Bytes moved per mode, in multiples of the input's size (see the module docstring).
TRAFFIC = {"eval_fwd": 2, "train_fwd": 3, "train_fwd_bwd": 8}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------
# Shapes

# ResNet-50 (torchvision, stride on the 3x3 convolution): the distinct (channels,
# resolution) pairs of its 53 BatchNorm layers, at batch 32.
RESNET50_LAYERS = [
    (64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (256, 28), (512, 28),
    (256, 14), (512, 14), (1024, 14), (512, 7), (2048, 7),
]
RESNET50_QUICK = [(256, 14), (512, 7)]


@dataclass(frozen=True)
class Case:
    family: str  # resnet50, mlp, video, small, module, large
    shape: tuple
    layout: str  # nchw (contiguous), cl (channels_last / channels_last_3d), 2d

    @property
    def name(self):
        dims = "x".join(str(s) for s in self.shape)
        return f"{self.family} [{dims}] {self.layout}"


def cpu_cases(quick: bool) -> list[Case]:
    cases = []
    for c, hw in RESNET50_QUICK if quick else RESNET50_LAYERS:
        for layout in ("nchw", "cl"):
            cases.append(Case("resnet50", (32, c, hw, hw), layout))
    mlp = [(256, 4096)] if quick else [(4096, 1024), (256, 4096)]
    cases += [Case("mlp", s, "2d") for s in mlp]
    # 3D ResNet-18 style video network on 16-frame 112x112 clips, batch 8.
    video = [(8, 128, 8, 28, 28)] if quick else [(8, 64, 16, 56, 56), (8, 128, 8, 28, 28), (8, 256, 4, 14, 14)]
    for s in video:
        cases += [Case("video", s, "nchw"), Case("video", s, "cl")]
    # Small inputs, where per-call overhead dominates.
    small = [((8, 16, 4, 4), "nchw"), ((8, 16, 4, 4), "cl"), ((32, 64), "2d")]
    if not quick:
        small += [((2, 32, 8, 8), "nchw"), ((16, 256, 1, 1), "cl"), ((4, 8, 4, 4, 4), "nchw")]
    cases += [Case("small", s, layout) for s, layout in small]
    # The module itself (Python forward, autograd), on a tiny input.
    cases.append(Case("module", (8, 16, 4, 4), "nchw"))
    return cases


def cuda_cases(quick: bool) -> list[Case]:
    cases = []
    for c, hw in RESNET50_QUICK if quick else RESNET50_LAYERS:
        for layout in ("nchw", "cl"):
            cases.append(Case("resnet50", (32, c, hw, hw), layout))
    large = [(64, 256, 56, 56)] if quick else [(64, 256, 56, 56), (128, 64, 112, 112), (16384, 4096)]
    for s in large:
        if len(s) == 2:
            cases.append(Case("large", s, "2d"))
        else:
            cases += [Case("large", s, "nchw"), Case("large", s, "cl")]
    cases.append(Case("mlp", (256, 4096), "2d"))
    cases.append(Case("module", (8, 16, 4, 4), "nchw"))
    return cases


# ---------------------------------------------------------------------------------
# Implementations


def textbook_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """BatchNorm as written in a textbook, with broadcasting tensor ops."""
    dims = [0] + list(range(2, x.dim()))
    view = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        if running_mean is not None:
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    else:
        mean, var = running_mean, running_var
    y = (x - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
    return y * weight.view(view) + bias.view(view)


FUNCTIONAL = {
    "ours": tbn.functional.batch_norm,
    "torch": torch.nn.functional.batch_norm,
    "native": torch.nn.functional.batch_norm,
    "textbook": textbook_batch_norm,
}
MODULES = {
    1: (tbn.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (tbn.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (tbn.BatchNorm3d, torch.nn.BatchNorm3d),
}


def make_input(case: Case, dtype, device):
    x = torch.randn(case.shape, dtype=dtype, device=device)
    if case.layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def make_fn(impl: str, case: Case, mode: str, x, g) -> Callable[[], object]:
    """A closure running one call of `impl` in `mode` on `x` (`g`: the output gradient)."""
    C = x.shape[1]
    training = mode != "eval_fwd"
    needs_grad = mode == "train_fwd_bwd"
    dev, dtype = x.device, x.dtype

    if case.family == "module":
        ours_cls, torch_cls = MODULES[max(1, x.dim() - 2)]
        if impl == "textbook":
            return None
        m = (ours_cls if impl == "ours" else torch_cls)(C, device=dev, dtype=dtype)
        m.train(training)
        xi = x.detach().requires_grad_(needs_grad)
        params = list(m.parameters())
        if needs_grad:
            return lambda: torch.autograd.grad(m(xi), [xi] + params, g)

        def fwd():
            with torch.no_grad():
                return m(xi)

        return fwd

    fn = FUNCTIONAL[impl]
    weight = torch.rand(C, device=dev, dtype=dtype).add_(0.5).requires_grad_(needs_grad)
    bias = torch.randn(C, device=dev, dtype=dtype).requires_grad_(needs_grad)
    running_mean = torch.zeros(C, device=dev, dtype=dtype)
    running_var = torch.ones(C, device=dev, dtype=dtype)
    xi = x.detach().requires_grad_(needs_grad)
    if needs_grad:
        inputs = [xi, weight, bias]
        return lambda: torch.autograd.grad(
            fn(xi, running_mean, running_var, weight, bias, True, 0.1, 1e-5), inputs, g
        )

    def fwd():
        with torch.no_grad():
            return fn(xi, running_mean, running_var, weight, bias, training, 0.1, 1e-5)

    return fwd


def wrap_native(fn):
    """Runs `fn` with cuDNN disabled, so torch uses its own CUDA kernels."""

    def call():
        with torch.backends.cudnn.flags(enabled=False):
            return fn()

    return call


# ---------------------------------------------------------------------------------
# Timing


class Timer:
    """Seconds taken by `calls` calls of a closure: wall clock on the CPU, CUDA events
    (after a synchronize) on the GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn, calls: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start


def measure(fns: dict[str, Callable], timer: Timer, rounds: int, round_s: float) -> dict[str, dict]:
    """Median and spread of the per-call time of every closure, timed in interleaved
    rounds whose order rotates, after a warm-up that also sizes each round. The first
    closure is the reference of the ratios."""
    calls = {}
    for name, fn in fns.items():
        fn()  # first call: allocations, lazy initialisation
        t = timer(fn, 1)
        n = 1
        while t < round_s / 4 and n < 1 << 16:
            n *= 4
            t = timer(fn, n)
        calls[name] = max(1, int(math.ceil(n * round_s / max(t, 1e-9))))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(timer(fns[name], calls[name]) / calls[name])
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        # The ratio to ours is the median of per-round ratios: rounds are adjacent in
        # time, so a burst of load from elsewhere cancels out of each ratio.
        paired = [a / b for a, b in zip(s, samples[names[0]])]
        out[name] = {"median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "calls": calls[name],
                     "rounds": len(s), "ratio": statistics.median(paired)}
    return out


def copy_bandwidth(device: str, nbytes: int, timer: Timer, rounds: int) -> float:
    """Bytes per second of dst.copy_(src) on a large buffer: read + write."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src), 1) for _ in range(rounds)]
    del src, dst
    return 2 * nbytes / statistics.median(times)


# ---------------------------------------------------------------------------------
# Running the suite


@dataclass
class Row:
    case: str
    family: str
    shape: list
    layout: str
    dtype: str
    threads: Optional[int]
    mode: str
    bytes: int
    times_s: dict = field(default_factory=dict)  # impl -> median seconds per call
    spread_s: dict = field(default_factory=dict)  # impl -> [q1, q3]
    ratio: dict = field(default_factory=dict)  # impl -> median over rounds of impl_time / ours_time
    ours_gbps: float = 0.0
    roofline_frac: float = 0.0


def run_suite(args) -> tuple[list[Row], dict]:
    device = args.device
    timer = Timer(device)
    cases = cpu_cases(args.quick) if device == "cpu" else cuda_cases(args.quick)
    if args.cases:
        cases = [c for c in cases if re.search(args.cases, c.name)]
    modes = args.modes
    dtypes = [DTYPES[d] for d in args.dtype]
    if device == "cpu":
        impls = ["ours", "torch", "textbook"]
        thread_counts = args.threads
    else:
        impls = ["ours", "torch", "native", "textbook"]
        thread_counts = [None]
    rounds = args.rounds or (5 if args.quick else 11)
    round_s = args.round_ms / 1e3

    rows: list[Row] = []
    bandwidth = {}
    started = time.perf_counter()
    for threads in thread_counts:
        if threads is not None:
            torch.set_num_threads(threads)
        copy_bytes = (256 if args.quick else 512) << 20
        bw = copy_bandwidth(device, copy_bytes, timer, 3 if args.quick else 7)
        bandwidth[str(threads)] = bw
        print(f"# threads={threads}: copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            for case in cases:
                x = make_input(case, dtype, device)
                g = torch.randn_like(x)
                for mode in modes:
                    fns = {}
                    for impl in impls:
                        fn = make_fn(impl, case, mode, x, g)
                        if fn is None:
                            continue
                        fns[impl] = wrap_native(fn) if impl == "native" else fn
                    res = measure(fns, timer, rounds, round_s)
                    row = Row(
                        case=case.name, family=case.family, shape=list(case.shape), layout=case.layout,
                        dtype=dname, threads=threads, mode=mode,
                        bytes=TRAFFIC[mode] * x.numel() * x.element_size(),
                    )
                    ours = res["ours"]["median_s"]
                    for impl, r in res.items():
                        row.times_s[impl] = r["median_s"]
                        row.spread_s[impl] = [r["q1_s"], r["q3_s"]]
                        row.ratio[impl] = r["ratio"]
                    row.ours_gbps = row.bytes / ours / 1e9
                    row.roofline_frac = row.bytes / ours / bw
                    rows.append(row)
                    print(format_progress(row), flush=True)
                del x, g
    meta = {"bandwidth_Bps": bandwidth, "elapsed_s": time.perf_counter() - started, "rounds": rounds,
            "round_ms": args.round_ms, "quick": args.quick, "impls": impls}
    return rows, meta


def format_progress(row: Row) -> str:
    others = "  ".join(f"{k}/ours {v:5.2f}x" for k, v in row.ratio.items() if k != "ours")
    return (f"{row.case:34s} {row.dtype:8s} t={row.threads} {row.mode:13s} "
            f"ours {fmt_time(row.times_s['ours']):>9s}  {others}  {row.roofline_frac:6.1%} roofline")


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms"


# ---------------------------------------------------------------------------------
# Reports


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_batchnorm": getattr(tbn, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for key in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core", "L2 cache", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", lscpu, re.M)
            if m:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = m.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        info["model_name"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        info["git_commit"] = rev
    except (OSError, subprocess.CalledProcessError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def summary(rows: list[Row]) -> list[dict]:
    """Geometric mean and minimum of torch/ours per (dtype, threads, mode)."""
    groups = {}
    for r in rows:
        groups.setdefault((r.dtype, r.threads, r.mode), []).append(r)
    out = []
    for (dtype, threads, mode), rs in groups.items():
        for impl in [k for k in rs[0].ratio if k != "ours"]:
            ratios = [r.ratio[impl] for r in rs if impl in r.ratio]
            worst = min(rs, key=lambda r: r.ratio.get(impl, float("inf")))
            out.append({"dtype": dtype, "threads": threads, "mode": mode, "vs": impl, "cases": len(ratios),
                        "geomean": geomean(ratios), "min": min(ratios), "min_case": worst.case})
    return out


def write_markdown(path: Path, rows, summ, meta, info):
    impls = [i for i in meta["impls"] if i != "ours"]
    lines = [f"# torch_batchnorm benchmark: {info.get('gpu') or info.get('model_name', 'CPU')}", ""]
    lines += ["## Machine", ""]
    for k, v in info.items():
        lines.append(f"- {k}: {v}")
    for t, bw in meta["bandwidth_Bps"].items():
        lines.append(f"- copy bandwidth (threads={t}): {bw / 1e9:.1f} GB/s")
    lines.append(f"- {meta['rounds']} interleaved rounds of >= {meta['round_ms']} ms per case; medians; "
                 f"{meta['elapsed_s']:.0f} s in all")
    lines += ["", "## Summary: speed-up of ours over each implementation (its time / ours)", ""]
    lines.append("| dtype | threads | mode | vs | cases | geomean | min | slowest case |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in summ:
        lines.append(f"| {s['dtype']} | {s['threads']} | {s['mode']} | {s['vs']} | {s['cases']} | "
                     f"{s['geomean']:.2f}x | {s['min']:.2f}x | {s['min_case']} |")
    lines += ["", "## All cases", ""]
    header = ["case", "dtype", "threads", "mode", "ours"] + impls + [f"{i}/ours" for i in impls] + ["ours GB/s", "roofline"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r.case, r.dtype, str(r.threads), r.mode, fmt_time(r.times_s["ours"])]
        cells += [fmt_time(r.times_s[i]) if i in r.times_s else "-" for i in impls]
        cells += [f"{r.ratio[i]:.2f}x" if i in r.ratio else "-" for i in impls]
        cells += [f"{r.ours_gbps:.1f}", f"{r.roofline_frac:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(path: Path, rows: list[Row], title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart written", file=sys.stderr)
        return
    panels = sorted({(r.dtype, r.threads) for r in rows}, key=lambda p: (p[0], p[1] or 0))
    cases = list(dict.fromkeys(r.case for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.32 * len(cases) + 1.8),
                             sharey=True, squeeze=False)
    colors = {"train_fwd": "#4C72B0", "train_fwd_bwd": "#DD8452", "eval_fwd": "#55A868"}
    height = 0.8 / len(MODES)
    for ax, (dtype, threads) in zip(axes[0], panels):
        for k, mode in enumerate(MODES):
            ratio = {r.case: r.ratio["torch"] for r in rows
                     if r.dtype == dtype and r.threads == threads and r.mode == mode}
            ys = [i + (k - 1) * height for i, c in enumerate(cases) if c in ratio]
            ax.barh(ys, [ratio[c] for c in cases if c in ratio], height=height, color=colors[mode], label=mode)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{dtype}" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""))
        ax.set_xlabel("speed-up over torch (torch time / ours)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(cases)))
    axes[0][0].set_yticklabels(cases, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reuse_large_blocks() -> bool:
    """Makes glibc's malloc keep freed blocks of any size for reuse.

    By default glibc maps every block above 32 MB fresh from the kernel and unmaps it
    when freed, so an op that allocates a large output spends more time in page faults
    than in its own loops (for a 100 MB float tensor here: about 50 ms of faults against
    25 ms of work), ours and torch's alike. Caching allocators (jemalloc, tcmalloc,
    torch's on CUDA) reuse blocks; this makes glibc do the same, so that the benchmark
    times the kernels. Returns whether the setting took effect."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def output_stem(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="a few cases and rounds: a smoke run")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="CPU thread counts (default: 1 and all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cases", default=None, help="regular expression selecting cases by name")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per case")
    parser.add_argument("--round-ms", type=float, default=None, help="minimum duration of one round")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default of mapping large blocks afresh (CPU): every large "
                             "output then costs page faults")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        if not tbn.with_cuda:
            parser.error("--device cuda: this torch_batchnorm build has no CUDA kernels")
        torch.backends.cudnn.benchmark = False
    if args.threads is None:
        all_threads = torch.get_num_threads()
        args.threads = sorted({1, all_threads})
    if args.round_ms is None:
        args.round_ms = 2.0 if args.quick else 5.0

    torch.manual_seed(0)
    info = machine_info(args.device)
    if args.device == "cpu":
        info["large_blocks_reused"] = False if args.system_malloc else reuse_large_blocks()
    threads_before = torch.get_num_threads()
    try:
        rows, meta = run_suite(args)
    finally:
        torch.set_num_threads(threads_before)
    summ = summary(rows)
    print()
    for s in summ:
        print(f"{s['dtype']:8s} threads={s['threads']} {s['mode']:13s} {s['vs']:>8s}/ours: "
              f"geomean {s['geomean']:.2f}x  min {s['min']:.2f}x ({s['min_case']})")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.device)
    payload = {"machine": info, "meta": meta, "summary": summ, "rows": [asdict(r) for r in rows]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(args.out / f"{stem}.md", rows, summ, meta, info)
    write_chart(args.out / f"{stem}.png", rows, f"torch_batchnorm vs torch: {info.get('gpu') or info.get('model_name', '')}")
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
