"""Functional form, with the contract of ``torch.nn.functional.batch_norm``."""

from typing import Optional

import torch
from torch import Tensor

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
    out, _, _ = _batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, float(momentum), float(eps)
    )
    return out
