"""torch.autograd.gradcheck and gradgradcheck of the functional form in float64: first
derivatives (reverse and forward mode) and second derivatives of input, weight and bias
against finite differences, in training (through the batch statistics) and in evaluation,
with and without affine parameters, contiguous and channels-last; third derivatives
against autograd through BatchNorm written with tensor ops."""

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch_batchnorm as tbn

C = 3


def _inputs(shape, channels_last, affine):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = (
        (torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64))
        if affine
        else (None, None)
    )
    return [t.requires_grad_() if t is not None else None for t in (x, *params)]


def _running_stats():
    return (torch.randn(C, dtype=torch.float64) * 0.1, torch.rand(C, dtype=torch.float64) + 0.5)


def _functional(mode, running_mean, running_var):
    """batch_norm of (x, weight, bias) in `mode`, as gradcheck calls it."""

    def fn(x, weight, bias):
        if mode == "eval":
            return tbn.functional.batch_norm(x, running_mean, running_var, weight, bias)
        # Fresh copies: every evaluation would otherwise move the statistics it updates.
        stats = (
            (running_mean.clone(), running_var.clone())
            if mode == "train_tracking"
            else (None, None)
        )
        return tbn.functional.batch_norm(x, *stats, weight, bias, training=True, eps=1e-3)

    return fn


def _textbook(mode, running_mean, running_var):
    """_functional's batch_norm of a [N, C, L] input with a weight, written with tensor
    ops: the reference of derivatives that finite differences cannot check."""

    def fn(x, weight, bias):
        if mode == "eval":
            mean, var, eps = running_mean, running_var, 1e-5
        else:
            mean, var, eps = x.mean((0, 2)), x.var((0, 2), unbiased=False), 1e-3
        return (x - mean[:, None]) / torch.sqrt(var[:, None] + eps) * weight[:, None]

    return fn


SHAPES = pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((4, C), False),
        ((3, C, 5), False),
        ((2, C, 3, 4), False),
        ((2, C, 3, 4), True),
        ((2, C, 2, 3, 2), False),
    ],
    ids=["2d", "3d", "nchw", "channels_last", "5d"],
)
AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
MODES = pytest.mark.parametrize("mode", ["train", "train_tracking", "eval"])


@SHAPES
@AFFINE
@MODES
def test_gradcheck(mode, affine, shape, channels_last):
    """Reverse- and forward-mode derivatives (jvp) against finite differences."""
    x, weight, bias = _inputs(shape, channels_last, affine)
    fn = _functional(mode, *_running_stats())
    assert torch.autograd.gradcheck(fn, (x, weight, bias), check_forward_ad=True)


@SHAPES
@AFFINE
@MODES
def test_gradgradcheck(mode, affine, shape, channels_last):
    """Second derivatives (create_graph=True, then backward again; and forward mode over
    the backward), through the input's own statistics in training, against finite
    differences of the first."""
    x, weight, bias = _inputs(shape, channels_last, affine)
    fn = _functional(mode, *_running_stats())
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias), check_fwd_over_rev=True)


@pytest.mark.parametrize("mode", ["train", "train_tracking", "eval"])
def test_derivatives_up_to_the_third(mode):
    """First, second and third derivatives against autograd through BatchNorm written
    with tensor ops: the double backward stays connected to the graph of the first, and
    in training follows the input's statistics. (torch's own third derivative does not:
    its double backward takes the saved statistics as constants.)"""
    x, weight, _ = _inputs((3, C, 2), False, True)
    running_mean, running_var = _running_stats()
    ours = _functional(mode, running_mean, running_var)
    textbook = _textbook(mode, running_mean, running_var)

    def derivatives(fn):
        (g,) = torch.autograd.grad((fn(x, weight, None) ** 3).sum(), x, create_graph=True)
        gg_x, gg_weight = torch.autograd.grad((g**2).sum(), (x, weight), create_graph=True)
        (ggg,) = torch.autograd.grad(gg_weight.sum(), x)
        return g, gg_x, gg_weight, ggg

    for name, actual, expected in zip(
        ["first", "second (x)", "second (weight)", "third"],
        derivatives(ours),
        derivatives(textbook),
    ):
        torch.testing.assert_close(actual, expected, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recorded_backward_has_the_kernels_values(mode):
    """A backward recorded for another pass (create_graph=True, as torch.func.grad always
    does) computes its values with the kernels: bit for bit those of a plain backward."""
    x, weight, bias = _inputs((4, C, 5), False, True)
    fn = _functional(mode, *_running_stats())
    grad_out = torch.randn(x.shape, dtype=x.dtype)
    plain = torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad_out)
    recorded = torch.autograd.grad(
        fn(x, weight, bias), (x, weight, bias), grad_out, create_graph=True
    )
    assert all(g.grad_fn.name() == "BatchNormBackwardBackward" for g in recorded)
    for a, b in zip(recorded, plain):
        assert torch.equal(a, b)


