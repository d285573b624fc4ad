"""torch.library.opcheck on the ops: schema (mutation annotations), autograd
registration, fake kernels against the real ones (shapes, dtypes, strides) and AOT
dispatch with dynamic shapes, over training and evaluation, with and without running
statistics and affine parameters, contiguous and channels-last, and the backward's output
masks."""

import pytest
import torch

ops = torch.ops.torch_batchnorm

C = 3


def _params(dtype=torch.float32, requires_grad=True):
    weight = (torch.rand(C) + 0.5).to(dtype).requires_grad_(requires_grad)
    bias = torch.rand(C).to(dtype).requires_grad_(requires_grad)
    return weight, bias


def _stats(dtype=torch.float32):
    return torch.randn(C).to(dtype) * 0.1, (torch.rand(C) + 0.5).to(dtype)


def _input(shape=(4, C, 5, 2), channels_last=False, dtype=torch.float32):
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


FORWARD_SAMPLES = {
    "train_stats": lambda: (_input(), *_params(), *_stats(), True, 0.1, 1e-5),
    "train_no_stats": lambda: (_input(), *_params(), None, None, True, 0.1, 1e-5),
    "train_no_affine": lambda: (_input((5, C)), None, None, *_stats(), True, 0.3, 1e-3),
    "eval": lambda: (_input(), *_params(), *_stats(), False, 0.1, 1e-5),
    "train_channels_last": lambda: (
        _input(channels_last=True),
        *_params(),
        *_stats(),
        True,
        0.1,
        1e-5,
    ),
    "eval_channels_last": lambda: (
        _input(channels_last=True),
        *_params(),
        *_stats(),
        False,
        0.1,
        1e-5,
    ),
    "train_3d": lambda: (_input((4, C, 7)), *_params(), *_stats(), True, 0.5, 0.5),
    # Layouts whose output layout follows torch's rule (suggest_memory_format) rather
    # than the input's strides: fake and real kernels must agree on it.
    "train_channels_innermost_3d": lambda: (
        torch.randn(4, 7, C).transpose(1, 2).requires_grad_(),
        *_params(),
        *_stats(),
        True,
        0.1,
        1e-5,
    ),
    "eval_channels_last_sliced": lambda: (
        _input((4, C, 5, 4), channels_last=True).detach()[..., ::2].requires_grad_(),
        *_params(),
        *_stats(),
        False,
        0.1,
        1e-5,
    ),
    # Channels-last and not contiguous, though its suggested memory format is contiguous.
    "eval_ambiguous_channels_last": lambda: (
        torch.randn(2, 1, C, 1).permute(3, 2, 1, 0).requires_grad_(),
        *_params(),
        *_stats(),
        False,
        0.1,
        1e-5,
    ),
    "train_bf16_mixed": lambda: (
        _input(dtype=torch.bfloat16),
        *_params(),
        *_stats(),
        True,
        0.1,
        1e-5,
    ),
    "eval_fp16": lambda: (
        _input(dtype=torch.float16),
        *_params(torch.float16),
        *_stats(torch.float16),
        False,
        0.1,
        1e-5,
    ),
}


@pytest.mark.parametrize("sample", list(FORWARD_SAMPLES))
def test_forward(sample):
    torch.manual_seed(0)
    torch.library.opcheck(ops.batch_norm_forward.default, FORWARD_SAMPLES[sample]())


def _backward_args(training, mask, channels_last=False, weight=True):
    torch.manual_seed(0)
    x = _input(channels_last=channels_last).detach()
    w, _ = _params(requires_grad=False)
    running_mean, running_var = _stats()
    _, save_mean, save_invstd = ops.batch_norm_forward(
        x, w, None, running_mean, running_var, training, 0.1, 1e-5
    )
    grad_out = torch.randn_like(x)
    return (
        grad_out,
        x,
        w if weight else None,
        running_mean,
        running_var,
        save_mean,
        save_invstd,
        training,
        1e-5,
        mask,
    )


MASKS = [[True, True, True], [True, False, False], [False, True, True], [False, False, True]]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward(training, mask):
    torch.library.opcheck(ops.batch_norm_backward.default, _backward_args(training, mask))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_channels_last_no_weight(training):
    torch.library.opcheck(
        ops.batch_norm_backward.default,
        _backward_args(training, [True, True, True], channels_last=True, weight=False),
    )


