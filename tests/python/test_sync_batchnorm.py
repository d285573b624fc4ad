"""SyncBatchNorm over gloo on loopback: every rank must see exactly what plain BatchNorm
computes on the concatenation of all ranks' batches."""

import inspect
import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

import torch_batchnorm as tbn
from conftest import BN_TAKES_BIAS

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_data(case):
    """The whole batch, its gradient, and the initial module, identical on every rank."""
    gen = torch.Generator().manual_seed(0)
    n = sum(case["sizes"])
    shape = (n, case["channels"], *case["spatial"])
    x = torch.randn(shape, generator=gen, dtype=case["dtype"]) * 2 + 3
    grad = torch.randn(shape, generator=gen, dtype=case["dtype"])
    if case.get("infinity"):
        x[1, 1, 0, 0] = float("inf")  # on rank 0: merged with the finite means of rank 1
    module = torch.nn.BatchNorm2d(case["channels"], momentum=case["momentum"]).to(case["dtype"])
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.uniform_(-0.5, 0.5, generator=gen)
    return x, grad, module


def _layout(t, case):
    return t.contiguous(memory_format=torch.channels_last) if case["channels_last"] else t


def _run_steps(module, xs, grads, case):
    """Training steps (and an eval step) recording outputs, input and parameter grads."""
    record = []
    for _ in range(case["steps"]):
        module.train()
        x = _layout(xs.clone(), case).requires_grad_()
        if case.get("checkpoint"):
            # Runs the forward again in the backward: the running statistics advance twice.
            out = checkpoint(module, x, use_reentrant=False)
        else:
            out = module(x)
        out.backward(_layout(grads, case))
        record.append(
            {
                "out": out.detach(),
                "grad_input": x.grad,
                "grad_weight": module.weight.grad.clone(),
                "grad_bias": module.bias.grad.clone(),
            }
        )
        module.weight.grad = None
        module.bias.grad = None
    module.eval()
    record.append({"eval": module(_layout(xs, case)).detach()})
    return record, {k: v.clone() for k, v in module.state_dict().items()}