# Inputs viewed through a permute, with strides other than the standard ones on size-1
# dims, and one channels-last [1, C, 1, W] that suggest_memory_format calls contiguous.
def _permuted(*shape_in_memory, order):
    return torch.randn(shape_in_memory, dtype=torch.float64).permute(*order)


FORWARD_OVER_REVERSE_INPUTS = {
    "size_one_spatial": lambda: _permuted(3, 1, 3, C, order=(0, 3, 1, 2)),
    "one_channel": lambda: _permuted(4, 3, 3, 1, order=(0, 3, 1, 2)),
    "one_sample": lambda: _permuted(4, 1, C, 1, order=(3, 2, 1, 0)),
}


@pytest.mark.parametrize("name", list(FORWARD_OVER_REVERSE_INPUTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_over_reverse_backward_matches_the_kernels(mode, name):
    """With a tangent on the input, batch_norm_backward runs as ATen ops (its primal too):
    the same values as the kernels, and the same strides, size-1 dims included."""
    torch.manual_seed(0)
    x = FORWARD_OVER_REVERSE_INPUTS[name]()
    ops = torch.ops.torch_batchnorm
    channels = x.shape[1]
    stats = [torch.randn(channels, dtype=x.dtype) * 0.1, torch.rand(channels, dtype=x.dtype) + 0.5]
    _, save_mean, save_invstd = ops.batch_norm_forward(
        x, None, None, *[s.clone() for s in stats], mode == "train", 0.1, 1e-5
    )
    grad_out = torch.randn(x.shape, dtype=x.dtype)

    def grad_input(x):
        args = (save_mean, save_invstd) if mode == "train" else (None, None)
        return ops.batch_norm_backward(
            grad_out, x, None, *stats, *args, mode == "train", 1e-5, [True, False, False]
        )[0]

    expected = grad_input(x)
    with fwAD.dual_level():
        actual = fwAD.unpack_dual(grad_input(fwAD.make_dual(x, torch.randn_like(x)))).primal
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("outer", ["jacrev", "jacfwd"])
@pytest.mark.parametrize("inner", ["jacrev", "jacfwd"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hessian_in_every_mode(mode, inner, outer):
    """The Hessian by each combination of forward and reverse mode, against the same
    combination through BatchNorm written with tensor ops: a forward-mode tangent is
    differentiable again, through the batch statistics in training. (torch's own, with
    forward mode inside, treats them as constants.)"""
    x, weight, _ = _inputs((3, C, 2), False, True)
    running_mean, running_var = _running_stats()
    ours = _functional(mode, running_mean, running_var)
    textbook = _textbook(mode, running_mean, running_var)
    transforms = {"jacrev": torch.func.jacrev, "jacfwd": torch.func.jacfwd}

    def hessian(fn):
        def loss(x):
            return (fn(x, weight.detach(), None) ** 3).sum()

        return transforms[outer](transforms[inner](loss))(x.detach())

    torch.testing.assert_close(hessian(ours), hessian(textbook))


def test_backward_from_threads_sharing_a_graph():
    """Threads may call backward on losses that share the node: its saved tensors must not
    be freed under another thread's feet (one succeeds, the others raise cleanly)."""
    for _ in range(100):
        x = torch.randn(2, 4, 2, requires_grad=True)
        out = tbn.functional.batch_norm(x * 1, None, None, training=True)
        losses = [out.sum() * (i + 1) for i in range(4)]
        errors = []

        def backward(loss, errors=errors):
            try:
                loss.backward()
            except RuntimeError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=backward, args=(loss,)) for loss in losses]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all("a second time" in message for message in errors), errors
