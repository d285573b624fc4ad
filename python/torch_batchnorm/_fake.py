"""Fake (meta) kernels: shapes and dtypes of the ops' outputs, so torch.compile and
torch.export trace them without running the kernels."""

import torch
from torch._prims_common import check_same_device, suggest_memory_format

from . import _C

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _acc_dtype(dtype):
    return _ACC.get(dtype, dtype)


def _same_device(input, *others):
    """torch's meta kernels' device check, in its words. A CPU input with a weight or
    statistics on the meta device dispatches to these kernels, not to the CPU kernel
    (Meta outranks CPU), so without it that call would return an empty CPU tensor."""
    check_same_device(input, *(t for t in others if t is not None), allow_cpu_scalar_tensors=False)


def _check(check, *args):
    """Runs the op's validation routine, the one its kernels run first (batch_norm_check.cpp),
    so that a call that the kernels would reject fails while it is traced, with their
    exception and words, rather than as a graph that fails when it runs (torch.export) or
    as an error about the gradients it was traced to have (torch.compile).

    The routine reads sizes as integers, so a symbolic size (dynamic shapes) is read as its
    value in the call being traced. That adds no guard: a call with other sizes is checked
    by the kernels when it runs. A size that depends on data has no such value; the call is
    then left to the kernels."""
    args = [_concrete(arg) for arg in args]
    if not any(arg is _UNKNOWN for arg in args):
        check(*args)


_UNKNOWN = object()


def _size_hint(size):
    if isinstance(size, int):
        return size
    node = size.node
    return node.hint if node.has_hint() and isinstance(node.hint, int) else _UNKNOWN


def _concrete(arg):
    """`arg` with its symbolic sizes read as their values in the call being traced (a
    tensor of those sizes, with its dtype and device, where the sizes are symbolic), or
    _UNKNOWN."""
    if isinstance(arg, torch.SymInt):
        return _size_hint(arg)
    if isinstance(arg, torch.Tensor) and arg._has_symbolic_sizes_strides:
        sizes = [_size_hint(size) for size in arg.shape]
        # Strides and offset are left out: the routine reads neither.
        return _UNKNOWN if _UNKNOWN in sizes else arg.new_empty(sizes)
    return arg


def _dense_format(t):
    """The memory format `t` is dense in, contiguous first (batch_norm_layout.h,
    result_format); None where it is dense in none."""
    if t.is_contiguous():
        return torch.contiguous_format
    for dim, memory_format in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and t.is_contiguous(memory_format=memory_format):
            return memory_format
    return None


def _like_input(input):
    # The kernels return torch's layout (batch_norm_cpu): a contiguous input stays
    # contiguous, a channels_last / channels_last_3d one keeps that format, anything else
    # takes its suggested memory format (3D [N, C, L] with C innermost: contiguous).
    if input.numel() == 0:
        return torch.empty_like(input)  # any strides; the kernels keep the input's
    memory_format = _dense_format(input)
    if memory_format is None:
        memory_format = suggest_memory_format(input)
    return torch.empty_like(input, memory_format=memory_format)


def _grad_like_input(input, grad_out):
    # The input gradient's layout by torch's rule (batch_norm_backward_cpu), as the kernels
    # give it (batch_norm_layout.h, grad_input_format): the result's layout when input and
    # grad_out are each dense in some memory format and suggest the same one, else the
    # input's suggested format.
    if input.numel() == 0:
        return torch.empty_like(input)
    if (
        _dense_format(input) is not None
        and _dense_format(grad_out) is not None
        and suggest_memory_format(input) == suggest_memory_format(grad_out)
    ):
        return _like_input(input)
    return torch.empty_like(input, memory_format=suggest_memory_format(input))


@torch.library.register_fake("torch_batchnorm::batch_norm_forward")
def _batch_norm_forward_fake(
    input, weight, bias, running_mean, running_var, training, momentum, eps
):
    _same_device(input, weight, bias, running_mean, running_var)
    _check(
        _C.check_batch_norm_forward, input, weight, bias, running_mean, running_var, training, eps
    )
    channels = input.shape[1] if training else 0
    stats = input.new_empty((channels,), dtype=_acc_dtype(input.dtype))
    return _like_input(input), stats, stats.clone()


@torch.library.register_fake("torch_batchnorm::batch_norm_backward")
def _batch_norm_backward_fake(
    grad_out,
    input,
    weight,
    running_mean,
    running_var,
    save_mean,
    save_invstd,
    training,
    eps,
    output_mask,
):
    _same_device(input, grad_out, weight, running_mean, running_var, save_mean, save_invstd)
    _check(
        _C.check_batch_norm_backward,
        grad_out,
        input,
        weight,
        running_mean,
        running_var,
        save_mean,
        save_invstd,
        training,
        eps,
    )
    channels = input.shape[1]
    mixed = input.dtype in _ACC and any(
        t is not None and t.dtype == torch.float32 for t in (weight, running_mean, running_var)
    )
    pdtype = torch.float32 if mixed else input.dtype
    grad_input = _grad_like_input(input, grad_out) if output_mask[0] else input.new_empty((0,))
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=pdtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=pdtype)
    return grad_input, grad_weight, grad_bias


def _channel_stats(input, n=2):
    c = input.shape[1]
    return tuple(input.new_empty((c,), dtype=_acc_dtype(input.dtype)) for _ in range(n))


@torch.library.register_fake("torch_batchnorm::batch_norm_stats")
def _batch_norm_stats_fake(input):
    _check(_C.check_batch_norm_stats, input)
    return _channel_stats(input)


@torch.library.register_fake("torch_batchnorm::batch_norm_forward_with_stats")
def _batch_norm_forward_with_stats_fake(
    input, weight, bias, running_mean, running_var, mean, m2, count, momentum, eps
):
    _same_device(input, weight, bias, running_mean, running_var, mean, m2)
    _check(
        _C.check_batch_norm_forward_with_stats,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        mean,
        m2,
        count,
        eps,
    )
    return (_like_input(input), *_channel_stats(input))


@torch.library.register_fake("torch_batchnorm::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_out, input, mean, invstd):
    _same_device(input, grad_out, mean, invstd)
    _check(_C.check_batch_norm_backward_reduce, grad_out, input, mean, invstd)
    return _channel_stats(input)


@torch.library.register_fake("torch_batchnorm::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(
    grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count
):
    _same_device(input, grad_out, weight, mean, invstd, sum_dy, sum_dy_xmu)
    _check(
        _C.check_batch_norm_backward_elemt,
        grad_out,
        input,
        weight,
        mean,
        invstd,
        sum_dy,
        sum_dy_xmu,
        count,
    )
    return _like_input(input)
