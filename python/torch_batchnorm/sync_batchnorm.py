"""SyncBatchNorm over torch.distributed: batch statistics that span every rank.

Forward: each rank computes its per-channel (mean, M2, count) with our kernels, one
all_gather brings every rank's triple to every rank, and each merges them with Chan's
formula in rank order, so all ranks hold bit-identical statistics whatever their batch
sizes (a rank with no samples contributes count 0). Backward: one all_reduce of the two
per-channel sums, then the local input gradient from our kernels. Works on CPU tensors
with gloo and on CUDA tensors with NCCL.
"""

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .modules import _count_batch, _Freezable, _fx_leaf

__all__ = ["SyncBatchNorm"]

_ops = torch.ops.torch_batchnorm


def _merge_statistics(gathered: Tensor, channels: int):
    """Merges per-rank rows [mean(C), M2(C), count] in rank order (Chan et al.)."""
    mean = gathered[0, :channels]
    m2 = gathered[0, channels : 2 * channels]
    count = gathered[0, 2 * channels]
    for row in gathered[1:]:
        other_count = row[2 * channels]
        total = count + other_count
        # A rank with no samples (or two empty ones) leaves the statistics as they are.
        frac = torch.where(total > 0, other_count / total.clamp_min(1), 0.0)
        delta = row[:channels] - mean
        # As the kernels merge (batch_norm_math.h, merged_mean): a mean that is not finite
        # (an infinity among its values) takes the other as a sum would, inf + finite = inf,
        # where the difference would make it NaN.
        mean = torch.where(mean.isfinite(), mean + delta * frac, mean + row[:channels])
        # No M2 term next to an empty side (batch_norm_math.h, merge_m2_term): there delta
        # is the other side's mean, whose square alone may overflow (inf * 0 = NaN).
        weight = count * frac
        m2 = (
            m2
            + row[channels : 2 * channels]
            + torch.where(weight != 0, delta * delta * weight, 0.0)
        )
        count = total
    return mean, m2, count


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group):
        channels = input.size(1)
        mean, m2 = _ops.batch_norm_stats(input)
        local_count = input.numel() // channels if channels else 0
        # Statistics travel in float64 so that counts and M2 stay exact across ranks.
        local = torch.cat(
            [mean.double(), m2.double(), mean.new_full((1,), local_count, dtype=torch.float64)]
        )
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        mean64, m264, count64 = _merge_statistics(torch.stack(gathered), channels)
        count = int(count64.item())
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {count}"
            )
        # Validates every argument before it updates the running statistics.
        out, save_mean, save_invstd = _ops.batch_norm_forward_with_stats(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            mean64.to(mean.dtype),
            m264.to(mean.dtype),
            count,
            momentum,
            eps,
        )
        # The op wrote the running statistics below autograd, with no autograd kernel to
        # bump their versions as batch_norm_forward's does (_count_batch reads them).
        for stat in (running_mean, running_var):
            if stat is not None:
                torch.autograd.graph.increment_version(stat)
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.group = group
        ctx.count = count
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, invstd = ctx.saved_tensors
        sum_dy, sum_dy_xmu = _ops.batch_norm_backward_reduce(grad_out, input, mean, invstd)
        # Parameter gradients stay local, as torch's SyncBatchNorm leaves them: data
        # parallel training all-reduces them with the other parameters.
        grad_weight = None if weight is None else (sum_dy_xmu * invstd).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else sum_dy.to(ctx.bias_dtype)
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.group)
            channels = input.size(1)
            grad_input = _ops.batch_norm_backward_elemt(
                grad_out, input, weight, mean, invstd, sums[:channels], sums[channels:], ctx.count
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_Freezable, torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` that also runs on CPU tensors (gloo).

    Same constructor (``process_group`` included), parameters, buffers, state_dict keys,
    input checks and repr. In evaluation, without an initialised process group, or with a
    group of one, it behaves as plain BatchNorm. It is deliberately not a subclass of
    torch's class: DistributedDataParallel refuses those on CPU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # Only passed to drop the bias: torch releases before bias= have no such argument.
        no_bias = {} if bias else {"bias": False}
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            **no_bias,
        )
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)

        momentum = 0.0 if self.momentum is None else self.momentum
        training = self.training and not self.frozen
        track = training and self.track_running_stats
        if track and self.num_batches_tracked is None:
            # torch's SyncBatchNorm refuses it here (its BatchNormNd skip the count).
            raise AssertionError("num_batches_tracked must not be None")
        if track and self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        bn_training = training or (self.running_mean is None and self.running_var is None)
        use_buffers = not training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None

        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        # Batch statistics outside training (no running statistics) are the rank's own.
        synchronise = (
            bn_training
            and training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        if not synchronise:

            def op():
                return F.batch_norm(
                    input,
                    running_mean,
                    running_var,
                    self.weight,
                    self.bias,
                    bn_training,
                    momentum,
                    self.eps,
                )
        else:

            def op():
                return _SyncBatchNormFunction.apply(
                    input,
                    self.weight,
                    self.bias,
                    running_mean,
                    running_var,
                    momentum,
                    self.eps,
                    group,
                )

        return _count_batch(self.num_batches_tracked if track else None, running_mean, op)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Return ``module`` with every BatchNorm layer (torch's or ours) replaced by
        :class:`SyncBatchNorm`, sharing parameters and buffers and keeping modes."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, SyncBatchNorm
        ):
            output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            output.frozen = getattr(module, "frozen", False)
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output
