"""Every input torch.nn.BatchNormNd and torch.nn.functional.batch_norm reject, ours reject
with the same exception type and message; and, unlike torch, a call that raises leaves
every parameter and buffer (num_batches_tracked included) as it was.

The few deliberate differences (where torch reads out of bounds, or accepts arguments it
cannot use) are pinned down at the end of the file, each with its reason."""

import contextlib
import itertools
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch_batchnorm as tbn
from conftest import BN_TAKES_BIAS, OUR_CLASSES, TORCH_CLASSES, Precision, make_pair

F = torch.nn.functional
ops = torch.ops.torch_batchnorm

f32, f64, bf16, f16, i64 = torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.long


def raised(fn, *args, **kwargs):
    """(type, message) of the exception fn(*args, **kwargs) raises, or None."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the point is to compare any exception
        return type(e), str(e)
    return None


def torch_words(error):
    """torch's error as ours word it: the one autograd message names the op that refuses,
    which is native_batch_norm in torch and batch_norm_forward here."""
    if error is None:
        return None
    kind, message = error
    return kind, message.replace("'native_batch_norm'", "'batch_norm_forward'")


def snapshot(tensors):
    """Copies of the tensors among the arguments (others are kept as they are)."""
    return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in tensors]


def assert_unchanged(before, after, what):
    for i, (b, a) in enumerate(zip(before, after)):
        assert isinstance(b, torch.Tensor) == isinstance(a, torch.Tensor), f"{what}[{i}]"
        if isinstance(b, torch.Tensor):
            # (Meta tensors hold no values to compare.)
            same = a.dtype == b.dtype and (a.is_meta or torch.equal(a, b))
            assert same, f"{what}[{i}] changed on error"


# ---------------------------------------------------------------------------------------
# Modules

C = 3


def _input(ndim, channels=C, batch=4, dtype=f32):
    shape = (batch, channels) + (2,) * max(ndim - 2, 0) if ndim >= 2 else (batch,) * ndim
    return torch.randn(shape).to(dtype)


def _setattr(name, value):
    return lambda m: setattr(m, name, value(m) if callable(value) else value)


def _requires_grad(name):
    return lambda m: getattr(m, name).requires_grad_()


# (id, module ndim, constructor kwargs, training, module edit, input)
MODULE_CASES = []
for ndim, bad in [(2, [1, 4]), (4, [2, 3, 5]), (5, [3, 4, 6])]:
    for bad_ndim in bad:
        for training in (True, False):
            MODULE_CASES.append(
                (
                    f"{ndim}d_class_{bad_ndim}d_input",
                    ndim,
                    {},
                    training,
                    None,
                    lambda d=bad_ndim: _input(d),
                )
            )
for ndim in (2, 3, 4, 5):
    MODULE_CASES.append(
        (
            f"{ndim}d_one_value_per_channel",
            ndim,
            {},
            True,
            None,
            lambda d=ndim: _input(d, batch=1)[(slice(None),) * 2 + (slice(0, 1),) * (d - 2)],
        )
    )
for training, kwargs in itertools.product(
    (True, False),
    [
        {},
        {"affine": False},
        {"track_running_stats": False},
    ]
    + ([{"bias": False}] if BN_TAKES_BIAS else []),
):
    MODULE_CASES.append(
        (
            f"wrong_channels_{'train' if training else 'eval'}_{kwargs}",
            4,
            kwargs,
            training,
            None,
            lambda: _input(4, channels=C + 1),
        )
    )
MODULE_CASES += [
    ("eps_zero_train", 4, {"eps": 0.0}, True, None, lambda: _input(4)),
    ("eps_negative_train", 4, {"eps": -1.0}, True, None, lambda: _input(4)),
    ("eps_negative_eval", 4, {"eps": -1.0}, False, None, lambda: _input(4)),
    (
        "eps_negative_untracked_eval",
        4,
        {"eps": -1e-3, "track_running_stats": False},
        False,
        None,
        lambda: _input(4),
    ),
    ("running_mean_none_eval", 4, {}, False, _setattr("running_mean", None), lambda: _input(4)),
    ("running_var_none_eval", 4, {}, False, _setattr("running_var", None), lambda: _input(4)),
    ("running_mean_none_train", 4, {}, True, _setattr("running_mean", None), lambda: _input(4)),
    ("running_var_none_train", 4, {}, True, _setattr("running_var", None), lambda: _input(4)),
    (
        "running_mean_2d",
        4,
        {},
        True,
        _setattr("running_mean", lambda m: m.running_mean.view(C, 1)),
        lambda: _input(4),
    ),
    (
        "running_mean_requires_grad_train",
        4,
        {},
        True,
        _requires_grad("running_mean"),
        lambda: _input(4),
    ),
    (
        "running_var_requires_grad_eval",
        4,
        {},
        False,
        _requires_grad("running_var"),
        lambda: _input(4),
    ),
    ("integer_input_train", 4, {}, True, None, lambda: _input(4, dtype=i64)),
    ("integer_input_eval", 4, {}, False, None, lambda: _input(4, dtype=i64)),
    ("bool_input", 2, {}, True, None, lambda: _input(2) > 0),
    ("float64_input_float32_module", 4, {}, True, None, lambda: _input(4, dtype=f64)),
    ("float32_input_float64_module", 4, {"dtype": f64}, True, None, lambda: _input(4)),
    ("float32_input_bfloat16_module", 2, {"dtype": bf16}, False, None, lambda: _input(2)),
    ("float16_input_bfloat16_module", 4, {"dtype": bf16}, True, None, lambda: _input(4, dtype=f16)),
    (
        "bfloat16_input_float64_module",
        4,
        {"dtype": f64},
        False,
        None,
        lambda: _input(4, dtype=bf16),
    ),
    (
        "bfloat16_input_float16_stats",
        4,
        {},
        True,
        lambda m: (
            _setattr("running_mean", lambda m: m.running_mean.half())(m),
            _setattr("running_var", lambda m: m.running_var.half())(m),
        ),
        lambda: _input(4, dtype=bf16),
    ),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_errors(case):
    _, ndim, kwargs, training, edit, make_x = case
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", f32)
    torch.manual_seed(0)
    ref, ours = make_pair(ndim, C, Precision(dtype, dtype), **kwargs)
    for module in (ref, ours):
        module.train(training)
        if edit is not None:
            edit(module)
    x = make_x()
    expected = raised(ref, x.clone())
    assert expected is not None, "not an error case for torch"
    state = list(ours.parameters()) + list(ours.buffers())
    before = snapshot(state)
    assert raised(ours, x.clone()) == torch_words(expected)
    assert_unchanged(before, list(ours.parameters()) + list(ours.buffers()), "state")


@pytest.mark.parametrize("ndim", [2, 4, 5])
def test_num_batches_tracked_unchanged_on_error(ndim):
    """torch advances num_batches_tracked before it validates; ours do not."""
    ref, ours = make_pair(ndim, C)
    x = _input(ndim, channels=C + 1)
    for module in (ref, ours):
        with pytest.raises(RuntimeError):
            module(x)
    assert ref.num_batches_tracked.item() == 4
    assert ours.num_batches_tracked.item() == 3


# ---------------------------------------------------------------------------------------
# Functional form


def _stats(n=C, dtype=f32):
    return torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)


X = torch.randn(4, C, 5)
W, B = torch.rand(C) + 0.5, torch.rand(C)
TRAIN = {"training": True}

# (id, args of batch_norm after input, kwargs, input)
FUNCTIONAL_CASES = [
    ("0d_train", _stats(), TRAIN, torch.tensor(1.0)),
    ("1d_size1_train", _stats(), TRAIN, torch.randn(1)),
    ("one_value_per_channel", _stats(), TRAIN, torch.randn(1, C)),
    ("one_value_per_channel_4d", _stats(), TRAIN, torch.randn(1, C, 1, 1)),
    ("one_value_per_channel_eps0", _stats(), {"training": True, "eps": 0.0}, torch.randn(1, C)),
    ("eps_zero_train", _stats(), {"training": True, "eps": 0.0}, X),
    ("eps_negative_train", _stats(), {"training": True, "eps": -1.0}, X),
    ("eps_minus_inf_train", _stats(), {"training": True, "eps": float("-inf")}, X),
    ("eps_negative_eval", _stats(), {"eps": -1.0}, X),
    ("eps_zero_and_wrong_stats", _stats(C + 1), {"training": True, "eps": 0.0}, X),
    ("eval_without_stats", (None, None), {}, X),
    ("eval_without_mean", (None, torch.ones(C)), {}, X),
    ("eval_without_var", (torch.zeros(C), None), {}, X),
    ("eval_without_mean_wrong_var", (None, torch.ones(C + 1)), {}, X),
    ("train_without_mean", (None, torch.ones(C)), TRAIN, X),
    ("train_without_var", (torch.zeros(C), None), TRAIN, X),
    ("train_without_mean_wrong_var", (None, torch.ones(C + 1)), TRAIN, X),
    ("running_mean_size", (torch.zeros(C + 1), torch.ones(C)), TRAIN, X),
    ("running_var_size", (torch.zeros(C), torch.ones(C - 1)), TRAIN, X),
    ("running_mean_size_eval", (torch.zeros(C + 1), torch.ones(C)), {}, X),
    ("both_sizes_eval", (torch.zeros(C + 1), torch.ones(C + 2)), {}, X),
    ("weight_size", _stats() + (torch.ones(C + 1),), TRAIN, X),
    ("bias_size", _stats() + (W, torch.ones(C + 1)), TRAIN, X),
    ("weight_size_no_stats", (None, None, torch.ones(2)), TRAIN, X),
    ("stats_and_weight_size", (torch.zeros(C + 1), torch.ones(C), torch.ones(C + 2)), TRAIN, X),
    ("running_mean_2d", (torch.zeros(C, 1), torch.ones(C)), TRAIN, X),
    ("running_var_2d_eval", (torch.zeros(C), torch.ones(1, C)), {}, X),
    ("running_mean_0d", (torch.tensor(0.0), torch.ones(1)), TRAIN, torch.randn(4, 1)),
    ("running_mean_3d", (torch.zeros(1, C, 1), torch.ones(C)), TRAIN, X),
    ("running_mean_2d_float64", (torch.zeros(C, 1, dtype=f64), torch.ones(C)), TRAIN, X),
    ("running_mean_2d_integer_input", (torch.zeros(C, 1), torch.ones(C)), TRAIN, X.long()),
    (
        "running_mean_2d_wrong_weight",
        (torch.zeros(C, 1), torch.ones(C), torch.ones(C + 1)),
        TRAIN,
        X,
    ),
    ("long_input", _stats(), TRAIN, X.long()),
    ("long_input_eval", _stats(), {}, X.long()),
    ("long_input_wrong_stats", _stats(C + 1), TRAIN, X.long()),
    ("long_input_float64_stats", _stats(dtype=f64), TRAIN, X.long()),
    ("int8_input", _stats(), TRAIN, X.to(torch.int8)),
    ("bool_input", _stats(), TRAIN, X > 0),
    ("complex_input", _stats(), TRAIN, X.to(torch.complex64)),
    ("float8_input", _stats(), TRAIN, X.to(torch.float8_e4m3fn)),
    ("stats_require_grad_train", (torch.zeros(C).requires_grad_(), torch.ones(C)), TRAIN, X),
    ("stats_require_grad_eval", (torch.zeros(C), torch.ones(C).requires_grad_()), {}, X),
    # Arguments of a type torch's argument parser (or the Python code before it) rejects.
    ("input_list_train", _stats(), TRAIN, [[1.0, 2.0, 3.0]] * 4),
    ("input_list_eval", _stats(), {}, [[1.0, 2.0, 3.0]] * 4),
    ("input_numpy_train", _stats(), TRAIN, np.float64(1.0)),
    ("input_none_eval", _stats(), {}, None),
    ("running_mean_list", ([0.0] * C, torch.ones(C)), TRAIN, X),
    ("running_var_number_eval", (torch.zeros(C), 1.0), {}, X),
    ("weight_string", _stats() + ("weight",), TRAIN, X),
    ("bias_numpy", _stats() + (W, np.zeros(C, dtype=np.float32)), TRAIN, X),
    ("training_none", _stats(), {"training": None}, X),
    ("training_int", _stats(), {"training": 1}, X),
    ("training_numpy_bool", _stats(), {"training": np.bool_(True)}, X),
    ("training_tensor", _stats(), {"training": torch.tensor(True)}, X),
    ("training_tensor_of_3", _stats(), {"training": torch.ones(3)}, X),
    ("momentum_none", _stats(), {"training": True, "momentum": None}, X),
    ("momentum_string", _stats(), {"training": True, "momentum": "0.1"}, X),
    ("momentum_1d_tensor", _stats(), {"training": True, "momentum": torch.tensor([0.1])}, X),
    (
        "momentum_tensor_requiring_grad",
        _stats(),
        {"training": True, "momentum": torch.tensor(0.1, requires_grad=True)},
        X,
    ),
    ("momentum_fraction", _stats(), {"training": True, "momentum": Fraction(1, 10)}, X),
    ("momentum_numpy_array", _stats(), {"training": True, "momentum": np.array(0.1)}, X),
    ("eps_string", _stats(), {"training": True, "eps": "1e-5"}, X),
    ("eps_none_eval", _stats(), {"eps": None}, X),
    ("eps_tensor_of_2", _stats(), {"training": True, "eps": torch.ones(2)}, X),
    ("eps_decimal_eval", _stats(), {"eps": Decimal("1e-5")}, X),
    # Numbers other than floats, printed as given.
    ("eps_int_zero_train", _stats(), {"training": True, "eps": 0}, X),
    ("eps_int_negative_eval", _stats(), {"eps": -1}, X),
    ("eps_false_train", _stats(), {"training": True, "eps": False}, X),
    ("eps_tensor_zero_train", _stats(), {"training": True, "eps": torch.tensor(0)}, X),
    ("eps_numpy_negative_eval", _stats(), {"eps": np.float32(-0.5)}, X),
    ("one_value_per_channel_int_eps", _stats(), {"training": 1, "eps": 0}, torch.randn(1, C)),
    ("eps_int_zero_and_weight_string", _stats() + ("weight",), {"training": True, "eps": 0}, X),
    ("weight_string_and_momentum_none", _stats() + ("weight",), {"momentum": None}, X),
    # The meta device outranks the CPU in dispatch: these reach the fake kernels.
    ("weight_on_meta", _stats() + (torch.ones(C, device="meta"),), TRAIN, X),
    ("bias_on_meta_eval", _stats() + (W, torch.ones(C, device="meta")), {}, X),
    ("stats_on_meta", tuple(t.to("meta") for t in _stats()), TRAIN, X),
    ("stats_on_meta_eval", tuple(t.to("meta") for t in _stats()), {}, X),
    ("input_on_meta", _stats(), TRAIN, X.to("meta")),
]


def _clone(t):
    return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


# Under a mode with __torch_function__ (torch.device(...) is one) calls take the op
# rather than the direct binding, with the same checks.
CONTEXTS = {"plain": contextlib.nullcontext, "device_mode": lambda: torch.device("cpu")}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_errors(case, context):
    _, args, kwargs, x = case
    with CONTEXTS[context]():
        expected = raised(F.batch_norm, _clone(x), *map(_clone, args), **kwargs)
        assert expected is not None, "not an error case for torch"
        ours_args = [_clone(a) for a in args]
        before = snapshot(ours_args)
        ours = raised(tbn.functional.batch_norm, _clone(x), *ours_args, **kwargs)
    assert ours == torch_words(expected)
    assert_unchanged(before, ours_args, "arguments")


# Numbers torch's argument parser takes for momentum and eps besides Python floats.
ACCEPTED_NUMBERS = [
    ("int", 1),
    ("bool", True),
    ("float_subclass", np.float64(0.25)),
    ("numpy_float32", np.float32(0.25)),
    ("numpy_int", np.int64(1)),
    ("numpy_bool", np.bool_(True)),
    ("tensor_0d", torch.tensor(0.25)),
    ("tensor_0d_int", torch.tensor(1)),
]


@pytest.mark.parametrize("name", ["momentum", "eps"])
@pytest.mark.parametrize("number", ACCEPTED_NUMBERS, ids=[n[0] for n in ACCEPTED_NUMBERS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_takes_numbers_torch_takes(name, number, training):
    """torch takes these; ours too, as the float they convert to."""
    value = number[1]
    assert raised(F.batch_norm, X, *_stats(), training=training, **{name: value}) is None
    stats, expected_stats = _stats(), _stats()
    expected = tbn.functional.batch_norm(
        X, *expected_stats, training=training, **{name: float(value)}
    )
    actual = tbn.functional.batch_norm(X, *stats, training=training, **{name: value})
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for a, e in zip(stats, expected_stats):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("input_tangent", [True, False], ids=["input_tangent", "no_input_tangent"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stats_with_tangents(training, input_tangent):
    """Running statistics that carry a forward-mode tangent (torch.autograd.forward_ad):
    refused in evaluation when the output gets a tangent, else ignored."""
    import torch.autograd.forward_ad as fwAD

    for impl in (F.batch_norm, tbn.functional.batch_norm):
        mean, var = _stats()
        with fwAD.dual_level():
            x = fwAD.make_dual(X, torch.ones_like(X)) if input_tangent else X
            dual_mean = fwAD.make_dual(mean, torch.ones(C))
            result = raised(impl, x, dual_mean, var, training=training)
        if impl is F.batch_norm:
            expected = result
        else:
            assert result == expected
            if expected is not None:
                assert_unchanged(_stats(), [mean, var], "running statistics")


_NAMES = {f32: "f32", f64: "f64", bf16: "bf16", f16: "f16", i64: "i64", None: "none"}
_PARAM_DTYPES = [None, f32, f64, bf16, f16, i64]


@pytest.mark.parametrize("dtype", [f32, f64, bf16, f16], ids=_NAMES.get)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtype_rules(dtype, training):
    """Every combination of input dtype with weight, bias and running statistics dtypes
    (torch's "mixed type" rules, and which argument its message names first): the same
    ones fail, with the same messages, and no argument changes when they do."""
    x = torch.randn(4, C, 2).to(dtype)
    for w, b, mean, var in itertools.product(_PARAM_DTYPES, repeat=4):
        if (mean is None) != (var is None) or (mean is None and not training):
            continue  # None statistics: their own cases above
        dtypes = (mean, var, w, b)
        args = [None if d is None else (torch.rand(C) + 0.5).to(d) for d in dtypes]
        expected = raised(F.batch_norm, x, *map(_clone, args), training=training)
        ours_args = [_clone(a) for a in args]
        before = snapshot(ours_args)
        actual = raised(tbn.functional.batch_norm, x, *ours_args, training=training)
        names = "/".join(_NAMES[d] for d in dtypes)
        assert actual == expected, f"input {_NAMES[dtype]}, mean/var/weight/bias {names}"
        if expected is not None:
            assert_unchanged(before, ours_args, names)


def test_torch_module_error_inputs():
    """The error inputs torch's own module tests use (common_modules), in training mode as
    there."""
    from torch.testing._internal.common_modules import module_db

    for info in module_db:
        if info.module_cls not in OUR_CLASSES:
            continue
        for error_input in info.module_error_inputs_func(
            info, device="cpu", dtype=f32, requires_grad=False, training=True
        ):
            sample = error_input.module_error_input
            ctor, fwd = sample.constructor_input, sample.forward_input
            ref = info.module_cls(*ctor.args, **ctor.kwargs)
            ours = OUR_CLASSES[info.module_cls](*ctor.args, **ctor.kwargs)
            expected = raised(ref, *fwd.args, **fwd.kwargs)
            assert expected is not None and expected[0] is error_input.error_type
            before = snapshot(list(ours.buffers()))
            assert raised(ours, *fwd.args, **fwd.kwargs) == expected
            assert_unchanged(before, list(ours.buffers()), "buffers")


# ---------------------------------------------------------------------------------------
# The ops called directly: undersized or malformed statistics raise, never crash.


def _forward_args(n_stats=C, **overrides):
    args = {
        "input": torch.randn(4, C, 3),
        "weight": torch.ones(C),
        "bias": torch.zeros(C),
        "running_mean": torch.zeros(n_stats),
        "running_var": torch.ones(n_stats),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
    }
    args.update(overrides)
    return args


FORWARD_OP_CASES = [
    (
        "undersized_running_mean",
        {"running_mean": torch.zeros(1)},
        "running_mean should contain 3 elements not 1",
    ),
    (
        "empty_running_var_eval",
        {"running_var": torch.ones(0), "training": False},
        "running_var should contain 3 elements not 0",
    ),
    ("undersized_weight", {"weight": torch.ones(2)}, "weight should contain 3 elements not 2"),
    (
        "empty_bias_eval",
        {"bias": torch.zeros(0), "training": False},
        "bias should contain 3 elements not 0",
    ),
    ("weight_2d", {"weight": torch.ones(1, C)}, "weight should be a 1D tensor, got 2D"),
    (
        "oversized_stats_with_empty_input",
        {"input": torch.randn(0, C, 3), "running_mean": torch.zeros(C + 5)},
        "running_mean should contain 3 elements not 8",
    ),
    (
        "eval_without_stats",
        {"running_mean": None, "running_var": None, "training": False},
        "running_mean must be defined in evaluation mode",
    ),
    ("input_1d", {"input": torch.randn(5)}, "Dimension out of range"),
]


@pytest.mark.parametrize("case", FORWARD_OP_CASES, ids=[c[0] for c in FORWARD_OP_CASES])
def test_forward_op_rejects(case):
    _, overrides, message = case
    args = _forward_args(**overrides)
    before = snapshot([args["running_mean"], args["running_var"]])
    with pytest.raises((RuntimeError, IndexError), match=message):
        ops.batch_norm_forward(**args)
    assert_unchanged(before, [args["running_mean"], args["running_var"]], "running stats")


def _on_meta(args):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("case", FORWARD_OP_CASES, ids=[c[0] for c in FORWARD_OP_CASES])
def test_forward_op_rejects_on_meta(case):
    """The fake kernel runs the op's validation routine: on the meta device, and so while
    torch.compile and torch.export trace a call, it fails as the kernels fail it."""
    _, overrides, message = case
    with pytest.raises((RuntimeError, IndexError), match=message):
        ops.batch_norm_forward(**_on_meta(_forward_args(**overrides)))


def _backward_args(**overrides):
    x = torch.randn(4, C, 3)
    args = {
        "grad_out": torch.randn_like(x),
        "input": x,
        "weight": torch.ones(C),
        "running_mean": None,
        "running_var": None,
        "save_mean": x.mean((0, 2)),
        "save_invstd": torch.ones(C),
        "training": True,
        "eps": 1e-5,
        "output_mask": [True, True, True],
    }
    args.update(overrides)
    return args


BACKWARD_OP_CASES = [
    ("undersized_save_mean", {"save_mean": torch.zeros(1)}, "save_mean should contain 3"),
    ("empty_save_invstd", {"save_invstd": torch.ones(0)}, "save_invstd should contain 3"),
    ("missing_save_invstd", {"save_invstd": None}, "must be defined in training mode"),
    ("undersized_weight", {"weight": torch.ones(2)}, "weight should contain 3"),
    (
        "undersized_running_var_eval",
        {"training": False, "running_mean": torch.zeros(C), "running_var": torch.ones(2)},
        "running_var should contain 3",
    ),
    (
        "missing_running_mean_eval",
        {"training": False, "running_var": torch.ones(C)},
        "must be defined in evaluation mode",
    ),
    ("grad_out_shape", {"grad_out": torch.randn(4, C, 2)}, "does not match input"),
    ("grad_out_dtype", {"grad_out": torch.randn(4, C, 3, dtype=f64)}, "grad_out has dtype"),
    ("save_mean_dtype", {"save_mean": torch.zeros(C, dtype=f64)}, "must have dtype"),
    ("save_mean_2d", {"save_mean": torch.zeros(C, 1)}, "save_mean should be a 1D tensor"),
    ("weight_dtype", {"weight": torch.ones(C, dtype=f64)}, "expect parameter to have scalar type"),
    ("negative_eps", {"eps": -1.0}, "eps must be non-negative"),
    (
        "integer_input",
        {"input": torch.ones(4, C, 3, dtype=i64), "grad_out": torch.ones(4, C, 3, dtype=i64)},
        "not implemented for 'Long'",
    ),
    # Reaching the fake kernel, as torch's meta kernels word it.
    ("weight_on_meta", {"weight": torch.ones(C, device="meta")}, "on device meta is not on"),
    ("save_invstd_on_meta", {"save_invstd": torch.ones(C, device="meta")}, "on device meta"),
]


@pytest.mark.parametrize("case", BACKWARD_OP_CASES, ids=[c[0] for c in BACKWARD_OP_CASES])
def test_backward_op_rejects(case):
    _, overrides, message = case
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message):
        ops.batch_norm_backward(**_backward_args(**overrides))


_BACKWARD_OFF_META = [c for c in BACKWARD_OP_CASES if not c[0].endswith("_on_meta")]


@pytest.mark.parametrize("case", _BACKWARD_OFF_META, ids=[c[0] for c in _BACKWARD_OFF_META])
def test_backward_op_rejects_on_meta(case):
    """As test_forward_op_rejects_on_meta."""
    _, overrides, message = case
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message):
        ops.batch_norm_backward(**_on_meta(_backward_args(**overrides)))


# ---------------------------------------------------------------------------------------
# Deliberate differences from torch


@pytest.mark.parametrize(
    "x,training",
    [
        (torch.tensor(1.0), False),
        (torch.randn(3), True),
        (torch.randn(3), False),
    ],
    ids=["0d_eval", "1d_train", "1d_eval"],
)
def test_input_below_2d(x, training):
    """torch reads input.size(1) without a bounds check here (its message reports whatever
    lies past the sizes); ours raise the IndexError at::Tensor::size(1) raises."""
    with pytest.raises(IndexError, match="Dimension"):
        tbn.functional.batch_norm(x, *_stats(), training=training)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (_stats(C + 1), TRAIN, "running_mean should contain 3 elements not 4"),
        ((None, None), {}, "running_mean must be defined in evaluation mode"),
        (_stats(dtype=f64), TRAIN, "expect parameter to have scalar type of Float"),
    ],
)
def test_empty_input_still_validated(args, kwargs, message):
    """torch returns early for an empty input and accepts any statistics with it; ours
    validate them as for any other batch, so a model that is wrong fails on its first
    batch whatever its size."""
    x = torch.randn(0, C, 2)
    assert F.batch_norm(x, *map(_clone, args), **kwargs).shape == x.shape
    with pytest.raises((RuntimeError, ValueError), match=message):
        tbn.functional.batch_norm(x, *args, **kwargs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_channels(training, layout):
    """An input without channels gives an empty output and empty gradients, with or without
    weight and bias. torch agrees without them; with them, its path for empty inputs scales
    by weight[0] and raises IndexError."""
    x = torch.randn(4, 0, 3, 3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(0), torch.zeros(0)
    with pytest.raises(IndexError, match="index 0 out of range"):
        F.batch_norm(x, *_stats(0), w, b, training=training)
    expected = F.batch_norm(x, *_stats(0), training=training)
    for params in [(), (w, b)]:
        xi = _clone(x).requires_grad_()
        pi = [_clone(p).requires_grad_() for p in params]
        y = tbn.functional.batch_norm(xi, *_stats(0), *pi, training=training)
        assert y.shape == expected.shape
        y.sum().backward()
        assert xi.grad.shape == x.shape
        assert all(p.grad.shape == (0,) for p in pi)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_module_made_in_inference_mode_trained_outside(grad):
    """A module made under torch.inference_mode has an inference tensor for its count,
    which refuses an in-place update outside inference mode. torch raises on it having
    counted the batch, before its op runs; ours raise the same error before the op runs
    too, and change no buffer."""
    with torch.inference_mode():
        ref, ours = make_pair(4, C)
    x = torch.randn(4, C, 5, 5, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        expected = raised(ref, x)
        before = snapshot(list(ours.buffers()))
        assert raised(ours, x) == expected
    assert expected[1].startswith("Inplace update to inference tensor outside InferenceMode")
    assert_unchanged(before, list(ours.buffers()), "buffers")


def test_classes_cover_torch():
    assert set(OUR_CLASSES) == set(TORCH_CLASSES.values())
