"""Functional form, with the contract of ``torch.nn.functional.batch_norm``."""

from typing import Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from . import _C

__all__ = ["batch_norm"]

# The overload itself, looked up once: on small inputs the lookups through torch.ops
# on every call are a measurable part of the cost.
_batch_norm_forward = torch.ops.torch_batchnorm.batch_norm_forward.default


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation over dim 1 of ``input``; see ``torch.nn.functional.batch_norm``.

    In training the batch statistics normalise the input and, when given, the running
    statistics are updated in place with ``momentum``. Otherwise the running statistics
    normalise it. Validation happens in the op, before anything is modified.
    """
    momentum, eps = float(momentum), float(eps)
    # Eager calls take the direct binding, which skips torch.ops' generic argument
    # conversion; tracing, tensor subclasses and modes with __torch_function__ see the op.
    if torch.compiler.is_compiling() or has_torch_function_variadic(
        input, running_mean, running_var, weight, bias
    ):
        out, _, _ = _batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )
        return out
    return _C.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
