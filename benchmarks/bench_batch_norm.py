"""torch_batchnorm against torch's own BatchNorm, side by side in one process.

For every case (shape, memory layout, dtype, thread count, mode) each implementation is
warmed up, then timed in interleaved rounds (ours, torch, textbook, ours, ...) so that
drifting clocks and noisy neighbours hit all of them alike. A round runs enough calls to
last a few milliseconds; the reported time is the median round, and a ratio to ours is
the median of the per-round ratios. On the CPU, glibc is told to reuse freed large
blocks (as jemalloc or tcmalloc would; --system-malloc keeps its default of unmapping
them, which adds page-fault time to every large output, ours and torch's alike). CUDA
times come from CUDA events.

Implementations:
  ours      torch_batchnorm (the functional op, or the module for the "module" and
            "block" cases)
  torch     torch.nn.functional.batch_norm (the module torch.nn.BatchNormNd for "module"
            and "block")
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
cache can exceed 100%. The "block" cases count the module's bytes only, not the
ReLU's.

    python benchmarks/bench_batch_norm.py                 # CPU, full suite
    python benchmarks/bench_batch_norm.py --quick         # CPU smoke run, < 1 minute
    python benchmarks/bench_batch_norm.py --device cuda   # CUDA suite (needs a CUDA build)

Writes <out>/cpu.{json,md,png} or <out>/cuda-<gpu>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable

import torch
import torch_batchnorm as tbn

MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
# Bytes moved per mode, in multiples of the input's size (see the module docstring).
TRAFFIC = {"eval_fwd": 2, "train_fwd": 3, "train_fwd_bwd": 8}
# The headline's words for each mode, in its order.
MODE_WORDS = {
    "train_fwd_bwd": "training forward+backward",
    "train_fwd": "training forward",
    "eval_fwd": "evaluation",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------
# Shapes

# ResNet-50 (torchvision, stride on the 3x3 convolution): the distinct (channels,
# resolution) pairs of its 53 BatchNorm layers, at batch 32.
RESNET50_LAYERS = [
    (64, 112),
    (64, 56),
    (128, 56),
    (256, 56),
    (128, 28),
    (256, 28),
    (512, 28),
    (256, 14),
    (512, 14),
    (1024, 14),
    (512, 7),
    (2048, 7),
]
RESNET50_QUICK = [(256, 14), (512, 7)]


@dataclass(frozen=True)
class Case:
    family: str  # resnet50, mlp, video, small, module, block, large
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
    video = (
        [(8, 256, 4, 14, 14)]
        if quick
        else [(8, 64, 16, 56, 56), (8, 128, 8, 28, 28), (8, 256, 4, 14, 14)]
    )
    for s in video:
        cases += [Case("video", s, "nchw"), Case("video", s, "cl")]
    # Small inputs, where per-call overhead dominates.
    small = [((8, 16, 4, 4), "nchw"), ((8, 16, 4, 4), "cl"), ((32, 64), "2d")]
    if not quick:
        small += [((2, 32, 8, 8), "nchw"), ((16, 256, 1, 1), "cl"), ((4, 8, 4, 4, 4), "nchw")]
    cases += [Case("small", s, layout) for s, layout in small]
    # The module itself (Python forward, autograd), on a tiny input.
    cases.append(Case("module", (8, 16, 4, 4), "nchw"))
    # The module followed by ReLU(inplace=True), as in a network's conv-BN-ReLU: the next
    # layer reads the output at once, from cache where it is still there, which a module
    # timed alone never does.
    blocks = (
        [((32, 128, 28, 28), "nchw")]
        if quick
        else [
            ((32, 128, 28, 28), "nchw"),
            ((32, 128, 28, 28), "cl"),
            ((32, 1024, 14, 14), "nchw"),
            ((32, 256, 56, 56), "nchw"),
            ((4096, 1024), "2d"),
        ]
    )
    cases += [Case("block", s, layout) for s, layout in blocks]
    return cases


def cuda_cases(quick: bool) -> list[Case]:
    cases = []
    for c, hw in RESNET50_QUICK if quick else RESNET50_LAYERS:
        for layout in ("nchw", "cl"):
            cases.append(Case("resnet50", (32, c, hw, hw), layout))
    large = (
        [(64, 256, 56, 56)] if quick else [(64, 256, 56, 56), (128, 64, 112, 112), (16384, 4096)]
    )
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
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


def make_fn(impl: str, case: Case, mode: str, x, g) -> Callable[[], object]:
    """A closure running one call of `impl` in `mode` on `x` (`g`: the output gradient)."""
    C = x.shape[1]
    training = mode != "eval_fwd"
    needs_grad = mode == "train_fwd_bwd"
    dev, dtype = x.device, x.dtype

    if case.family in ("module", "block"):
        ours_cls, torch_cls = MODULES[max(1, x.dim() - 2)]
        if impl == "textbook":
            return None
        m = (ours_cls if impl == "ours" else torch_cls)(C, device=dev, dtype=dtype)
        if case.family == "block":
            m = torch.nn.Sequential(m, torch.nn.ReLU(inplace=True))
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


def cudnn_disabled():
    """torch with cuDNN disabled runs its own ("native") CUDA kernels."""
    return torch.backends.cudnn.flags(enabled=False)


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


def measure(
    fns: dict, timer: Timer, rounds: int, round_s: float, budget_s: float, contexts=None
) -> dict:
    """Median and spread of the per-call time of every closure, timed in interleaved
    rounds whose order rotates, after a warm-up that also sizes each round. Short calls
    get more rounds, up to `budget_s` per closure. The first closure is the reference of
    the ratios. `contexts` maps a closure's name to a context manager entered around each
    of its rounds (outside the timed region)."""
    contexts = contexts or {}

    def run(name, calls):
        with contexts.get(name, contextlib.nullcontext)():
            return timer(fns[name], calls)

    calls = {}
    affordable = []
    for name in fns:
        run(name, 1)  # first call: allocations, lazy initialisation
        t = run(name, 1)
        n = 1
        while t < round_s / 4 and n < 1 << 16:
            n *= 4
            t = run(name, n)
        calls[name] = max(1, math.ceil(n * round_s / max(t, 1e-9)))
        affordable.append(int(budget_s / max(t / n * calls[name], 1e-9)))
    rounds = max(rounds, min(4 * rounds, *affordable))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(run(name, calls[name]) / calls[name])
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        # The ratio to ours is the median of per-round ratios: rounds are adjacent in
        # time, so a burst of load from elsewhere cancels out of each ratio.
        paired = [a / b for a, b in zip(s, samples[names[0]])]
        out[name] = {
            "median_s": statistics.median(s),
            "q1_s": q[0],
            "q3_s": q[2],
            "calls": calls[name],
            "rounds": len(s),
            "ratio": statistics.median(paired),
        }
    return out


def copy_bandwidth(device: str, nbytes: int, timer: Timer, rounds: int) -> float:
    """Bytes per second of dst.copy_(src) on a large buffer: read + write."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src), 1) for _ in range(rounds)]
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
    threads: int | None
    mode: str
    bytes: int
    times_s: dict = field(default_factory=dict)  # impl -> median seconds per call
    spread_s: dict = field(default_factory=dict)  # impl -> [q1, q3]
    ratio: dict = field(default_factory=dict)  # impl -> median over rounds of impl_time / ours_time
    ours_gbps: float = 0.0
    roofline_frac: float = 0.0


