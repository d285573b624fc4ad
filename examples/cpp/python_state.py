"""Python half of the state example: the examples' network built with plain torch.nn,
whose state moves to and from the C++ programs.

    python python_state.py save OUT_DIR
        trains the network a little and writes OUT_DIR/net_state.pt (its state dict) and
        OUT_DIR/reference.pt (an input and the output in evaluation mode), which the C++
        program load_python_state reads and checks.

    python python_state.py load STATE.pt [--expect-batches N]
        loads a state written by C++ (train_convnet --save STATE.pt) into the network,
        strictly: every key and shape must match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


def make_net(in_channels: int = 3, classes: int = 3) -> nn.Sequential:
    """The network of net.h, with the same state_dict keys ("0.weight", "1.running_mean"...)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def save(out_dir: Path) -> None:
    torch.manual_seed(0)
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    # A few steps, so that the running statistics and num_batches_tracked are not the
    # initial ones.
    for _ in range(5):
        images = torch.randn(16, 3, 16, 16) * 2 + 1
        labels = torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()

    out_dir.mkdir(parents=True, exist_ok=True)
    # dict(...): LibTorch cannot read the OrderedDict that state_dict() returns.
    torch.save(dict(net.state_dict()), out_dir / "net_state.pt")
    net.eval()
    images = torch.randn(4, 3, 16, 16) * 2 + 1
    with torch.no_grad():
        torch.save({"input": images, "output": net(images)}, out_dir / "reference.pt")
    print(f"saved {out_dir / 'net_state.pt'} and {out_dir / 'reference.pt'}")


def load(path: Path, expect_batches: int | None) -> None:
    net = make_net()
    net.load_state_dict(torch.load(path))  # strict: raises on any missing or extra key
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            batches = int(module.num_batches_tracked)
            print(f"layer {name}: {batches} batches, running_mean[:3] = {module.running_mean[:3]}")
            if expect_batches is not None and batches != expect_batches:
                raise SystemExit(f"layer {name} has seen {batches} batches, not {expect_batches}")
    print(f"loaded {path} into torch.nn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save_cmd = sub.add_parser("save")
    save_cmd.add_argument("out_dir", type=Path)
    load_cmd = sub.add_parser("load")
    load_cmd.add_argument("state", type=Path)
    load_cmd.add_argument("--expect-batches", type=int)
    args = parser.parse_args()
    if args.command == "save":
        save(args.out_dir)
    else:
        load(args.state, args.expect_batches)


if __name__ == "__main__":
    main()
