"""Drop-in modules for torch.nn.BatchNorm1d/2d/3d.

Each subclasses torch's own class, so it takes the same constructor arguments with the
same defaults, has the same parameters, buffers, state_dict keys, input-dim checks and
repr, and passes isinstance checks that code written for torch's modules makes. Only
forward differs: it runs the torch_batchnorm ops.
"""

import torch
from torch import Tensor

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormForward:
    """The forward shared by the three classes: torch's _BatchNorm.forward, except that
    num_batches_tracked is only advanced once the op has succeeded, so a call that
    raises leaves every buffer as it was."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)

        momentum = 0.0 if self.momentum is None else self.momentum
        track = self.training and self.track_running_stats
        if track and self.num_batches_tracked is not None and self.momentum is None:
            # Cumulative moving average over the batches seen, this one included.
            momentum = 1.0 / float(self.num_batches_tracked + 1)

        # Batch statistics in training, and in eval when there are no buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed only where they are updated (training with tracking) or
        # read (evaluation).
        use_buffers = not self.training or self.track_running_stats
        out = F.batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
        )
        if track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on 4D ``(N, C, H, W)`` input."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on 5D ``(N, C, D, H, W)`` input."""