def _split_training_samples(channels_last):
    """Arguments of the four ops that split training (SyncBatchNorm), from one batch."""
    torch.manual_seed(0)
    x = _input(channels_last=channels_last).detach()
    weight, bias = _params(requires_grad=False)
    running_mean, running_var = _stats()
    mean, m2 = ops.batch_norm_stats(x)
    count = x.numel() // C
    _, save_mean, save_invstd = ops.batch_norm_forward_with_stats(
        x, weight, bias, running_mean.clone(), running_var.clone(), mean, m2, count, 0.1, 1e-5
    )
    grad_out = torch.randn_like(x)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(grad_out, x, save_mean, save_invstd)
    return {
        ops.batch_norm_stats.default: (x,),
        ops.batch_norm_forward_with_stats.default: (
            x,
            weight,
            bias,
            running_mean,
            running_var,
            mean,
            m2,
            count,
            0.1,
            1e-5,
        ),
        ops.batch_norm_backward_reduce.default: (grad_out, x, save_mean, save_invstd),
        ops.batch_norm_backward_elemt.default: (
            grad_out,
            x,
            weight,
            save_mean,
            save_invstd,
            sum_dy,
            sum_dy_xmu,
            count,
        ),
    }


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "op",
    [
        "batch_norm_stats",
        "batch_norm_forward_with_stats",
        "batch_norm_backward_reduce",
        "batch_norm_backward_elemt",
    ],
)
def test_split_training_ops(op, channels_last):
    samples = _split_training_samples(channels_last)
    torch.library.opcheck(getattr(ops, op).default, samples[getattr(ops, op).default])


def _faulty(samples, op, position, value):
    args = list(samples[op])
    args[position] = value
    return op, args


def test_split_training_ops_reject_on_meta_as_on_cpu():
    """Each split op's fake kernel runs its validation routine: a faulty call on the meta
    device (as while torch.compile traces it) fails with the CPU kernel's exception and
    words."""
    samples = _split_training_samples(channels_last=False)
    x = samples[ops.batch_norm_stats.default][0]
    cases = [
        _faulty(samples, ops.batch_norm_stats.default, 0, x.long()),
        _faulty(samples, ops.batch_norm_forward_with_stats.default, 7, 1),
        _faulty(samples, ops.batch_norm_backward_reduce.default, 2, torch.zeros(C - 1)),
        _faulty(samples, ops.batch_norm_backward_elemt.default, 7, 0),
    ]
    for op, args in cases:
        errors = []
        for device in ("cpu", "meta"):
            moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(Exception) as info:
                op(*moved)
            errors.append((info.type, str(info.value)))
        assert errors[0] == errors[1], op


def test_split_training_ops_compose_to_the_training_ops():
    """stats + forward_with_stats and reduce + elemt give what the training forward and
    backward give for the same batch."""
    samples = _split_training_samples(channels_last=False)
    x, weight, bias, running_mean, running_var, mean, m2, count, *_ = samples[
        ops.batch_norm_forward_with_stats.default
    ]
    out, save_mean, save_invstd = ops.batch_norm_forward_with_stats(
        x, weight, bias, None, None, mean, m2, count, 0.1, 1e-5
    )
    ref_out, ref_mean, ref_invstd = ops.batch_norm_forward(
        x, weight, bias, None, None, True, 0.1, 1e-5
    )
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(save_mean, ref_mean)
    torch.testing.assert_close(save_invstd, ref_invstd)
    grad_out, *_ = samples[ops.batch_norm_backward_reduce.default]
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(grad_out, x, save_mean, save_invstd)
    grad_input = ops.batch_norm_backward_elemt(
        grad_out, x, weight, save_mean, save_invstd, sum_dy, sum_dy_xmu, count
    )
    ref = ops.batch_norm_backward(
        grad_out, x, weight, None, None, ref_mean, ref_invstd, True, 1e-5, [True, True, True]
    )
    torch.testing.assert_close(grad_input, ref[0])
    torch.testing.assert_close(sum_dy_xmu * save_invstd, ref[1])
    torch.testing.assert_close(sum_dy, ref[2])