def run_suite(args, on_progress) -> tuple[list[Row], dict]:
    """Runs every case; on_progress(rows, meta) is called after each one, so that a run
    cut short still leaves its results. A case that fails is reported and skipped."""
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
    rounds = args.rounds or (3 if args.quick else 11)
    round_s = args.round_ms / 1e3
    budget_s = 0.05 if args.quick else 0.5

    rows: list[Row] = []
    meta = {
        "bandwidth_Bps": {},
        "elapsed_s": 0.0,
        "rounds": rounds,
        "round_ms": args.round_ms,
        "quick": args.quick,
        "impls": impls,
        "errors": [],
    }
    started = time.perf_counter()
    for threads in thread_counts:
        if threads is not None:
            torch.set_num_threads(threads)
        copy_bytes = (2 << 30) if device == "cuda" else (128 if args.quick else 512) << 20
        bw = copy_bandwidth(device, copy_bytes, timer, 3 if args.quick else 7)
        meta["bandwidth_Bps"][str(threads)] = bw
        print(f"# threads={threads}: copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            for case in cases:
                try:
                    rows += run_case(
                        case,
                        dtype,
                        dname,
                        threads,
                        modes,
                        impls,
                        timer,
                        rounds,
                        round_s,
                        budget_s,
                        bw,
                        device,
                    )
                except Exception as err:  # noqa: BLE001 - one failing case must not lose the run
                    msg = f"{case.name} {dname} threads={threads}: {type(err).__name__}: {err}"
                    print(f"# FAILED {msg}", file=sys.stderr, flush=True)
                    meta["errors"].append(msg)
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                meta["elapsed_s"] = time.perf_counter() - started
                on_progress(rows, meta)
    return rows, meta


def run_case(
    case, dtype, dname, threads, modes, impls, timer, rounds, round_s, budget_s, bw, device
):
    x = make_input(case, dtype, device)
    g = torch.randn_like(x)
    rows = []
    for mode in modes:
        fns = {}
        for impl in impls:
            with cudnn_disabled() if impl == "native" else contextlib.nullcontext():
                fn = make_fn(impl, case, mode, x, g)
            if fn is not None:
                fns[impl] = fn
        res = measure(fns, timer, rounds, round_s, budget_s, {"native": cudnn_disabled})
        row = Row(
            case=case.name,
            family=case.family,
            shape=list(case.shape),
            layout=case.layout,
            dtype=dname,
            threads=threads,
            mode=mode,
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
    return rows


def format_progress(row: Row) -> str:
    others = "  ".join(f"{k}/ours {v:5.2f}x" for k, v in row.ratio.items() if k != "ours")
    return (
        f"{row.case:34s} {row.dtype:8s} t={row.threads} {row.mode:13s} "
        f"ours {fmt_time(row.times_s['ours']):>9s}  {others}  {row.roofline_frac:6.1%} roofline"
    )


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
        for key in (
            "Model name",
            "Core(s) per socket",
            "Socket(s)",
            "Thread(s) per core",
            "L2 cache",
            "L3 cache",
        ):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", lscpu, re.MULTILINE)
            if m:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = m.group(1).strip()
        # The CPU features the kernels pick their loops by (bfloat16 and float16 stores
        # convert with AVX-512 BF16 and F16C where present).
        m = re.search(r"^Flags:\s*(.+)$", lscpu, re.MULTILINE)
        if m:
            flags = set(m.group(1).split())
            wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16")
            info["cpu_flags"] = " ".join(f for f in wanted if f in flags)
    except (OSError, subprocess.CalledProcessError):
        info["model_name"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
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
            out.append(
                {
                    "dtype": dtype,
                    "threads": threads,
                    "mode": mode,
                    "vs": impl,
                    "cases": len(ratios),
                    "geomean": geomean(ratios),
                    "min": min(ratios),
                    "min_case": worst.case,
                }
            )
    return out


def threads_label(threads) -> str:
    return "-" if threads is None else str(threads)


def headline(rows: list[Row], summ: list[dict], meta: dict, info: dict) -> str:
    """A paragraph of the main numbers, for a README."""
    by = {(s["dtype"], s["threads"], s["mode"], s["vs"]): s for s in summ}
    cuda = "gpu" in info
    machine = (
        info.get("gpu")
        if cuda
        else f"{info.get('model_name', 'this CPU')} ({info.get('logical_cpus')} cores)"
    )
    vs = "torch (cuDNN where it applies)" if cuda else "torch.nn.functional.batch_norm"
    parts = []
    for dtype in DTYPES:
        for threads in sorted({r.threads for r in rows if r.dtype == dtype}, key=lambda t: t or 0):
            # Whichever modes this run measured (--modes may select some).
            modes = []
            for mode, words in MODE_WORDS.items():
                s = by.get((dtype, threads, mode, "torch"))
                if s:
                    slowest = "" if mode == "train_fwd" else f" (slowest case {s['min']:.2f}x)"
                    modes.append(f"{words} {s['geomean']:.2f}x{slowest}")
            if not modes:
                continue
            where = dtype if cuda else f"{dtype}, {threads} thread{'s' if threads != 1 else ''}"
            parts.append(f"{where}: " + ", ".join(modes))
    text = (
        f"On {machine} with torch {info.get('torch')}, torch_batchnorm is faster than {vs} by, "
        f"as a geometric mean over {len({r.case for r in rows})} shapes (time of torch / time of ours): "
        + "; ".join(parts)
        + "."
    )
    # Memory efficiency of the forward on the largest input (of the op alone: a block's
    # time includes its ReLU).
    big = [
        r for r in rows if r.mode == "train_fwd" and r.dtype == "float32" and r.family != "block"
    ]
    if big:
        name = max(big, key=lambda r: r.bytes).case
        fracs = [
            f"{r.roofline_frac:.0%}"
            + ("" if cuda else f" ({r.threads} thread{'s' if r.threads != 1 else ''})")
            for r in big
            if r.case == name
        ]
        text += (
            f" On the largest input ({name}, float32) the training forward moves data at "
            f"{', '.join(fracs)} of the copy bandwidth measured in the same run."
        )
    return text


def write_markdown(path: Path, rows, summ, meta, info):
    impls = [i for i in meta["impls"] if i != "ours"]
    lines = [f"# torch_batchnorm benchmark: {info.get('gpu') or info.get('model_name', 'CPU')}", ""]
    lines += ["## Headline", "", headline(rows, summ, meta, info), ""]
    lines += ["![speed-up over torch](" + path.with_suffix(".png").name + ")", ""]
    lines += ["## Machine", ""]
    for k, v in info.items():
        lines.append(f"- {k}: {v}")
    for t, bw in meta["bandwidth_Bps"].items():
        where = "" if t == "None" else f" (threads={t})"
        lines.append(f"- copy bandwidth{where}: {bw / 1e9:.1f} GB/s")
    lines.append(
        f"- at least {meta['rounds']} interleaved rounds of >= {meta['round_ms']} ms per case "
        f"(more for short calls); times are medians, ratios the median of per-round ratios; "
        f"{meta['elapsed_s']:.0f} s in all"
    )
    lines.append(
        "- bytes moved per call, in input sizes: evaluation 2, training forward 3, training "
        "forward+backward 8 (see the script's docstring); roofline = those bytes / time / copy bandwidth"
    )
    for err in meta.get("errors", []):
        lines.append(f"- FAILED: {err}")
    lines += ["", "## Summary: speed-up of ours over each implementation (its time / ours)", ""]
    lines.append("| dtype | threads | mode | vs | cases | geomean | min | slowest case |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in summ:
        lines.append(
            f"| {s['dtype']} | {threads_label(s['threads'])} | {s['mode']} | {s['vs']} | {s['cases']} | "
            f"{s['geomean']:.2f}x | {s['min']:.2f}x | {s['min_case']} |"
        )
    lines += ["", "## All cases", ""]
    header = (
        ["case", "dtype", "threads", "mode", "ours"]
        + impls
        + [f"{i}/ours" for i in impls]
        + ["ours GB/s", "roofline"]
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r.case, r.dtype, threads_label(r.threads), r.mode, fmt_time(r.times_s["ours"])]
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
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed: no chart written", file=sys.stderr)
        return
    dtype_order = list(DTYPES)
    panels = sorted(
        {(r.dtype, r.threads) for r in rows},
        key=lambda p: (dtype_order.index(p[0]) if p[0] in dtype_order else 99, p[1] or 0),
    )
    cases = list(dict.fromkeys(r.case for r in rows))
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4.8 * len(panels) + 2.5, 0.3 * len(cases) + 1.8),
        sharey=True,
        squeeze=False,
    )
    colors = {"train_fwd": "#4C72B0", "train_fwd_bwd": "#DD8452", "eval_fwd": "#55A868"}
    height = 0.8 / len(MODES)
    # Ratios on a log axis, so that 2x faster and 2x slower look alike; bars beyond the
    # axis are clipped at its edge.
    lo, hi = 0.25, 8.0
    for ax, (dtype, threads) in zip(axes[0], panels):
        for k, mode in enumerate(MODES):
            ratio = {
                r.case: r.ratio["torch"]
                for r in rows
                if r.dtype == dtype and r.threads == threads and r.mode == mode
            }
            ys = [i + (k - 1) * height for i, c in enumerate(cases) if c in ratio]
            vals = [min(max(ratio[c], lo * 1.01), hi * 0.99) for c in cases if c in ratio]
            # Bars start at 1x: right of it ours is faster, left of it slower.
            widths = [v - 1.0 for v in vals]
            ax.barh(ys, widths, height=height, color=colors[mode], label=mode, left=1.0)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ticks = [0.25, 0.5, 1, 2, 4, 8]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.axvline(1.0, color="black", linewidth=0.8)
        suffix = "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"
        ax.set_title(dtype + suffix)
        ax.set_xlabel("speed-up over torch (torch time / ours)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(cases)))
    axes[0][0].set_yticklabels(cases, fontsize=8)
    axes[0][0].invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(MODES), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=sorted({1, torch.get_num_threads()}),
        help="CPU thread counts (default: 1 and all)",
    )


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
    parser.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"]
    )
    add_threads_argument(parser)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cases", default=None, help="regular expression selecting cases by name")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds per case"
    )
    parser.add_argument(
        "--round-ms", type=float, default=None, help="minimum duration of one round"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default of mapping large blocks afresh (CPU): every large "
        "output then costs page faults",
    )
    args = parser.parse_args(argv)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        if not tbn.with_cuda:
            parser.error("--device cuda: this torch_batchnorm build has no CUDA kernels")
        torch.backends.cudnn.benchmark = False
    if args.round_ms is None:
        args.round_ms = 1.0 if args.quick else 5.0

    torch.manual_seed(0)
    info = machine_info(args.device)
    if args.device == "cpu":
        info["large_blocks_reused"] = False if args.system_malloc else reuse_large_blocks()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.device)

    def write_json(rows, meta):
        payload = {
            "machine": info,
            "meta": meta,
            "summary": summary(rows),
            "rows": [asdict(r) for r in rows],
        }
        (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")

    threads_before = torch.get_num_threads()
    try:
        rows, meta = run_suite(args, write_json)
    finally:
        torch.set_num_threads(threads_before)
    summ = summary(rows)
    print()
    for s in summ:
        print(
            f"{s['dtype']:8s} threads={s['threads']} {s['mode']:13s} {s['vs']:>8s}/ours: "
            f"geomean {s['geomean']:.2f}x  min {s['min']:.2f}x ({s['min_case']})"
        )
    print()
    print(headline(rows, summ, meta, info))

    write_json(rows, meta)
    write_markdown(args.out / f"{stem}.md", rows, summ, meta, info)
    write_chart(
        args.out / f"{stem}.png",
        rows,
        f"torch_batchnorm vs torch: {info.get('gpu') or info.get('model_name', '')}",
    )
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
