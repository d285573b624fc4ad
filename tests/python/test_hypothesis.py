"""Randomised parity with torch.nn.BatchNorm: shapes, layouts (of input and grad_out),
dtypes, modes and options drawn by hypothesis, each case run for two steps and compared as
in test_parity (see conftest.compare_step)."""

import pytest
import torch
import torch_batchnorm as tbn
from conftest import (
    DEVICES,
    LAYOUTS,
    PRECISIONS,
    assert_close,
    layout_applies,
    make_input,
    make_pair,
    run_steps,
    single_threaded,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def shapes(draw):
    ndim = draw(st.integers(2, 5))
    spatial = draw(st.lists(st.integers(1, 5), min_size=ndim - 2, max_size=ndim - 2))
    return (draw(st.integers(1, 6)), draw(st.integers(1, 6)), *spatial)


def _layouts(ndim):
    return st.sampled_from([name for name in LAYOUTS if layout_applies(name, ndim)])


@st.composite
def cases(draw):
    shape = draw(shapes())
    values_per_channel = shape[0] * int(torch.tensor(shape[2:]).prod()) if shape[2:] else shape[0]
    # Batch statistics of one value per channel are an error (test_errors): in training,
    # and in evaluation without running statistics.
    batch_stats_valid = values_per_channel > 1
    training = draw(st.booleans()) if batch_stats_valid else False
    track = draw(st.booleans()) if batch_stats_valid else True
    return {
        "shape": shape,
        "layout": draw(_layouts(len(shape))),
        "grad_layout": draw(_layouts(len(shape))),
        "precision": draw(st.sampled_from(PRECISIONS)),
        "training": training,
        "options": {
            "momentum": draw(st.sampled_from([0.1, None, 0.0, 0.8, 0.5])),
            "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
            "affine": draw(st.booleans()),
            "track_running_stats": track,
        },
        # Of the modules' initial weights and of the batches: a failing case replays from
        # hypothesis's report alone.
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=cases())
def test_modules(device, case):
    shape, precision = case["shape"], case["precision"]
    torch.manual_seed(case["seed"])
    ref, ours = make_pair(len(shape), shape[1], precision, device, **case["options"])
    ref.train(case["training"])
    ours.train(case["training"])
    run_steps(
        ref,
        ours,
        shape,
        layout=case["layout"],
        grad_layout=case["grad_layout"],
        precision=precision,
        device=device,
        steps=2,
        seed=case["seed"],
    )


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(
    shape=shapes().filter(lambda s: s[0] * int(torch.tensor(s[2:]).prod()) > 1),
    momentum=st.floats(-2.0, 2.0),
    eps=st.floats(1e-6, 1.0),
    layout=st.sampled_from(list(LAYOUTS)),
)
def test_functional_training_float64(device, shape, momentum, eps, layout):
    """Any momentum and eps, through the functional form, in float64 (exact comparison
    with torch's float64 result up to summation order)."""
    if not layout_applies(layout, len(shape)):
        layout = "contiguous"
    leaf, view = make_input(shape, layout, torch.float64, device)
    C = shape[1]
    stats = [
        torch.randn(C, dtype=torch.float64, device=device),
        torch.rand(C, dtype=torch.float64, device=device) + 0.5,
    ]
    ours_stats = [t.clone() for t in stats]
    with single_threaded():
        expected = torch.nn.functional.batch_norm(
            view(leaf), *stats, training=True, momentum=momentum, eps=eps
        )
    actual = tbn.functional.batch_norm(
        view(leaf), *ours_stats, training=True, momentum=momentum, eps=eps
    )
    assert_close(actual, expected, "output")
    assert_close(ours_stats[0], stats[0], "running_mean")
    assert_close(ours_stats[1], stats[1], "running_var")
