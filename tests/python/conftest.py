"""Shared helpers of the Python test suite.

Every test compares torch_batchnorm against torch.nn.BatchNorm (or against a float64
reference). The pieces they share live here: the devices to run on, the precisions and
their tolerances, inputs in every memory layout, and the (torch, ours) module pair driven
through several training steps with every result compared.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from typing import Callable

import pytest
import torch
import torch_batchnorm as tbn

#: Whether the installed torch's BatchNormNd takes the keyword-only ``bias`` (torch >= 2.12):
#: ours take exactly the arguments of the installed torch's classes.
BN_TAKES_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters

# CUDA kernels are tested by the same parity tests wherever a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@contextlib.contextmanager
def single_threaded():
    """Runs torch's reference computations on one thread. Their speed is irrelevant, and
    torch's OpenMP regions spin for tens of milliseconds per call when the machine's cores
    are shared; our kernels keep the default thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# Precisions and tolerances


@dataclasses.dataclass(frozen=True)
class Precision:
    """Input dtype and parameter/buffer dtype. A float16/bfloat16 input with float32
    parameters is torch's "mixed type"."""

    dtype: torch.dtype
    param_dtype: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.dtype != self.param_dtype

    def __str__(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        return f"{name}-mixed" if self.mixed else name


PRECISIONS = [
    Precision(torch.float32, torch.float32),
    Precision(torch.float64, torch.float64),
    Precision(torch.bfloat16, torch.bfloat16),
    Precision(torch.float16, torch.float16),
    Precision(torch.bfloat16, torch.float32),
    Precision(torch.float16, torch.float32),
]
FLOAT32 = PRECISIONS[0]
FLOAT64 = PRECISIONS[1]

# Relative error allowed between two computations of the same value by different
# summation orders, before the result is rounded to its dtype: float32 and reduced
# precision both accumulate in float32.
_COMPUTE_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}