def _worker(rank, world, port, case, path):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        members = case.get("group") or list(range(world))
        group = dist.new_group(members) if case.get("group") else None
        x, grad, module = _case_data(case)
        sync = tbn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
        start = sum(case["sizes"][:rank])
        local = slice(start, start + case["sizes"][rank])
        record, state = _run_steps(sync, x[local], grad[local], case)
        for step in record[:-1]:
            # What data-parallel training does with parameter gradients.
            for key in ("grad_weight", "grad_bias"):
                if rank in members:
                    dist.all_reduce(step[key], group=group)
        torch.save({"record": record, "state": state}, path)
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, world, port, case, path):
    """DistributedDataParallel accepts our SyncBatchNorm on CPU (it refuses torch's)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        x, grad, module = _case_data(case)
        ddp = torch.nn.parallel.DistributedDataParallel(
            tbn.SyncBatchNorm.convert_sync_batchnorm(module)
        )
        start = sum(case["sizes"][:rank])
        local = slice(start, start + case["sizes"][rank])
        ddp(x[local]).backward(grad[local])
        # DDP averages gradients: the sum over ranks divided by the world size.
        torch.save({"weight": module.weight.grad * world, "state": module.state_dict()}, path)
    finally:
        dist.destroy_process_group()


def _run_worker(worker, *args):
    """Runs `worker` in a spawned process, then ends the process without shutting the
    interpreter down, as a forked one ends. Gloo's threads release the tensors of a
    finished collective on their own, taking the GIL to drop their Python objects; one
    still at it when the interpreter shuts down aborts the process after its results are
    saved ("terminate called without an active exception", torch's issue 190489 and pull
    request 179291). A worker that raises exits as usual, with its traceback."""
    worker(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_distributed(case, worker=_worker):
    world = len(case["sizes"])
    port = _free_port()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [
            ctx.Process(target=_run_worker, args=(worker, r, world, port, case, paths[r]))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(TIMEOUT_S)
            assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(p) for p in paths]


def _expected(case, ranks):
    """Plain torch BatchNorm over the concatenated batches of `ranks`."""
    x, grad, module = _case_data(case)
    starts = [sum(case["sizes"][:r]) for r in range(len(case["sizes"]))]
    index = torch.cat([torch.arange(starts[r], starts[r] + case["sizes"][r]) for r in ranks])
    return _run_steps(module, x[index], grad[index], case), starts


CASES = {
    "uneven_5_3": dict(sizes=[5, 3], channels=3, spatial=(4, 4)),
    "three_ranks": dict(sizes=[2, 4, 3], channels=4, spatial=(3, 5)),
    "empty_rank": dict(sizes=[4, 0, 3], channels=3, spatial=(2, 2)),
    "channels_last": dict(sizes=[5, 3], channels=5, spatial=(3, 3), channels_last=True),
    "momentum_none": dict(sizes=[5, 3], channels=3, spatial=(2, 3), momentum=None),
    "subgroup": dict(sizes=[3, 2, 4], channels=3, spatial=(2, 2), group=[0, 2]),
    "float32": dict(sizes=[5, 3], channels=8, spatial=(6, 6), dtype=torch.float32),
    "checkpointed": dict(sizes=[5, 3], channels=3, spatial=(2, 3), momentum=None, checkpoint=True),
    # torch gives that channel an infinite running mean, NaN elsewhere in it.
    "infinity": dict(sizes=[5, 3], channels=3, spatial=(2, 2), infinity=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sync_batchnorm_matches_batchnorm_on_the_whole_batch(name):
    case = dict(dtype=torch.float64, channels_last=False, momentum=0.1, steps=2)
    case.update(CASES[name])
    results = _run_distributed(case)
    tol = (
        dict(rtol=1e-5, atol=1e-5, equal_nan=True)
        if case["dtype"] == torch.float32
        else dict(rtol=1e-10, atol=1e-10, equal_nan=True)
    )
    groups = (
        [case["group"], [r for r in range(len(case["sizes"])) if r not in case["group"]]]
        if case.get("group")
        else [list(range(len(case["sizes"])))]
    )
    for ranks in groups:
        ((record, state), starts) = _expected(case, ranks)
        offset = 0
        for rank in ranks:
            n = case["sizes"][rank]
            got = results[rank]
            for step, want in zip(got["record"], record):
                for key, value in want.items():
                    if key in ("grad_weight", "grad_bias"):
                        torch.testing.assert_close(step[key], value, **tol)
                    else:
                        torch.testing.assert_close(step[key], value[offset : offset + n], **tol)
            for key, value in state.items():
                torch.testing.assert_close(got["state"][key], value, **tol)
            offset += n
    # Every rank of a group holds bit-identical statistics.
    for ranks in groups:
        first = results[ranks[0]]["state"]
        for rank in ranks[1:]:
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(
                    results[rank]["state"][key], first[key], rtol=0, atol=0, equal_nan=True
                )


def test_sync_batchnorm_without_process_group_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    ref = torch.nn.BatchNorm2d(3)
    sync = tbn.SyncBatchNorm(3)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x), ref(x))


def test_merge_next_to_an_empty_rank():
    """The ranks' statistics merge as the kernels merge partial ones: an empty rank adds
    nothing, even next to a float64 channel constant at 1e160, whose mean squared
    overflows (inf * 0 made its M2 NaN); and two ranks give the statistics of their union."""
    from torch_batchnorm.sync_batchnorm import _merge_statistics

    f64 = torch.float64
    values = (
        torch.tensor([1.0, 2.0, 4.0, 8.0, 9.0], dtype=f64),
        torch.tensor([-3.0, 7.5], dtype=f64),
    )
    rows = []
    for v in (torch.empty(0, dtype=f64), torch.full((8,), 1e160, dtype=f64), *values):
        mean = v.mean() if v.numel() else torch.tensor(0.0, dtype=f64)
        m2 = ((v - mean) ** 2).sum()
        rows.append(torch.stack([mean, m2, torch.tensor(float(v.numel()), dtype=f64)]))
    mean, m2, count = _merge_statistics(torch.stack(rows[:2]), 1)
    assert (mean.item(), m2.item(), count.item()) == (1e160, 0.0, 8.0)
    mean, m2, count = _merge_statistics(torch.stack(rows[2:]), 1)
    union = torch.cat(values)
    torch.testing.assert_close(mean, union.mean().view(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(m2, ((union - union.mean()) ** 2).sum().view(1), rtol=1e-15, atol=0)
    assert count.item() == union.numel()


def test_training_without_num_batches_tracked_is_refused_as_torchs():
    """torch's SyncBatchNorm refuses to train tracking running statistics without the
    count (its BatchNormNd skip it), before any buffer changes."""
    for cls in (torch.nn.SyncBatchNorm, tbn.SyncBatchNorm):
        layer = cls(3)
        layer.num_batches_tracked = None
        # (Older torch asserts without a message.)
        with pytest.raises(AssertionError, match="^(num_batches_tracked must not be None)?$"):
            layer(torch.randn(4, 3))
        assert torch.equal(layer.running_mean, torch.zeros(3))


def _local_module(case):
    """The case's module, in the mode of the case ("eval" or "frozen", which normalises
    with the rank's own data when there are no running statistics)."""
    x, grad, module = _case_data(case)
    if not case["track"]:
        module.track_running_stats = False
        module.running_mean = module.running_var = module.num_batches_tracked = None
    return x, grad, module


