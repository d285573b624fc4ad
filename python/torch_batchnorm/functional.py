"""Functional form, with the contract of ``torch.nn.functional.batch_norm``."""

import sys
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from . import _C

__all__ = ["batch_norm"]

# The overload itself, looked up once: on small inputs the lookups through torch.ops
# on every call are a measurable part of the cost.
_batch_norm_forward = torch.ops.torch_batchnorm.batch_norm_forward.default
# torch.jit.is_tracing without its TorchScript branch, for the same reason.
_is_tracing = torch._C._is_tracing

# torch.batch_norm's parameters as torch's argument parser checks them, in its order: the
# parser, not torch.nn.functional.batch_norm's, numbers the positions in its messages.
_TORCH_PARAMETERS = (
    ("input", "Tensor"),
    ("weight", "Tensor?"),
    ("bias", "Tensor?"),
    ("running_mean", "Tensor?"),
    ("running_var", "Tensor?"),
    ("training", "bool"),
    ("momentum", "float"),
    ("eps", "float"),
)


def _parser_accepts(kind: str, value) -> bool:
    if kind == "bool":
        return type(value) is bool
    if kind == "float":
        # Python numbers, NumPy scalars (booleans, numbers and time deltas) and 0-dim
        # tensors that need no gradient.
        if isinstance(value, Tensor):
            return value.dim() == 0 and not value.requires_grad
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(value, numpy.generic):
            return value.dtype.kind in "biufcm"
        return isinstance(value, (int, float))
    tensor = isinstance(value, Tensor) or _tensor_like(value)
    return tensor or (kind == "Tensor?" and value is None)


def _tensor_like(value) -> bool:
    """Whether `value` is no tensor but has __torch_function__ (a torch.fx.Proxy, say):
    torch's argument parser takes those for tensors and hands the call to them."""
    return not isinstance(value, Tensor) and hasattr(type(value), "__torch_function__")


def _type_name(value) -> str:
    """The name torch's messages give a value's type: the C type's tp_name, which for
    extension types (numpy.ndarray, decimal.Decimal) includes the module."""
    t = type(value)
    heap_type = t.__flags__ & (1 << 9)  # Py_TPFLAGS_HEAPTYPE: a class made by Python code
    if heap_type or t.__module__ == "builtins":
        return t.__name__
    return f"{t.__module__}.{t.__name__}"


def _check_eps(training: bool, eps: float) -> None:
    """torch.nn.functional.batch_norm's eps checks, in its words: they print eps as it was
    given (an int, a 0-d tensor). Also compiled by torch.jit.script, in batch_norm."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Raises what torch.nn.functional.batch_norm raises before its op runs: first the
    errors of its own Python code (the batch size and eps checks, which print eps as it
    was given, and the TypeError of a non-tensor input or an eps that does not compare
    with a float), then its argument parser's TypeError for the first argument of a type
    it rejects. Returns if there is none."""
    args = locals()
    # (torch hands a call with a tensor-like to it before this check.)
    if training and not _tensor_like(input):
        torch.nn.functional._verify_batch_size(input.size())
    _check_eps(training, eps)
    for position, (name, kind) in enumerate(_TORCH_PARAMETERS, start=1):
        value = args[name]
        if not _parser_accepts(kind, value):
            raise TypeError(
                f"batch_norm(): argument '{name}' (position {position}) must be "
                f"{kind.rstrip('?')}, not {_type_name(value)}"
            )


def _channel_vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """A weight or bias as the op takes it, 1-D: torch takes them of any shape holding C
    values, as the direct binding does (torch_batchnorm::batch_norm in C++). A
    torch.fx.Proxy's rank is unknown while tracing, so its graph reshapes it (a 1-D
    tensor reshaped is itself)."""
    if isinstance(t, torch.fx.Proxy) or (isinstance(t, Tensor) and t.dim() != 1):
        return t.reshape(-1)
    return t


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
    if torch.jit.is_scripting():
        # Compiled by torch.jit.script (the modules' scripted forward calls it too): the
        # checks of torch's scripted functional, in its words, then the op, which takes its
        # weight and bias 1-D.
        if training:
            torch.nn.functional._verify_batch_size(input.size())
        _check_eps(training, eps)
        if weight is not None and weight.dim() != 1:
            weight = weight.reshape(-1)
        if bias is not None and bias.dim() != 1:
            bias = bias.reshape(-1)
        return torch.ops.torch_batchnorm.batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )[0]
    return _eager_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


@torch.jit.unused
def _eager_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """batch_norm called from Python: its arguments checked as torch's Python and argument
    parser check them, and the op reached through the direct binding where nothing
    intercepts the call (TorchScript does not compile this)."""
    # The op takes a bool and floats. The binding would take any object as a bool and
    # anything with __float__ as a float, and torch.ops would take ints: training,
    # momentum and eps of other types than bool and float are checked as torch checks
    # them (its messages print them as given).
    if type(training) is not bool or type(momentum) is not float or type(eps) is not float:
        _check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps)
        momentum, eps = float(momentum), float(eps)
    compiling = torch.compiler.is_compiling()
    if (compiling or _is_tracing()) and torch.onnx.is_in_onnx_export():
        # An ONNX graph runs on another runtime, which has BatchNormalization but not our
        # op: both of torch.onnx's exporters (torch.export and torch.jit.trace underneath)
        # translate torch's op into it, so the graph gets that.
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    try:
        # Eager calls take the direct binding, which skips torch.ops' generic argument
        # conversion; tracing, tensor subclasses and modes with __torch_function__ (as
        # torch.device(...) is) see the op.
        if compiling or has_torch_function_variadic(input, running_mean, running_var, weight, bias):
            return _batch_norm_forward(
                input,
                _channel_vector(weight),
                _channel_vector(bias),
                running_mean,
                running_var,
                training,
                momentum,
                eps,
            )[0]
        return _C.batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )
    except (TypeError, RuntimeError):
        # A tensor argument of a type that the binding or torch.ops rejects, reported in
        # torch's words (and alone: the binding's error is no part of it); other errors
        # are the op's own.
        if not compiling:
            try:
                _check_arguments(
                    input, running_mean, running_var, weight, bias, training, momentum, eps
                )
            except TypeError as error:
                raise error from None
        raise
