"""Parity with torch.nn.BatchNorm1d/2d/3d and torch.nn.functional.batch_norm over the
matrix torch tests BatchNorm with: shapes (odd sizes, C=1, 1x1 spatial, N=1 with spatial
> 1, zero batch), every dtype with same-dtype and float32 ("mixed") parameters, train and
eval, momentum values, affine and tracking options, and memory layouts. Each case runs
several steps and compares outputs, gradients of input, weight and bias, the running
statistics and num_batches_tracked."""

import copy
import functools
import inspect
import itertools
import pickle

import pytest
import torch
import torch_batchnorm as tbn
from conftest import (
    BN_TAKES_BIAS,
    FLOAT32,
    FLOAT64,
    LAYOUTS,
    PRECISIONS,
    assert_close,
    assert_same_layout,
    assert_same_state,
    compare_step,
    layout_applies,
    make_input,
    make_pair,
    run_steps,
    single_threaded,
)
from torch._subclasses.fake_tensor import FakeTensorMode

SHAPES = [
    # BatchNorm1d on [N, C]
    (4, 10),
    (3, 1),
    (2, 1),
    (7, 33),
    (0, 5),
    # BatchNorm1d on [N, C, L]
    (4, 5, 3),
    (1, 3, 7),
    (3, 1, 5),
    (5, 7, 1),
    (0, 5, 9),
    # BatchNorm2d
    (2, 3, 6, 6),
    (4, 1, 9, 9),
    (4, 9, 1, 1),
    (1, 4, 3, 5),
    (3, 2, 3, 4),
    (5, 7, 11, 13),
    (0, 5, 2, 2),
    # BatchNorm3d
    (2, 3, 4, 4, 4),
    (1, 2, 3, 5, 2),
    (3, 5, 1, 1, 1),
    (0, 5, 2, 2, 2),
]

# Large enough that the kernels split channels into several chunks, blocks and parallel
# pieces, and merge partial statistics.
LARGE_SHAPES = [
    (20000, 3),
    (3001, 7),  # channels-last rows narrower than a vector, taken flat: periods of 112 values
    (7, 6200),  # rows whose coefficients outgrow L1: four at a time, then three one at a time
    (4, 24, 30, 31),  # channels-last rows of a vector and a half: the last vector overlaps
    (4, 16, 2500),
    (8, 16, 32, 32),
    (4, 37, 5, 3),  # NCHW channels fused in blocks of three, the last block one channel
    (3, 5, 50, 51),
    (2, 8, 9, 30, 31),
]