def tolerance(dtype: torch.dtype) -> dict:
    """rtol/atol for a result of `dtype`, with atol relative to the result's scale.

    float64 and float32 results differ only by summation order. A bfloat16/float16 result
    is the rounding of a float32 value that differs slightly between torch and us, so the
    two may land one unit in the last place apart: rtol is that unit (finfo.eps bounds
    ulp(x)/|x|), atol the float32 difference.
    """
    compute = _COMPUTE_TOL[dtype]
    rtol = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else compute
    return {"rtol": rtol, "atol": compute}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "", dtype=None):
    """assert_close with the tolerance of `dtype` (default: expected's). Results with
    cancellation (input gradients, gradients of weight) are judged against the scale of the
    whole tensor rather than element by element, so atol is scaled by max |expected|."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    tol = tolerance(dtype or expected.dtype)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    scale = max(scale, 1.0) if torch.isfinite(torch.tensor(scale)) else 1.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        equal_nan=True,
        msg=lambda m: f"{msg}\n{m}",
    )


def assert_same_layout(actual: torch.Tensor, expected: torch.Tensor, msg: str = ""):
    """Same strides, size-1 dimensions included: they do not change the memory layout,
    but code reads them (torch.compile guards on them, and compares the fake kernels'
    with the real ones') and torch gives the standard strides of the result's format.
    An empty tensor's strides are arbitrary."""
    if expected.numel() == 0:
        return
    assert actual.stride() == expected.stride(), (
        f"{msg}: strides {actual.stride()} != torch's {expected.stride()}"
    )


# ---------------------------------------------------------------------------------------
# Inputs


def _channels_last_format(dim: int):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(dim)


# Each layout maps a logical shape to (leaf shape, make leaf from a contiguous tensor of
# the leaf shape, view of the leaf with the logical shape). Gradients are read from the
# leaf, so they flow back through the view as they would in a model.
LAYOUTS = {
    "contiguous": lambda shape: (shape, lambda t: t, lambda t: t),
    # channels_last / channels_last_3d for 4D/5D; for 2D/3D dim 1 innermost.
    "channels_last": lambda shape: (
        shape,
        lambda t: t.movedim(1, -1).contiguous().movedim(-1, 1),
        lambda t: t,
    ),
    # Every other element of the last dim: strided, neither contiguous nor channels-last.
    "sliced": lambda shape: (
        shape[:-1] + (2 * shape[-1],),
        lambda t: t,
        lambda t: t[..., ::2],
    ),
    # All dims reversed: a transposed 2D input, or a "column major" N-d one.
    "permuted": lambda shape: (
        shape[::-1],
        lambda t: t,
        lambda t: t.permute(*reversed(range(t.dim()))),
    ),
    # A channels-last tensor sliced along a spatial dim: torch keeps channels-last.
    "channels_last_sliced": lambda shape: (
        shape[:-1] + (2 * shape[-1],),
        lambda t: t.movedim(1, -1).contiguous().movedim(-1, 1),
        lambda t: t[..., ::2],
    ),
}


def make_input(
    shape,
    layout: str,
    dtype: torch.dtype,
    device,
    *,
    mean: float = 0.5,
    std: float = 2.0,
    channel_offset: bool = True,
    generator: torch.Generator | None = None,
):
    """A random leaf tensor and its view of logical `shape` in `layout`. Values are
    drawn in float32 (so every dtype sees the same numbers), by default with a
    per-channel offset so channels differ in mean as well as spread."""
    shape = tuple(shape)
    leaf_shape, to_layout, view = LAYOUTS[layout](shape)
    base = torch.randn(leaf_shape, generator=generator) * std + mean
    leaf = to_layout(base).to(device=device, dtype=dtype)
    x = view(leaf)
    assert x.shape == shape
    if channel_offset and x.dim() >= 2 and x.shape[1] > 0:
        channel_offset = torch.linspace(-1.0, 1.0, x.shape[1]).view((1, -1) + (1,) * (x.dim() - 2))
        with torch.no_grad():
            x.add_(channel_offset.to(device=device, dtype=dtype))
    return leaf, view


def make_grad_out(shape, layout: str, dtype: torch.dtype, device, generator=None):
    """A random grad_out of logical `shape` in `layout`: standard normal, with zero mean per
    channel (see run_steps)."""
    leaf, view = make_input(
        shape, layout, dtype, device, mean=0.0, std=1.0, channel_offset=False, generator=generator
    )
    return view(leaf)


def layout_applies(layout: str, ndim: int) -> bool:
    """channels_last_sliced needs a spatial dim to slice; the others apply to all."""
    return not (layout == "channels_last_sliced" and ndim < 3)


# ---------------------------------------------------------------------------------------
# Module pairs

TORCH_CLASSES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
OUR_CLASSES = {
    torch.nn.BatchNorm1d: tbn.BatchNorm1d,
    torch.nn.BatchNorm2d: tbn.BatchNorm2d,
    torch.nn.BatchNorm3d: tbn.BatchNorm3d,
}


def randomize_state(module: torch.nn.Module, generator: torch.Generator | None = None):
    """Non-trivial parameters and statistics, so that weight, bias and the running
    statistics all matter: weight around 1 with both signs of bias, running_var > 0, and a
    few batches already tracked (momentum=None divides by that count)."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name == "num_batches_tracked":
                t.fill_(3)
                continue
            r = torch.rand(t.shape, generator=generator)
            values = {
                "weight": 0.5 + r,
                "bias": r - 0.5,
                "running_mean": 0.2 * (r - 0.5),
                "running_var": 0.5 + r,
            }[name]
            t.copy_(values)


def make_pair(
    ndim: int,
    num_features: int,
    precision: Precision = FLOAT32,
    device="cpu",
    *,
    randomize: bool = True,
    **kwargs,
):
    """torch's BatchNormNd for `ndim`-dimensional input and ours, with identical
    parameters and buffers. kwargs go to both constructors."""
    torch_cls = TORCH_CLASSES[ndim]
    factory = {"device": device, "dtype": precision.param_dtype}
    ref = torch_cls(num_features, **factory, **kwargs)
    ours = OUR_CLASSES[torch_cls](num_features, **factory, **kwargs)
    if randomize:
        randomize_state(ref)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_same_state(ours: torch.nn.Module, ref: torch.nn.Module, msg: str = ""):
    """Parameters and buffers (num_batches_tracked exactly) of two modules agree."""
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state.keys() == ref_state.keys(), msg
    for name, expected in ref_state.items():
        actual = ours_state[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(actual, expected), f"{msg}{name}: {actual} != {expected}"
        else:
            assert_close(actual, expected, f"{msg}{name}")


def _float64_twin(ref: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of torch's module holding our current state."""
    twin = copy.deepcopy(ref).double()
    twin.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    )
    return twin


def _forward_backward(module, leaf, view, grad_out, dtype, contiguous=False):
    """Runs `module` on a copy of `leaf` (cast to `dtype`) seen through `view`, and
    returns the output and the gradients of the leaf and of each parameter. With
    `contiguous`, the module sees a contiguous copy of the view, and a contiguous grad_out:
    the same values, and the same gradients of the leaf."""
    x = leaf.detach().clone().to(dtype).requires_grad_(grad_out is not None)
    x_view = view(x).contiguous() if contiguous else view(x)
    out = module(x_view)
    grads = {}
    if grad_out is not None:
        for p in module.parameters():
            p.grad = None
        grad_out = grad_out.to(dtype)
        out.backward(grad_out.contiguous() if contiguous else grad_out)
        grads["input"] = x.grad
        grads.update((name, p.grad) for name, p in module.named_parameters())
    return out, grads


