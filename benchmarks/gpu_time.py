"""GPU time of BatchNorm on CUDA, ours and torch's, per shape: the sum of the device time
of the kernels of one call, from torch's profiler.

Wall-clock timings of small layers measure the host: issuing a training step takes longer
than its kernels run on the GPU. This measures the GPU's share, which is what a step costs
once the host runs ahead of the GPU (CUDA graphs, a model whose other layers keep the GPU
busy), and it sets builds side by side:

    python benchmarks/gpu_time.py                    # the torch_batchnorm on sys.path
    python benchmarks/gpu_time.py --compare A B ...  # source trees, each with a built
                                                     # python/torch_batchnorm (gpu_ab.sh)

Modes: "fwd" is the training forward alone (no autograd), "step" the module's training
forward and backward for input, weight and bias. "torch" is whatever torch picks (cuDNN
for 4D input). Each is warmed up, then profiled over several calls. --kernels also lists
the costliest kernels of each call: which one a change should target. Every case also
compares one training step's results with torch's, so that a build that computes wrong
results is flagged in the same run (WRONG in the table's last lines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

# ResNet-50's BatchNorm shapes at batch 32, a large activation and an MLP layer.
RESNET50 = [
    (64, 112),
    (64, 56),
    (256, 56),
    (128, 56),
    (128, 28),
    (512, 28),
    (256, 28),
    (256, 14),
    (1024, 14),
    (512, 14),
    (512, 7),
    (2048, 7),
]
SHAPES = [(32, c, hw, hw) for c, hw in RESNET50] + [(64, 256, 56, 56), (256, 4096)]
MODES = ("fwd", "step")
# Differences from torch's results (difference) past which a build is wrong,
# not rounded otherwise: far above rounding, far below a wrong kernel's.
DIFFERENCE_LIMITS = {"float32": 1e-3, "bfloat16": 5e-2}


def case_name(shape, dtype: str, channels_last: bool) -> str:
    layout = "2d" if len(shape) == 2 else "cl" if channels_last else "nchw"
    return f"[{'x'.join(map(str, shape))}] {dtype} {layout}"


def short_kernel_name(name: str) -> str:
    """A kernel's name without namespaces and parameter list:
    "reduce_rows_kernel<StatsOp<float>, float, 4>"; "Memset (Device)" stays."""
    name = re.sub(r"\(anonymous namespace\)::|\b\w+::|^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0 and name[i - 1] != " ":
            return name[:i][:90]
    return name[:90]


def difference(ours, ref, x):
    """The largest difference between ours and torch's in one training step (output,
    the three gradients, the running statistics), each relative to the largest
    magnitude of torch's: rounding makes it about 1e-6 in float32 and 1e-2 in bfloat16,
    a wrong kernel about 1."""
    import torch

    C = x.shape[1]
    g = torch.randn_like(x)
    results = []
    for module in (ours, ref):
        m = module(C, device=x.device)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, C))
            m.bias.copy_(torch.linspace(-0.5, 0.5, C))
        xg = x.clone().requires_grad_()
        y = m(xg)
        grads = torch.autograd.grad(y, (xg, m.weight, m.bias), g)
        results.append([t.float() for t in (y, *grads, m.running_mean, m.running_var)])
    return max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*results)
    )


def measure(calls: int) -> dict:
    """{case: {impl: {mode: us, "kernels": {mode: [[us, launches, kernel], ...]}},
    "difference": float}} for this process's torch_batchnorm: GPU time per call, and its
    kernels, costliest first; and how far its results are from torch's (difference)."""
    import torch
    import torch_batchnorm as tbn
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def gpu_us(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        kernels = sorted(
            (
                [e.self_device_time_total / calls, e.count / calls, short_kernel_name(e.key)]
                for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA
            ),
            reverse=True,
        )
        return sum(k[0] for k in kernels), kernels

    def modes(module, x):
        m = module(x.shape[1]).cuda()
        xg = x.clone().requires_grad_()
        g = torch.randn_like(x)
        inputs = [xg, *m.parameters()]

        def fwd():
            with torch.no_grad():
                m(x)

        def step():
            torch.autograd.grad(m(xg), inputs, g)

        result = {"kernels": {}}
        for mode, fn in (("fwd", fwd), ("step", step)):
            result[mode], result["kernels"][mode] = gpu_us(fn)
        return result

    torch.manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16 input, float32 parameters
        for shape in SHAPES:
            ours, ref = (
                (tbn.BatchNorm1d, torch.nn.BatchNorm1d)
                if len(shape) == 2
                else (tbn.BatchNorm2d, torch.nn.BatchNorm2d)
            )
            for channels_last in (False, True) if len(shape) == 4 else (False,):
                x = torch.randn(shape, device="cuda").to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                name = case_name(shape, str(dtype)[6:], channels_last)
                results[name] = {
                    "ours": modes(ours, x),
                    "torch": modes(ref, x),
                    "difference": difference(ours, ref, x),
                }
    return results


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table(results: dict[str, dict]) -> str:
    """Markdown: GPU us per call of each build and of torch (from the first build's run),
    then geometric means of torch / ours per build, by layout."""
    names = list(results)
    first = results[names[0]]
    cases = [c for c in first if all(c in r for r in results.values())]
    lines = [
        "| case | " + " | ".join(f"{n} {m}" for n in names + ["torch"] for m in MODES) + " |",
        "|---|" + "---|" * (len(MODES) * (len(names) + 1)),
    ]
    for c in cases:
        cells = [f"{results[n][c]['ours'][m]:.1f}" for n in names for m in MODES]
        cells += [f"{first[c]['torch'][m]:.1f}" for m in MODES]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| build | layout | cases | " + " | ".join(f"torch/ours {m}" for m in MODES) + " |",
        "|---|---|---|" + "---|" * len(MODES),
    ]
    for n in names:
        for layout in ("nchw", "cl", "2d"):
            picked = [c for c in cases if c.endswith(" " + layout)]
            if not picked:
                continue
            cells = []
            for m in MODES:
                r = [results[n][c]["torch"][m] / results[n][c]["ours"][m] for c in picked]
                cells.append(f"{geomean(r):.2f}x (min {min(r):.2f}x)")
            lines.append(f"| {n} | {layout} | {len(picked)} | " + " | ".join(cells) + " |")
    if any("difference" in results[n][c] for n in names for c in cases):
        lines += ["", "Largest difference from torch's results (difference), per build:"]
    for n in names:
        cells = []
        for dtype, limit in DIFFERENCE_LIMITS.items():
            picked = [c for c in cases if f" {dtype} " in c and "difference" in results[n][c]]
            if picked:
                worst = max(picked, key=lambda c: results[n][c]["difference"])
                value = results[n][worst]["difference"]
                flag = "" if value <= limit else f" WRONG (over {limit:g})"
                cells.append(f"{dtype} {value:.2g} at {worst}{flag}")
        if cells:
            lines.append(f"- {n}: " + "; ".join(cells))
    return "\n".join(lines)