def _ids(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _cases(shapes, layouts):
    return [
        (s, layout)
        for s, layout in itertools.product(shapes, layouts)
        if layout_applies(layout, len(s))
    ]


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
@pytest.mark.parametrize("shape,layout", _cases(SHAPES, LAYOUTS), ids=_ids)
def test_train_then_eval(shape, layout, precision, device):
    ref, ours = make_pair(len(shape), shape[1], precision, device)
    run_steps(ref, ours, shape, layout=layout, precision=precision, device=device, steps=3)
    ref.eval()
    ours.eval()
    run_steps(ref, ours, shape, layout=layout, precision=precision, device=device, steps=1, seed=1)


@pytest.mark.parametrize("precision", [FLOAT32, FLOAT64, PRECISIONS[3], PRECISIONS[4]], ids=str)
@pytest.mark.parametrize(
    "shape,layout", _cases(LARGE_SHAPES, ["contiguous", "channels_last", "sliced"]), ids=_ids
)
def test_large(shape, layout, precision, device):
    ref, ours = make_pair(len(shape), shape[1], precision, device)
    run_steps(ref, ours, shape, layout=layout, precision=precision, device=device, steps=2)
    ref.eval()
    ours.eval()
    run_steps(ref, ours, shape, layout=layout, precision=precision, device=device, steps=1)


# Outputs large enough (16 MiB and more with the inputs of their pass; 40 MiB in
# evaluation) that the CPU kernels write them with streaming stores, in training and in
# evaluation: NCHW runs of 784 bytes (streamed since the output alone passes 16 MiB), long
# NCHW runs, and channels-last rows.
STREAMED_CASES = [
    ((27, 1000, 14, 14), "contiguous"),
    ((4, 16, 300, 301), "contiguous"),
    ((10, 24, 150, 150), "channels_last"),
]


@pytest.mark.parametrize("shape,layout", STREAMED_CASES, ids=_ids)
def test_streamed_outputs(shape, layout):
    ref, ours = make_pair(len(shape), shape[1], FLOAT32, "cpu")
    run_steps(ref, ours, shape, layout=layout, steps=1)
    ref.eval()
    ours.eval()
    run_steps(ref, ours, shape, layout=layout, steps=1)


AFFINE = {
    "affine": {"affine": True},
    "no_affine": {"affine": False},
}
if BN_TAKES_BIAS:
    AFFINE["no_bias"] = {"affine": True, "bias": False}
OPTION_CASES = [
    ((6, 4), "contiguous"),
    ((2, 3, 6, 6), "contiguous"),
    ((2, 3, 6, 6), "channels_last"),
    ((2, 3, 4, 4, 4), "channels_last"),
]


@pytest.mark.parametrize("precision", [FLOAT32, PRECISIONS[2], PRECISIONS[5]], ids=str)
@pytest.mark.parametrize("shape,layout", OPTION_CASES, ids=_ids)
@pytest.mark.parametrize("track_running_stats", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("affine", list(AFFINE), ids=str)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 0.8], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
def test_module_options(
    mode, momentum, affine, track_running_stats, shape, layout, precision, device
):
    ref, ours = make_pair(
        len(shape),
        shape[1],
        precision,
        device,
        momentum=momentum,
        track_running_stats=track_running_stats,
        **AFFINE[affine],
    )
    ref.train(mode == "train")
    # Frozen, ours in training mode computes what torch's computes in evaluation.
    ours.train(mode != "eval")
    ours.freeze(mode == "frozen")
    run_steps(ref, ours, shape, layout=layout, precision=precision, device=device, steps=3)


def test_frozen_is_a_mode():
    """Like training, frozen is kept by copies and modules converted to SyncBatchNorm,
    printed by repr, and not part of the state_dict."""
    bn = tbn.BatchNorm2d(3)
    state = bn.state_dict().keys()
    bn.freeze()
    assert bn.frozen and bn.state_dict().keys() == state
    assert repr(bn) == repr(torch.nn.BatchNorm2d(3))[:-1] + ", frozen=True)"
    assert copy.deepcopy(bn).frozen and pickle.loads(pickle.dumps(bn)).frozen
    assert tbn.SyncBatchNorm.convert_sync_batchnorm(bn).frozen
    assert not tbn.SyncBatchNorm.convert_sync_batchnorm(tbn.BatchNorm2d(3)).frozen
    assert not tbn.convert_batchnorm(torch.nn.BatchNorm2d(3)).frozen
    with pytest.raises(ValueError, match="freeze mode is expected to be boolean"):
        bn.freeze(1)
    assert bn.frozen
    bn(torch.randn(2, 3, 2, 2))
    assert bn.num_batches_tracked == 0
    assert bn.freeze(False) is bn
    bn(torch.randn(2, 3, 2, 2))
    assert bn.num_batches_tracked == 1


GRAD_LAYOUT_CASES = [
    ((6, 5), "contiguous", "permuted"),
    ((6, 5), "permuted", "contiguous"),
    ((4, 3, 7), "channels_last", "contiguous"),
    ((2, 3, 6, 5), "contiguous", "channels_last"),
    ((2, 3, 6, 5), "channels_last", "contiguous"),
    ((2, 3, 6, 5), "channels_last", "sliced"),
    ((2, 3, 6, 5), "sliced", "channels_last"),
    ((2, 3, 6, 5), "permuted", "channels_last_sliced"),
    ((2, 3, 4, 3, 5), "channels_last", "permuted"),
    ((2, 3, 4, 3, 5), "contiguous", "channels_last"),
    # Dense in both layouts' eyes but with different strides: torch's own backward reads
    # this grad_out with the input's strides (see conftest.compare_step).
    ((1, 3, 1, 4), "contiguous", "permuted"),
    ((1, 3, 1, 4), "permuted", "contiguous"),
]


@pytest.mark.parametrize("precision", PRECISIONS[:3] + PRECISIONS[5:], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout,grad_layout", GRAD_LAYOUT_CASES, ids=_ids)
def test_grad_out_layout(shape, layout, grad_layout, training, precision, device):
    ref, ours = make_pair(len(shape), shape[1], precision, device)
    ref.train(training)
    ours.train(training)
    run_steps(
        ref,
        ours,
        shape,
        layout=layout,
        grad_layout=grad_layout,
        precision=precision,
        device=device,
        steps=2,
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_image_made_a_batch_of_one(training, device):
    """An HWC image made [1, C, H, W] by permute(2, 0, 1).unsqueeze(0) (channels-last, with
    C as the batch dim's stride) next to a contiguous grad_out: the gradients match
    float64. (torch 2.13's CPU backward reads grad_out with the input's strides here: its
    input, weight and bias gradients are off by about 1 to 10.)"""
    ref, ours = make_pair(4, 3, FLOAT32, device)
    ref.train(training)
    ours.train(training)
    generator = torch.Generator().manual_seed(0)
    leaf = torch.randn(4, 5, 3, generator=generator).to(device)
    grad_out = torch.randn(1, 3, 4, 5, generator=generator).to(device)
    compare_step(ref, ours, leaf, lambda t: t.permute(2, 0, 1).unsqueeze(0), grad_out=grad_out)


@pytest.mark.parametrize(
    "layout,memory_format",
    [
        ("channels_last", torch.channels_last),
        ("channels_last_sliced", torch.channels_last),
        ("contiguous", torch.contiguous_format),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_keeps_channels_last(layout, memory_format, training, device):
    _, ours = make_pair(4, 3, device=device)
    ours.train(training)
    leaf, view = make_input((2, 3, 5, 4), layout, torch.float32, device)
    leaf.requires_grad_()
    out = ours(view(leaf))
    assert out.is_contiguous(memory_format=memory_format)
    out.backward(torch.ones_like(out))
    assert leaf.grad.is_contiguous(memory_format=memory_format)
    x3d = make_input((2, 3, 3, 4, 2), "channels_last", torch.float32, device)[0]
    _, ours3d = make_pair(5, 3, device=device)
    assert ours3d(x3d).is_contiguous(memory_format=torch.channels_last_3d)


# Views whose size-1 dims have strides other than the standard ones (through a permute or
# a slice), and copies that count as both contiguous and channels-last: the output and the
# input gradient take the strides torch's CPU kernels give them (see
# conftest.torch_result_layout), the gradient's by torch's backward rule, which also looks
# at grad_out's layout; and the fake kernels agree with ours.
SIZE_ONE_SHAPES = [
    (1, 3),
    (1, 3, 1),
    (2, 1, 3),
    (1, 3, 1, 1),
    (1, 1, 1, 1),
    (2, 3, 1, 1),
    (1, 3, 1, 4),
    (4, 1, 3, 3),
    (1, 3, 1, 1, 1),
    (2, 3, 1, 1, 1),
]


def _output_and_input_grad(module, x, grad_out):
    """The module's output and the input gradient it returns (taken at the input itself,
    not through a view's backward)."""
    x = x.detach().requires_grad_()
    out = module(x)
    return out, *torch.autograd.grad(out, x, grad_out)


@pytest.mark.parametrize("grad_layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,layout", _cases(SIZE_ONE_SHAPES, LAYOUTS), ids=_ids)
def test_strides_of_size_one_dims(shape, layout, grad_layout, device):
    if not layout_applies(grad_layout, len(shape)):
        grad_layout = "contiguous"
    # Evaluation: the shapes with one value per channel cannot train.
    ref, ours = make_pair(len(shape), shape[1], device=device)
    leaf, view = make_input(shape, layout, torch.float32, device)
    grad_leaf, grad_view = make_input(shape, grad_layout, torch.float32, device)
    x, grad_out = view(leaf).detach(), grad_view(grad_leaf).detach()
    out, grad = _output_and_input_grad(ours.eval(), x, grad_out)
    # The views taken again on the CPU: a copy of a strided view would be dense.
    expected_out, expected_grad = _output_and_input_grad(
        ref.cpu().eval(), view(leaf.cpu()), grad_view(grad_leaf.cpu())
    )
    assert_same_layout(out, expected_out, "output")
    assert_same_layout(grad, expected_grad, "input grad")

    ops = torch.ops.torch_batchnorm
    stats = (ours.running_mean, ours.running_var)
    with FakeTensorMode() as mode:
        fake_x, fake_dy, fake_mean, fake_var = map(mode.from_tensor, (x, grad_out, *stats))
        fake_out = ops.batch_norm_forward(
            fake_x, None, None, fake_mean, fake_var, False, 0.1, 1e-5
        )[0]
        fake_grad = ops.batch_norm_backward(
            fake_dy,
            fake_x,
            None,
            fake_mean,
            fake_var,
            None,
            None,
            False,
            1e-5,
            [True, False, False],
        )[0]
    assert fake_out.stride() == out.stride()
    assert fake_grad.stride() == grad.stride()


# ---------------------------------------------------------------------------------------
# Functional form: momentum values a module never passes, eps, None running statistics.

FUNCTIONAL_SHAPES = [(3, 1), (2, 1), (3, 2, 3, 4), (4, 5, 3), (2, 3, 2, 3, 2)]


def _functional_args(shape, precision, device, *, stats: bool, affine: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    leaf, view = make_input(shape, "contiguous", precision.dtype, device, generator=generator)
    C = shape[1]
    params = {}
    if affine:
        params["weight"] = torch.rand(C, generator=generator) + 0.5
        params["bias"] = torch.rand(C, generator=generator) - 0.5
    if stats:
        params["running_mean"] = 0.1 * torch.randn(C, generator=generator)
        params["running_var"] = torch.rand(C, generator=generator) + 0.5
    params = {k: v.to(device=device, dtype=precision.param_dtype) for k, v in params.items()}
    grad_out = torch.randn(shape, generator=generator).to(device=device, dtype=precision.dtype)
    return leaf, view, params, grad_out


def _run_functional(fn, leaf, view, params, grad_out, dtype, **kwargs):
    """fn on copies of the arguments cast to `dtype` (parameters too, keeping float32
    ones float32 where dtype is reduced); returns output, input grad and the parameters."""
    x = leaf.detach().clone().to(dtype).requires_grad_()
    p = {
        k: v.detach()
        .clone()
        .to(torch.float64 if dtype == torch.float64 else v.dtype)
        .requires_grad_(k in ("weight", "bias"))
        for k, v in params.items()
    }
    out = fn(
        view(x),
        p.get("running_mean"),
        p.get("running_var"),
        p.get("weight"),
        p.get("bias"),
        **kwargs,
    )
    out.backward(grad_out.to(dtype))
    return out, x.grad, p


# Evaluation without running statistics is an error case (test_errors).
@pytest.mark.parametrize(
    "training,stats",
    [(True, True), (True, False), (False, True)],
    ids=["train", "train_no_stats", "eval"],
)
@pytest.mark.parametrize(
    "eps,momentum", [(1e-5, 0.1), (1e-5, 0.0), (0.5, 0.5), (0.6, -1.2)], ids=str
)
@pytest.mark.parametrize("shape", FUNCTIONAL_SHAPES, ids=_ids)
@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_functional(precision, shape, momentum, eps, training, stats, device):
    """Against torch.nn.functional.batch_norm in float64 (see conftest.compare_step)."""
    for affine in (True, False):
        args = _functional_args(
            shape, precision, device, stats=stats, affine=affine, seed=len(shape)
        )
        kwargs = {"training": training, "momentum": momentum, "eps": eps}
        with single_threaded():
            expected, expected_grad, expected_params = _run_functional(
                torch.nn.functional.batch_norm, *args, torch.float64, **kwargs
            )
        actual, actual_grad, actual_params = _run_functional(
            tbn.functional.batch_norm, *args, precision.dtype, **kwargs
        )
        assert_close(actual, expected.to(actual.dtype), "output")
        assert_same_layout(actual, expected, "output")
        assert_close(actual_grad, expected_grad.to(actual_grad.dtype), "input grad")
        for name, t in expected_params.items():
            ours = actual_params[name]
            assert_close(ours, t.detach().to(ours.dtype), name)
            if t.grad is not None:
                assert_close(ours.grad, t.grad.to(ours.dtype), f"{name} grad")


@pytest.mark.parametrize(
    "training,stats",
    [(True, True), (True, False), (False, True)],
    ids=["train", "train_no_stats", "eval"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_bias_without_weight(dtype, training, stats, device):
    """A float32 bias and no weight make a float16/bfloat16 call mixed precision, as in
    torch's kernels: the bias gradient is a float32 sum of grad_out, not that sum rounded
    to the input's dtype (0.35 off in bfloat16 here, where the backward op, which takes no
    bias, was told of no float32 parameter)."""
    generator = torch.Generator().manual_seed(0)
    shape = (64, 3, 8, 8)
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(device, dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)
    bias = torch.zeros(3, device=device, requires_grad=True)
    rm, rv = (torch.zeros(3, device=device), torch.ones(3, device=device)) if stats else (None,) * 2
    out = tbn.functional.batch_norm(x, rm, rv, None, bias, training=training)
    out.backward(grad_out)
    assert_close(bias.grad, grad_out.double().sum((0, 2, 3)).float(), "bias grad")
    if device == "cpu":
        # torch's CPU kernel takes the float32 bias as mixed precision; its input gradient
        # is the one ours gives without the weight of ones.
        x_ref = x.detach().clone().requires_grad_()
        bias_ref = torch.zeros(3, requires_grad=True)
        ref_stats = (rm.clone(), rv.clone()) if stats else (None, None)
        torch.nn.functional.batch_norm(
            x_ref, *ref_stats, None, bias_ref, training=training
        ).backward(grad_out)
        assert_close(bias.grad, bias_ref.grad, "bias grad against torch's")
        assert_close(x.grad, x_ref.grad, "input grad against torch's")


# torch's forward reads a weight and bias of any shape that holds C values as if flat:
# parameters kept as [1, C, 1, 1] to broadcast against the input, say. (Its backward then
# raises "TensorAccessor expected 1 dims" on the CPU; ours gives their gradients.)
PARAMETER_SHAPES = [(1, 3), (3, 1), (1, 3, 1, 1)]


@pytest.mark.parametrize("param_shape", PARAMETER_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_functional_parameters_of_any_shape(compiled, training, param_shape, device):
    """Outputs, running statistics and gradients as torch's with the same values flat,
    the gradients in the parameters' own shapes; on the CPU, torch's forward with those
    shapes agrees."""
    leaf, view, params, grad_out = _functional_args(
        (4, 3, 5, 2), FLOAT32, device, stats=True, affine=True, seed=7
    )
    shaped = dict(params)
    for name in ("weight", "bias"):
        shaped[name] = params[name].reshape(param_shape)
    ours_fn = tbn.functional.batch_norm
    if compiled:
        ours_fn = torch.compile(ours_fn, backend="aot_eager", fullgraph=True)
    run = functools.partial(
        _run_functional,
        leaf=leaf,
        view=view,
        grad_out=grad_out,
        dtype=torch.float32,
        training=training,
    )
    actual, actual_grad, actual_params = run(ours_fn, params=shaped)
    expected, expected_grad, expected_params = run(torch.nn.functional.batch_norm, params=params)
    assert_close(actual, expected, "output")
    assert_close(actual_grad, expected_grad, "input grad")
    for name, ref in expected_params.items():
        ours = actual_params[name]
        assert_close(ours.detach().flatten(), ref.detach(), name)
        if ref.grad is not None:
            assert ours.grad.shape == param_shape
            assert_close(ours.grad.flatten(), ref.grad, f"{name} grad")
    if device != "cpu":
        return  # torch's CUDA forward goes through cuDNN or its own kernels, not checked here
    with torch.no_grad():
        x = view(leaf.detach().clone())
        stats = [shaped[k].clone() for k in ("running_mean", "running_var")]
        torch_shaped = torch.nn.functional.batch_norm(
            x, *stats, shaped["weight"], shaped["bias"], training=training
        )
    assert_close(actual.detach(), torch_shaped, "output of torch's call with those shapes")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=str)
def test_activation_checkpointing(momentum, use_reentrant, device):
    """torch.utils.checkpoint runs the forward again in the backward, so the running
    statistics and num_batches_tracked advance twice a step, torch's as ours; the
    non-reentrant form stops that second run as soon as the op has saved its tensors."""
    from torch.utils.checkpoint import checkpoint

    ref, ours = make_pair(4, 3, FLOAT64, device, momentum=momentum)
    ours.float()
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(4, 3, 5, 6, generator=generator, dtype=torch.float64).to(device)
        grad_out = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device)
        grads = []
        for module, dtype in [(ref, torch.float64), (ours, torch.float32)]:
            leaf = x.to(dtype, copy=True).requires_grad_()
            out = checkpoint(module, leaf, use_reentrant=use_reentrant)
            out.backward(grad_out.to(dtype))
            grads.append(leaf.grad)
        assert_close(grads[1], grads[0].float(), f"step {step}: input grad")
        assert_same_state(ours, ref.float(), f"step {step}: ")
        ref.double()


def test_statistics_made_in_inference_mode(device):
    """Running statistics created under torch.inference_mode (inference tensors, which
    have no version counter) are updated outside it, as torch updates them."""
    x = torch.randn(4, 3, 5, device=device)
    results = []
    for batch_norm in (torch.nn.functional.batch_norm, tbn.functional.batch_norm):
        with torch.inference_mode():
            stats = torch.zeros(3, device=device), torch.ones(3, device=device)
        results.append((batch_norm(x, *stats, training=True), *stats))
    for name, expected, actual in zip(["output", "running_mean", "running_var"], *results):
        assert_close(actual, expected, name)


LAZY = {
    2: (torch.nn.LazyBatchNorm1d, tbn.LazyBatchNorm1d, tbn.BatchNorm1d),
    4: (torch.nn.LazyBatchNorm2d, tbn.LazyBatchNorm2d, tbn.BatchNorm2d),
    5: (torch.nn.LazyBatchNorm3d, tbn.LazyBatchNorm3d, tbn.BatchNorm3d),
}


@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 6, 6), (2, 3, 4, 4, 4)], ids=_ids)
def test_lazy_modules(shape, device):
    """The lazy classes take torch's arguments, take their size from the first input and
    become our BatchNorm classes, training as torch's do from the first call."""
    torch_cls, lazy_cls, our_cls = LAZY[len(shape)]
    assert inspect.signature(lazy_cls) == inspect.signature(torch_cls)
    ref, ours = torch_cls(momentum=None, device=device), lazy_cls(momentum=None, device=device)
    assert repr(ours) == repr(ref)
    x = torch.randn(shape, device=device) * 2 + 1
    assert_close(ours(x), ref(x), "first call")
    assert type(ours) is our_cls and ours.num_features == shape[1]
    assert_same_state(ours, ref)
    run_steps(ref, ours, shape, device=device, steps=2)
    ref.eval()
    ours.eval()
    run_steps(ref, ours, shape, device=device, steps=1)


def test_functional_defaults_match_torch():
    import inspect

    ours = inspect.signature(tbn.functional.batch_norm).parameters
    theirs = inspect.signature(torch.nn.functional.batch_norm).parameters
    assert [(p.name, p.default) for p in ours.values()] == [
        (p.name, p.default) for p in theirs.values()
    ]


def test_constructor_matches_torch():
    import inspect

    for torch_cls, our_cls in [
        (torch.nn.BatchNorm1d, tbn.BatchNorm1d),
        (torch.nn.BatchNorm2d, tbn.BatchNorm2d),
        (torch.nn.BatchNorm3d, tbn.BatchNorm3d),
    ]:
        assert inspect.signature(our_cls) == inspect.signature(torch_cls)
        assert issubclass(our_cls, torch_cls)
