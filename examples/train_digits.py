"""Train a small CNN on scikit-learn's bundled digits twice, side by side: once with
torch.nn.BatchNorm2d and once converted to torch_batchnorm, from the same initial
weights and the same batches. Prints both loss curves and their largest difference.

Training is chaotic: a float32 rounding difference that flips one ReLU or max-pool tie
grows step by step, so two correct implementations can drift apart. As a yardstick the
demo also trains a third copy whose BatchNorm is the textbook formula in plain tensor
ops (as accurate per call as torch's) and prints how far that one drifts from torch."""

import argparse
import copy

import torch
from sklearn.datasets import load_digits

import torch_batchnorm as tbn


class TextbookBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with plain tensor ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if not self.training:
            mean, var = self.running_mean.view(shape), self.running_var.view(shape)
        else:
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean.flatten(), self.momentum)
                self.running_var.lerp_(var.flatten() * n / (n - 1), self.momentum)
                self.num_batches_tracked.add_(1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(
            shape
        )


def textbook(model: torch.nn.Module) -> torch.nn.Module:
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            new = TextbookBatchNorm.__new__(TextbookBatchNorm)
            new.__dict__ = child.__dict__.copy()
            setattr(model, name, new)
    return model


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    reference = make_model().to(memory_format=memory_format)
    ours = tbn.convert_batchnorm(copy.deepcopy(reference))
    models = {
        "torch.nn.BatchNorm": reference,
        "torch_batchnorm": ours,
        "textbook": textbook(copy.deepcopy(reference)),
    }
    optimizers = {
        k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for k, m in models.items()
    }
    losses = {k: [] for k in models}

    print(f"{'epoch':>5} {'torch.nn.BatchNorm':>20} {'torch_batchnorm':>18} {'|difference|':>14}")
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train))
        epoch_loss = {k: 0.0 for k in models}
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs more than one value per channel
            xb = x_train[idx].contiguous(memory_format=memory_format)
            for name, model in models.items():
                model.train()
                loss = torch.nn.functional.cross_entropy(model(xb), y_train[idx])
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                losses[name].append(loss.item())
                epoch_loss[name] += loss.item() * len(idx)
        a, b, _ = (epoch_loss[k] / len(order) for k in models)
        print(f"{epoch + 1:>5} {a:>20.6f} {b:>18.6f} {abs(a - b):>14.2e}")

    accuracy = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            accuracy[name] = (model(x_test).argmax(1) == y_test).float().mean().item()
    base = losses["torch.nn.BatchNorm"]
    ours_diff = max(abs(a - b) for a, b in zip(base, losses["torch_batchnorm"]))
    textbook_diff = max(abs(a - b) for a, b in zip(base, losses["textbook"]))
    print(f"steps: {len(base)}")
    print(f"largest per-step loss difference, torch_batchnorm vs torch: {ours_diff:.3e}")
    print(f"yardstick, textbook BatchNorm vs torch:                    {textbook_diff:.3e}")
    print(
        "test accuracy: "
        + ", ".join(f"{k} {accuracy[k]:.4f}" for k in ("torch.nn.BatchNorm", "torch_batchnorm"))
    )


if __name__ == "__main__":
    main()
