"""What torch_batchnorm buys a whole network: a ResNet-50 trained and evaluated with
torch.nn.BatchNorm2d and with torch_batchnorm (tbn.convert_batchnorm of a copy with the
same weights), side by side in one process.

bench_batch_norm.py times BatchNorm alone; here it shares the step with convolutions,
ReLUs, residual additions, the loss and the optimiser, so the gain is its share of the
step. The network is torchvision's ResNet-50 layout (bottleneck blocks [3, 4, 6, 3],
written out below, so no torchvision is needed) on 112x112 images by default, which
keeps a training step near a second on two cores; the BatchNorm inputs are then a
quarter of their size at 224x224. Each round times a few training steps (forward,
cross-entropy, backward, SGD) or evaluation forwards of one model, then of the other, in
alternating order; the result is the median round and the median of the per-round
ratios. A profile of one call of each model gives the share of the BatchNorm ops.

    python benchmarks/bench_model.py                      # float32, NCHW and channels-last
    python benchmarks/bench_model.py --dtype bfloat16
    python benchmarks/bench_model.py --batch 2 --size 32 --rounds 1 --calls 1   # smoke run

Writes <out>/cpu-model-<dtype>.md and prints the same rows.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch_batchnorm as tbn
from bench_batch_norm import add_threads_argument, machine_info, reuse_large_blocks
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def resnet50(num_classes: int = 1000) -> nn.Module:
    layers = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
            inplanes = planes * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*layers)


def make_step(model, x, target, training: bool):
    if not training:

        def infer():
            with torch.no_grad():
                model(x)

        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).float(), target).backward()
        opt.step()

    return step


def batch_norm_share(fn) -> float:
    """Fraction of one call's CPU time spent in the BatchNorm ops (ours or torch's)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bn = sum(
        e.self_cpu_time_total
        for e in events
        if "batch_norm" in e.key and not e.key.startswith("autograd::engine")
    )
    return bn / total if total else float("nan")


def measure(fns: dict, rounds: int, calls: int) -> dict:
    for f in fns.values():  # warm-up: allocations, one-time initialisation
        f()
        f()
    times = {name: [] for name in fns}
    ratios = []
    names = list(fns)
    for r in range(rounds):
        per_call = {}
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            per_call[name] = (time.perf_counter() - start) / calls
            times[name].append(per_call[name])
        ratios.append(per_call["torch"] / per_call["ours"])
    return {
        "torch": statistics.median(times["torch"]),
        "ours": statistics.median(times["ours"]),
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="image height and width")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "cl"], default=["nchw", "cl"])
    add_threads_argument(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2, help="steps per round")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    # glibc keeps freed large blocks, as in bench_batch_norm.py: see there.
    reuse_large_blocks()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x0 = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))
    rows = []
    for layout in args.layouts:
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        x = x0.to(dtype).contiguous(memory_format=fmt)
        for n in args.threads:
            torch.set_num_threads(n)
            for mode in ("train", "eval"):
                torch.manual_seed(0)
                base = resnet50().to(dtype=dtype, memory_format=fmt).train(mode == "train")
                models = {"torch": base, "ours": tbn.convert_batchnorm(copy.deepcopy(base))}
                fns = {k: make_step(m, x, target, mode == "train") for k, m in models.items()}
                res = measure(fns, args.rounds, args.calls)
                res["share"] = {k: batch_norm_share(f) for k, f in fns.items()}
                rows.append((layout, n, mode, res))
                lo, hi = res["ratio_range"]
                print(
                    f"{layout:4s} t={n} {mode:5s} torch {res['torch'] * 1e3:8.1f} ms  ours "
                    f"{res['ours'] * 1e3:8.1f} ms  torch/ours {res['ratio']:.3f}x "
                    f"({lo:.3f}-{hi:.3f})  BatchNorm share: torch {res['share']['torch']:.0%}, "
                    f"ours {res['share']['ours']:.0%}",
                    flush=True,
                )

    info = machine_info("cpu")
    lines = [
        f"# ResNet-50 training and evaluation with torch_batchnorm ({args.dtype})",
        "",
        (
            f"{info.get('model_name', 'CPU')} ({info.get('logical_cpus')} logical CPUs), torch "
            f"{info['torch']}, commit {info.get('git_commit', '?')}, {info['date'][:10]}; batch "
            f"{args.batch}, {args.size}x{args.size} images, {args.rounds} alternating rounds of "
            f"{args.calls} calls (`python benchmarks/bench_model.py`; see its docstring)."
        ),
        "",
        (
            "| layout | threads | mode | torch | ours | torch / ours (range over rounds) "
            "| BatchNorm share of the time: torch, ours |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for layout, n, mode, res in rows:
        lo, hi = res["ratio_range"]
        lines.append(
            f"| {'channels-last' if layout == 'cl' else 'NCHW'} | {n} | "
            f"{'training step' if mode == 'train' else 'evaluation'} | "
            f"{res['torch'] * 1e3:.1f} ms | {res['ours'] * 1e3:.1f} ms | "
            f"{res['ratio']:.3f}x ({lo:.3f}-{hi:.3f}) | "
            f"{res['share']['torch']:.0%}, {res['share']['ours']:.0%} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-model-{args.dtype}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