def _local_worker(rank, world, port, case, path):
    """SyncBatchNorm evaluating, or frozen and training: each rank normalises on its own,
    with no collective."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        x, grad, module = _local_module(case)
        sync = tbn.SyncBatchNorm.convert_sync_batchnorm(module)
        sync.train(case["mode"] == "frozen").freeze(case["mode"] == "frozen")
        start = sum(case["sizes"][:rank])
        local = x[start : start + case["sizes"][rank]].clone().requires_grad_()
        out = sync(local)
        out.backward(grad[start : start + case["sizes"][rank]])
        torch.save(
            {"out": out.detach(), "grad_input": local.grad, "state": sync.state_dict()}, path
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_no_synchronisation_outside_training(mode, track):
    """Evaluating or frozen, a SyncBatchNorm is the BatchNorm of its rank's batch in
    evaluation: running statistics, or without them the rank's own batch statistics."""
    case = dict(
        sizes=[5, 3],
        channels=3,
        spatial=(2, 2),
        dtype=torch.float64,
        momentum=0.1,
        mode=mode,
        track=track,
    )
    results = _run_distributed(case, worker=_local_worker)
    x, grad, module = _local_module(case)
    module.eval()
    for rank, got in enumerate(results):
        start = sum(case["sizes"][:rank])
        local = x[start : start + case["sizes"][rank]].clone().requires_grad_()
        out = module(local)
        out.backward(grad[start : start + case["sizes"][rank]])
        torch.testing.assert_close(got["out"], out.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad_input"], local.grad, rtol=1e-12, atol=1e-12)
        for key, value in module.state_dict().items():
            assert torch.equal(got["state"][key], value), key


def test_constructor_takes_torchs_arguments():
    """Every argument of torch.nn.SyncBatchNorm, by position or keyword (bias included,
    where the installed torch has it), gives the module torch's gives."""
    arguments = {"eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": False}
    if BN_TAKES_BIAS:
        arguments["bias"] = False
    for name, value in arguments.items():
        ours, theirs = (
            tbn.SyncBatchNorm(3, **{name: value}),
            torch.nn.SyncBatchNorm(3, **{name: value}),
        )
        assert repr(ours) == repr(theirs), name
        assert ours.state_dict().keys() == theirs.state_dict().keys(), name
    positional = (4, 1e-3, 0.3, True, False, None)
    assert repr(tbn.SyncBatchNorm(*positional)) == repr(torch.nn.SyncBatchNorm(*positional))
    if BN_TAKES_BIAS:
        assert inspect.signature(tbn.SyncBatchNorm) == inspect.signature(torch.nn.SyncBatchNorm)


def test_convert_sync_batchnorm_keeps_state_and_modes():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), tbn.BatchNorm2d(4, momentum=None)
    )
    model[1].running_mean.fill_(0.5)
    model[2].eval()
    originals = [model[1], model[2]]
    converted = tbn.SyncBatchNorm.convert_sync_batchnorm(model)
    for i, original in zip((1, 2), originals):
        assert isinstance(converted[i], tbn.SyncBatchNorm)
        assert converted[i].weight is original.weight
        assert converted[i].running_mean is original.running_mean
        assert converted[i].num_batches_tracked is original.num_batches_tracked
    assert converted[2].momentum is None and not converted[2].training
    assert repr(converted[1]) == repr(torch.nn.SyncBatchNorm(4))
    assert isinstance(converted[0], torch.nn.Conv2d)


def test_distributed_data_parallel_on_cpu():
    case = dict(sizes=[5, 3], channels=3, spatial=(2, 2), dtype=torch.float64, momentum=0.1)
    results = _run_distributed(case, worker=_ddp_worker)
    x, grad, module = _case_data(case)
    module(x).backward(grad)
    for got in results:
        torch.testing.assert_close(got["weight"], module.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["state"]["running_var"], module.running_var)