def torch_result_layout(leaf, view):
    """torch's result for the input `view(leaf)`, to compare layouts with: its rule
    (batch_norm_cpu's output allocation) depends on the input's strides only. Ours follows
    it on every device (torch's CUDA paths differ from each other: the native kernel keeps
    any strides, cuDNN returns the suggested format), so the reference runs on the CPU."""
    x = view(leaf.detach().double().cpu())
    C = x.shape[1]
    stats = [
        torch.zeros(C, dtype=x.dtype, device=x.device),
        torch.ones(C, dtype=x.dtype, device=x.device),
    ]
    with torch.no_grad(), single_threaded():
        return torch.nn.functional.batch_norm(x, *stats)


def compare_step(
    ref: torch.nn.Module,
    ours: torch.nn.Module,
    leaf: torch.Tensor,
    view: Callable[[torch.Tensor], torch.Tensor],
    *,
    precision: Precision = FLOAT32,
    grad_out: torch.Tensor | None = None,
    msg: str = "",
):
    """One step of our module (forward, and backward when grad_out is given), checked
    against torch's module doing the same step in float64 from our state: output values
    and layout, gradients of input, weight and bias, running statistics and
    num_batches_tracked. Returns torch's output.

    Why float64: torch's own float32 and float16/bfloat16 CPU results carry errors beyond
    a few roundings. Its channels-last and 2D paths accumulate in float32 (weight
    gradients off by 5e-4 relative at 8x16x32x32 channels-last); with float16/bfloat16
    parameters it keeps the batch statistics (save_mean/save_invstd) in that dtype; for
    strided reduced-precision inputs it reduces gradients in that dtype. Ours accumulate
    in float32 or better, so they must be within the tolerance of their dtype (one unit in
    the last place for float16/bfloat16) of torch's float64 result, rounded to the dtype.

    The float64 result is computed on contiguous copies of input and grad_out. torch's
    CPU backward takes its contiguous fast path when input and grad_out are each dense
    in some memory format and have the same suggested format, and then reads grad_out as
    if it had the input's strides: for a [1, C, 1, W] input with a grad_out whose C is
    innermost (channels-last, though "suggested" contiguous) its input gradients are
    wrong, in float64 too. The result's layout is compared with torch's on the input as
    given.
    """
    # Built before ours runs, so that it starts from the same running statistics.
    expected_module = _float64_twin(ref, ours)
    with single_threaded():
        expected, expected_grads = _forward_backward(
            expected_module, leaf, view, grad_out, torch.float64, contiguous=True
        )
    actual, actual_grads = _forward_backward(ours, leaf, view, grad_out, precision.dtype)

    assert_close(actual, expected.to(actual.dtype), f"{msg}output")
    assert_same_layout(actual, torch_result_layout(leaf, view), f"{msg}output")
    assert actual_grads.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        assert (actual_grads[name] is None) == (g is None), f"{msg}{name} grad"
        if g is not None:
            assert_close(actual_grads[name], g.to(actual_grads[name].dtype), f"{msg}{name} grad")
    assert_same_state(ours, expected_module.to(precision.param_dtype), msg)
    return expected


def run_steps(
    ref: torch.nn.Module,
    ours: torch.nn.Module,
    shape,
    *,
    layout: str = "contiguous",
    grad_layout: str = "contiguous",
    precision: Precision = FLOAT32,
    device="cpu",
    steps: int = 3,
    backward: bool = True,
    seed: int = 0,
):
    """Several steps on fresh random batches, comparing everything after each. The
    modules keep their train/eval mode; running statistics carry over between steps as in
    training. grad_out is drawn in its own layout, which may differ from the input's.

    grad_out has zero mean per channel. A channel mean m makes sum(dy) = m * count, and
    the weight gradient sum(dy * (x - mean)) then moves by sum(dy) * (rounding error of
    save_mean): save_mean is float32 by the op contract (as torch's), so at 20000 rows
    that is 1e-5 of the result for any float32 implementation, torch's included."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        leaf, view = make_input(shape, layout, precision.dtype, device, generator=generator)
        grad_out = None
        if backward:
            grad_out = make_grad_out(shape, grad_layout, precision.dtype, device, generator)
        compare_step(
            ref, ours, leaf, view, precision=precision, grad_out=grad_out, msg=f"step {step}: "
        )
