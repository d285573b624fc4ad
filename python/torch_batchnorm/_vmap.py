"""Batching rules: torch.vmap over the ops (model ensembles, per-sample gradients, and the
vmaps inside torch.func.jacrev, jacfwd and hessian).

Each slice of a vmapped call normalises with statistics of its own, so the vmapped
dimension is folded into the channels: an input of B slices [N, C, *] runs as one call on
[N, B * C, *], and every per-channel tensor as [B * C] (repeated where it is not batched).
Running statistics are updated in place through the folded copies and written back.
"""

import torch

_ops = torch.ops.torch_batchnorm


def _fold(t, bdim, size):
    """[N, C, *] (batched at `bdim`, or shared by every slice) as [N, size * C, *]."""
    t = t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)
    return t.movedim(0, 1).flatten(1, 2)


def _unfold(t, size):
    """The inverse of _fold: [N, size * C, *] as [size, N, C, *]."""
    return t.unflatten(1, (size, -1)).movedim(1, 0)


def _fold_channels(t, bdim, size):
    """[C] (batched at `bdim`, or shared) as [size * C]. None, and the empty statistics
    evaluation returns (unbatched), stay as they are."""
    if t is None or (bdim is None and t.numel() == 0):
        return t
    return t.movedim(bdim, 0).flatten() if bdim is not None else t.repeat(size)


def _unfold_channels(t, size):
    """The inverse of _fold_channels, with the output dim for vmap: [size * C] as
    [size, C] batched at 0; an empty tensor (a result not asked for, the statistics of
    evaluation) as it is, unbatched."""
    return (t.unflatten(0, (size, -1)), 0) if t.numel() else (t, None)


@torch.library.register_vmap("torch_batchnorm::batch_norm_forward")
def _batch_norm_forward_vmap(
    info, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps
):
    size = info.batch_size
    x_dim, w_dim, b_dim, mean_dim, var_dim = in_dims[:5]
    shared_stats = (running_mean is not None and mean_dim is None) or (
        running_var is not None and var_dim is None
    )
    if training and x_dim is not None and shared_stats:
        # torch's words: the slices would all update the same statistics.
        raise RuntimeError(
            "Batch norm got a batched tensor as input while the running_mean or running_var, "
            "which will be updated in place, were not batched.\nIf you are using a module "
            "and do not need eval mode, please set `track_running_stats` to be False.If you "
            "are using a prebuilt module and do not need eval mode, please see the functorch "
            "website for resources on how to patch your module to work with vmap"
        )
    if not training and x_dim is not None and all(d is None for d in in_dims[1:5]):
        # Shared parameters and statistics: the slices are more batch entries.
        x = input.movedim(x_dim, 0)
        out, save_mean, save_invstd = _ops.batch_norm_forward(
            x.flatten(0, 1), weight, bias, running_mean, running_var, training, momentum, eps
        )
        return (out.unflatten(0, x.shape[:2]), save_mean, save_invstd), (0, None, None)

    mean = _fold_channels(running_mean, mean_dim, size)
    var = _fold_channels(running_var, var_dim, size)
    out, save_mean, save_invstd = _ops.batch_norm_forward(
        _fold(input, x_dim, size),
        _fold_channels(weight, w_dim, size),
        _fold_channels(bias, b_dim, size),
        mean,
        var,
        training,
        momentum,
        eps,
    )
    for stat, bdim, update in ((running_mean, mean_dim, mean), (running_var, var_dim, var)):
        if training and stat is not None:
            update = update.unflatten(0, (size, -1))
            # A shared statistic was updated alike by every slice (the input is shared).
            stat.copy_(update.movedim(0, bdim) if bdim is not None else update[0])
    save_mean, mean_dim = _unfold_channels(save_mean, size)
    save_invstd, invstd_dim = _unfold_channels(save_invstd, size)
    return (_unfold(out, size), save_mean, save_invstd), (0, mean_dim, invstd_dim)


@torch.library.register_vmap("torch_batchnorm::batch_norm_backward")
def _batch_norm_backward_vmap(
    info,
    in_dims,
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
    size = info.batch_size
    per_channel = (weight, running_mean, running_var, save_mean, save_invstd)
    grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(
        _fold(grad_out, in_dims[0], size),
        _fold(input, in_dims[1], size),
        *(_fold_channels(t, d, size) for t, d in zip(per_channel, in_dims[2:7])),
        training,
        eps,
        output_mask,
    )
    grad_weight, weight_dim = _unfold_channels(grad_weight, size)
    grad_bias, bias_dim = _unfold_channels(grad_bias, size)
    if output_mask[0]:
        return (_unfold(grad_input, size), grad_weight, grad_bias), (0, weight_dim, bias_dim)
    return (grad_input, grad_weight, grad_bias), (None, weight_dim, bias_dim)
