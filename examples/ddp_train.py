"""Data-parallel training on CPU with synchronized BatchNorm over gloo.

    torchrun --nproc_per_node 2 examples/ddp_train.py

Each process trains on its own shard of scikit-learn's digits; convert_sync_batchnorm
makes every BatchNorm layer normalise with statistics of the whole global batch, which
torch.nn.SyncBatchNorm cannot do for CPU tensors.
"""

import argparse

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel

import torch_batchnorm as tbn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 10),
    )
    model = tbn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x, y = x[rank::world], y[rank::world]  # this process's shard

    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch + rank))
        total, batches = 0.0, 0
        for start in range(0, len(order) - 1, args.batch_size):
            idx = order[start : start + args.batch_size]
            loss = torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        mean_loss = torch.tensor([total / batches])
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {mean_loss.item() / world:.4f}")

    # Synchronized statistics: every rank holds the same running statistics.
    bn = model[1]
    stats = torch.cat([bn.running_mean, bn.running_var])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"running statistics identical on all {world} ranks: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