def is_wrong(result: dict) -> bool:
    """Whether a build's results differ from torch's past DIFFERENCE_LIMITS in any case."""
    return any(
        case.get("difference", 0) > limit
        for name, case in result.items()
        for dtype, limit in DIFFERENCE_LIMITS.items()
        if f" {dtype} " in name
    )


def best(results: dict[str, dict], excluded=()) -> str | None:
    """The build with the largest geometric mean of torch / ours over every case and mode,
    among those not WRONG and not `excluded`; None if there is none."""
    scores = {
        n: geomean(r[c]["torch"][m] / r[c]["ours"][m] for c in r for m in MODES)
        for n, r in results.items()
        if r and not is_wrong(r) and n not in excluded
    }
    return max(scores, key=scores.get) if scores else None


def kernel_table(results: dict[str, dict], top: int = 4) -> str:
    """Markdown: the costliest kernels of each call, per case, build and mode, and torch's
    (from the first build's run): where the time of a case goes."""
    names = list(results)
    first = results[names[0]]
    lines = [
        "| case | build | mode | us | kernels: us per call (launches) |",
        "|---|---|---|---|---|",
    ]
    for c in first:
        runs = [(n, results[n][c]["ours"]) for n in names if c in results[n]]
        for n, r in runs + [("torch", first[c]["torch"])]:
            for m in MODES:
                kernels = "; ".join(
                    f"`{k}` {us:.1f} ({count:g})" for us, count, k in r["kernels"][m][:top]
                )
                lines.append(f"| {c} | {n} | {m} | {r[m]:.1f} | {kernels} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="TREE",
        help="source trees with a built python/torch_batchnorm, measured one process each",
    )
    parser.add_argument("--calls", type=int, default=8, help="profiled calls per measurement")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120,
        help="seconds each --compare build may take (one measures in about 15 s): a build "
        "whose kernels hang is reported and the others still measured",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--kernels", type=Path, help="also write each case's costliest kernels here (markdown)"
    )
    parser.add_argument(
        "--best",
        type=Path,
        help="with --compare, write the path of the fastest tree whose results are right here",
    )
    parser.add_argument(
        "--not-best",
        action="append",
        type=Path,
        default=[],
        metavar="TREE",
        help="a --compare tree measured for comparison only, never chosen by --best",
    )
    # --compare's check that each run imports the tree it was given
    parser.add_argument("--expect-under", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    status = 0
    if args.compare:
        results = {}
        trees = {}
        for tree in args.compare:
            tree = tree.resolve()
            env = {**os.environ, "PYTHONPATH": str(tree / "python")}
            try:
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--calls",
                        str(args.calls),
                        "--expect-under",
                        str(tree),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:
                print(f"{tree}: no result within {args.timeout:g} s", file=sys.stderr)
                status = 1
                continue
            raw = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
            if done.returncode or not raw:
                print(
                    f"{tree}: failed (rc {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr
                )
                status = 1
                continue
            label = tree.name if tree.name not in results else str(tree)
            results[label] = json.loads(raw[0][5:])
            trees[label] = tree
            if args.json:  # what is measured so far survives a run cut short
                args.json.write_text(json.dumps(results, indent=1))
        if not results:
            return 1
    else:
        import torch
        import torch_batchnorm

        if args.expect_under is not None:
            where = Path(torch_batchnorm.__file__).resolve()
            if args.expect_under.resolve() not in where.parents:
                print(
                    f"gpu_time.py: torch_batchnorm from {where}, not from {args.expect_under}",
                    file=sys.stderr,
                )
                return 2
        if not torch.cuda.is_available():
            print("gpu_time.py: no CUDA device", file=sys.stderr)
            return 77
        results = {"ours": measure(args.calls)}
        print("JSON " + json.dumps(results["ours"]))
    print(
        "GPU time per call in us (sum of the kernels' device time); "
        "torch's from the first build's run\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.kernels:
        args.kernels.write_text(kernel_table(results) + "\n")
    if args.compare and args.best:
        not_best = {p.resolve() for p in args.not_best}
        chosen = best(results, {n for n, t in trees.items() if t in not_best})
        print(f"\nfastest with right results: {chosen or 'none'}")
        args.best.write_text(f"{trees[chosen]}\n" if chosen else "")
    return status


if __name__ == "__main__":
    sys.exit(main())
