"""Drop-in modules for torch.nn.BatchNorm1d/2d/3d.

Each subclasses torch's own class, so it takes the same constructor arguments with the
same defaults, has the same parameters, buffers, state_dict keys, input-dim checks and
repr, and passes isinstance checks that code written for torch's modules makes. Only
forward differs: it runs the torch_batchnorm ops.
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormForward:
    """The forward shared by the three classes: torch's _BatchNorm.forward, except that
    num_batches_tracked is only advanced once the op has updated the running statistics,
    so a call that raises in validation leaves every buffer as it was, and that
    momentum=None traces under torch.compile(fullgraph=True)."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)

        track = self.training and self.track_running_stats
        # Batch statistics in training, and in eval when there are no buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed only where they are updated (training with tracking) or
        # read (evaluation).
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        momentum = 0.0 if self.momentum is None else self.momentum
        cumulative = (
            track
            and self.momentum is None
            and self.num_batches_tracked is not None
            and running_mean is not None
        )
        traced = cumulative and torch.compiler.is_compiling()
        if cumulative and not traced:
            # Cumulative moving average over the batches seen, this one included.
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        elif traced:
            # The op takes its momentum as a Python float, and 1 / num_batches_tracked as
            # one is data-dependent (a graph break under torch.compile). So the op writes
            # this batch's statistics (momentum 1) into copies, and the cumulative average
            # is taken with tensor arithmetic. The copies start as the running values, so
            # an empty batch, which the op leaves alone, changes nothing. (With float16 or
            # bfloat16 buffers the copies round the batch statistics once more, which is
            # why eager mode passes the exact momentum instead.)
            running_mean, running_var = running_mean.clone(), running_var.clone()
            momentum = 1.0
        out = _count_batch(
            self.num_batches_tracked if track else None,
            running_mean,
            lambda: F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                momentum,
                self.eps,
            ),
        )
        if traced:
            _cumulative_update(self.running_mean, running_mean, self.num_batches_tracked)
            _cumulative_update(self.running_var, running_var, self.num_batches_tracked)
        return out


def _count_batch(
    num_batches_tracked: Optional[Tensor], running_mean: Optional[Tensor], op: Callable[[], Tensor]
) -> Tensor:
    """op(), a forward that validates everything, then updates running_mean in place
    (which bumps its version); then num_batches_tracked += 1 where given.

    A call that raises after the update also counts the batch, as torch's forward (which
    counts before it calls the op) does: activation checkpointing runs the forward again
    in the backward, and its non-reentrant form stops that run with an exception as soon
    as the op has saved its tensors. A call that raises in validation changes nothing.
    This relies on the op bumping the version with the update (batch_norm_forward's
    autograd kernel does, under no_grad too; torch's own op does not). (Inference tensors
    have no version, and nothing runs again in inference mode; compiled graphs recompute
    without exceptions.)"""
    version = None
    if (
        num_batches_tracked is not None
        and running_mean is not None
        and not torch.compiler.is_compiling()
        and not running_mean.is_inference()
    ):
        version = running_mean._version
    try:
        out = op()
    except Exception:
        if version is not None and running_mean._version != version:
            num_batches_tracked.add_(1)
        raise
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return out


def _cumulative_update(running: Tensor, batch: Tensor, count: Tensor) -> None:
    """running += (batch - running) / count, in float32 at least (as the kernels update
    float16/bfloat16 statistics), rounded once."""
    acc = torch.promote_types(running.dtype, torch.float32)
    old = running.to(acc)
    running.copy_(old + (batch.to(acc) - old) / count.to(acc))


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on 4D ``(N, C, H, W)`` input."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on 5D ``(N, C, D, H, W)`` input."""
