"""Numerical stability: float32 inputs with mean 1e4 and standard deviation 1, where
E[x^2] - E[x]^2 loses every digit of the variance and float32 running sums lose digits of
the mean. The op's statistics and outputs are compared with a float64 computation on the
same float32 values, in every layout and on every device. And the CPU reductions are split
into a fixed set of pieces merged in a fixed order, so results are bitwise the same for any
thread count.

(Measured with torch 2.13 on these inputs: torch's own float32 outputs are off by up to
770 ulp(1e4) for [N, C], 590 for channels_last and 77 for channels_last_3d, where it
sums in float32 over the batch; ours stay within half an ulp.)"""

import math

import pytest
import torch
import torch_batchnorm as tbn
from conftest import assert_close, make_grad_out, make_input, single_threaded

ops = torch.ops.torch_batchnorm

MEAN = 1e4
# Spacing of float32 values at MEAN: the rounding unit of the input itself.
ULP = float(torch.finfo(torch.float32).eps) * 2 ** math.floor(math.log2(MEAN))

CASES = [
    ("2d", (20000, 4), "contiguous"),
    ("3d", (32, 4, 500), "contiguous"),
    ("nchw", (16, 4, 32, 32), "contiguous"),
    ("channels_last", (16, 4, 32, 32), "channels_last"),
    ("5d", (4, 4, 8, 16, 16), "contiguous"),
    ("channels_last_3d", (4, 4, 8, 16, 16), "channels_last"),
    ("strided", (16, 4, 16, 32), "sliced"),
]


def _large_mean_input(shape, layout, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    leaf, view = make_input(
        shape, layout, torch.float32, device, mean=MEAN, std=1.0, generator=generator
    )
    return view(leaf)


def _reference(x, running_mean, running_var, weight, bias, momentum, eps):
    """BatchNorm in float64 on the float32 values."""
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    count = x.numel() // x.shape[1]
    mean = x64.mean(dims)
    var = x64.var(dims, unbiased=False)
    invstd = 1 / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = (x64 - mean.view(shape)) * (invstd * weight.double()).view(shape) + bias.double().view(
        shape
    )
    new_mean = momentum * mean + (1 - momentum) * running_mean.double()
    new_var = momentum * var * count / (count - 1) + (1 - momentum) * running_var.double()
    return out, mean, invstd, new_mean, new_var


@pytest.mark.parametrize("name,shape,layout", CASES, ids=[c[0] for c in CASES])
def test_large_mean(name, shape, layout, device):
    x = _large_mean_input(shape, layout, device)
    C = shape[1]
    weight, bias = torch.rand(C) + 0.5, torch.rand(C) - 0.5
    running_mean, running_var = torch.full((C,), MEAN - 1), torch.rand(C) + 0.5
    momentum, eps = 0.1, 1e-5
    out_ref, mean_ref, invstd_ref, rm_ref, rv_ref = _reference(
        x.cpu(), running_mean, running_var, weight, bias, momentum, eps
    )

    params = [t.to(device) for t in (weight, bias, running_mean, running_var)]
    out, save_mean, save_invstd = (
        t.cpu() for t in ops.batch_norm_forward(x, *params, True, momentum, eps)
    )
    running_mean, running_var = params[2].cpu(), params[3].cpu()

    # The mean is the float32 value nearest the exact one (or its neighbour).
    assert (save_mean.double() - mean_ref).abs().max() <= ULP
    # One more rounding in the update.
    assert (running_mean.double() - rm_ref).abs().max() <= 2 * ULP
    # Variances near 1: float32 relative precision, not that of the mean.
    torch.testing.assert_close(save_invstd.double(), invstd_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(running_var.double(), rv_ref, rtol=1e-5, atol=0)
    # Outputs within two float32 units of the mean of where they should be (weight and
    # std are about 1, so output units are input units).
    error = (out.double() - out_ref).abs().max().item()
    assert error <= 2 * ULP, f"max error {error:.3g} > 2 ulp(1e4) = {2 * ULP:.3g}"


def test_module_large_mean_matches_float64_module():
    """The same through the module, channels-last, against torch's module in float64."""
    x = _large_mean_input((16, 4, 32, 32), "channels_last")
    ours = tbn.BatchNorm2d(4)
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    out, out_ref = ours(x), ref(x.double())
    assert (out.double() - out_ref).abs().max() <= 2 * ULP
    assert (ours.running_mean.double() - ref.running_mean).abs().max() <= 2 * ULP


# ---------------------------------------------------------------------------------------
# Thread-count independence

THREAD_CASES = [
    ("2d", (40000, 3), "contiguous", torch.float32),
    ("nchw", (16, 5, 40, 40), "contiguous", torch.float32),
    # 7x7 runs, not whole vectors: the elementwise passes walk them flat, vectors crossing
    # runs, and the threads split them at run boundaries.
    ("nchw_short_runs", (32, 64, 7, 7), "contiguous", torch.float32),
    ("bfloat16_nchw_short_runs", (32, 64, 7, 7), "contiguous", torch.bfloat16),
    # Blocks of channels whose size follows the thread count (13 channels, 10 with 5
    # threads): each channel's per-channel finish falls in a vector or the tail by it.
    ("nchw_channel_blocks", (8, 200, 7, 7), "contiguous", torch.float32),
    ("channels_last", (16, 5, 40, 40), "channels_last", torch.float32),
    ("channels_last_3d", (4, 6, 10, 20, 20), "channels_last", torch.float32),
    ("strided", (16, 5, 40, 20), "sliced", torch.float32),
    ("float64", (16, 5, 40, 40), "contiguous", torch.float64),
    ("bfloat16", (16, 5, 40, 40), "channels_last", torch.bfloat16),
]


def _run(x, grad_out, training):
    C = x.shape[1]
    weight = torch.linspace(
        0.5, 1.5, C, dtype=torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    )
    bias = torch.linspace(-0.5, 0.5, C, dtype=weight.dtype)
    stats = [torch.zeros(C, dtype=weight.dtype), torch.ones(C, dtype=weight.dtype)]
    out, save_mean, save_invstd = ops.batch_norm_forward(
        x, weight, bias, *stats, training, 0.1, 1e-5
    )
    grads = ops.batch_norm_backward(
        grad_out, x, weight, *stats, save_mean, save_invstd, training, 1e-5, [True, True, True]
    )
    return [out, save_mean, save_invstd, *stats, *grads]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,shape,layout,dtype", THREAD_CASES, ids=[c[0] for c in THREAD_CASES])
def test_thread_count_independent(name, shape, layout, dtype, training):
    generator = torch.Generator().manual_seed(0)
    leaf, view = make_input(shape, layout, dtype, "cpu", mean=3.0, generator=generator)
    g_leaf, g_view = make_input(shape, layout, dtype, "cpu", mean=0.0, generator=generator)
    x, grad_out = view(leaf), g_view(g_leaf)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(_run(x, grad_out, training))
    finally:
        torch.set_num_threads(threads)
    names = [
        "out",
        "save_mean",
        "save_invstd",
        "running_mean",
        "running_var",
        "grad_input",
        "grad_weight",
        "grad_bias",
    ]
    for other in results[1:]:
        for label, a, b in zip(names, results[0], other):
            assert torch.equal(a, b), f"{label} depends on the thread count"


# Every CPU reduction path: NCHW runs, channels-last rows narrower than a vector (3, 7)
# and rows whose last vector overlaps the one before it (24 and 33 channels).
NONFINITE_CASES = [
    ("nchw", (6, 24, 5, 7), "contiguous"),
    ("channels_last_narrow", (6, 7, 5, 7), "channels_last"),
    ("channels_last_overlap", (6, 24, 5, 7), "channels_last"),
    ("2d_narrow", (300, 3), "contiguous"),
    ("2d_overlap", (300, 33), "contiguous"),
    # Several cached groups of a channel (NCHW) and blocks of rows, whose merges meet the
    # infinity of the first.
    ("nchw_groups", (40, 3, 30, 30), "contiguous"),
    ("2d_blocks", (2000, 33), "contiguous"),
]


@pytest.mark.parametrize("spoiled", ["input", "grad_output"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,shape,layout", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_nonfinite_stays_in_its_channel(name, shape, layout, training, spoiled, device):
    """A NaN or an infinity in the input or in the output's gradient spoils exactly the
    outputs, gradients and running statistics that torch's spoils: every path keeps a
    channel's values in that channel's sums, the lanes of masked, overlapping and flat
    narrow-row vectors included, and the finite results match torch's. A channel with an
    infinite input gets an infinite running mean, as torch's sum-based mean gives it, and a
    NaN running variance; one with an infinite gradient, torch's infinite weight gradient
    (the sums are re-centred on the batch mean only where that keeps them finite)."""
    generator = torch.Generator().manual_seed(0)
    leaf, view = make_input(shape, layout, torch.float32, "cpu", generator=generator)
    x = view(leaf).detach()
    grad_out = torch.randn(shape, generator=generator)
    C = shape[1]
    spoilt = x if spoiled == "input" else grad_out
    # Channels inside a masked range (C - 15 with 16 float lanes), in the middle, and the
    # last two.
    for c in {max(C - 15, 0), C // 2, C - 2}:
        spoilt[(c % 2,) + (c,) + (0,) * (x.dim() - 2)] = float("nan")
    spoilt[(1, C - 1) + (0,) * (x.dim() - 2)] = float("inf")
    stats = [torch.randn(C, generator=generator), torch.rand(C, generator=generator) + 0.5]

    def run(fn, device):
        xi = x.to(device).requires_grad_()
        weight = torch.linspace(0.5, 1.5, C, device=device).requires_grad_()
        bias = torch.linspace(-1.0, 1.0, C, device=device).requires_grad_()
        # Copies: .to() of a CPU tensor to the CPU is the tensor itself, which torch's run
        # would update in place before ours starts from it.
        running = [s.to(device, copy=True) for s in stats]
        out = fn(xi, *running, weight, bias, training=training)
        grads = torch.autograd.grad(out, (xi, weight, bias), grad_out.to(device))
        return [t.cpu() for t in (out, *grads, *running)]

    with single_threaded():
        expected = run(torch.nn.functional.batch_norm, "cpu")
    actual = run(tbn.functional.batch_norm, device)
    labels = ["output", "input grad", "weight grad", "bias grad", "running mean", "running var"]
    for label, a, e in zip(labels, actual, expected):
        finite = e.isfinite()
        assert torch.equal(a.isfinite(), finite), f"{label}: non-finite elsewhere than torch's"
        assert torch.equal(a.isnan(), e.isnan()), f"{label}: NaN where torch's is infinite"
        assert_close(a[finite], e[finite], label)


# ---------------------------------------------------------------------------------------
# float16 sums past float16's range

# A million values per channel, as in torch's float16 overflow test (4 x 80 x 500 x 500),
# with fewer channels.
HALF_SHAPE = (4, 8, 500, 500)
# Each float16 result is the exact value rounded once (half a unit: 2**-11 relative), after
# float32 arithmetic (1e-5 relative, and 1e-6 absolute where terms of about 1 cancel).
HALF_RTOL, HALF_ATOL = 2**-11 + 1e-5, 1e-6


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_sums_past_its_range(layout, device):
    """float16 input, parameters and running statistics whose per-channel sums leave
    float16's range (65504) on the way: sum(x) is about 1e6, and sum(dy) climbs to 5e5 over
    the first half of the batch and back to about 0 over the second. The statistics,
    outputs and gradients match a float64 computation on the same float16 values to one
    rounding, after float32 sums taken in blocks. (torch 2.13's own CPU kernel misses the
    saved mean here by up to 3e-4 relative: its float32 sums over a million values lose
    digits.)"""
    generator = torch.Generator().manual_seed(0)
    leaf, view = make_input(
        HALF_SHAPE, layout, torch.float16, device, mean=1.0, std=1.0, generator=generator
    )
    x = view(leaf)
    grad_out = make_grad_out(HALF_SHAPE, layout, torch.float16, device, generator)
    half = HALF_SHAPE[0] // 2
    with torch.no_grad():
        grad_out[:half] += 1
        grad_out[half:] -= 1
    C = HALF_SHAPE[1]
    weight = torch.linspace(0.5, 1.5, C).half()
    bias = torch.linspace(-0.5, 0.5, C).half()
    running_mean, running_var = torch.zeros(C).half(), torch.ones(C).half()
    momentum, eps = 0.1, 1e-5
    out_ref, mean_ref, invstd_ref, rm_ref, rv_ref = _reference(
        x.cpu(), running_mean, running_var, weight, bias, momentum, eps
    )

    params = [t.to(device) for t in (weight, bias, running_mean, running_var)]
    out, save_mean, save_invstd = ops.batch_norm_forward(x, *params, True, momentum, eps)
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        grad_out, x, params[0], *params[2:], save_mean, save_invstd, True, eps, [True] * 3
    )

    # The saved statistics are float32: float32 accuracy, for the mean relative to the
    # values' size (about 1), as some channels' means are near 0.
    torch.testing.assert_close(save_mean.cpu().double(), mean_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(save_invstd.cpu().double(), invstd_ref, rtol=1e-5, atol=0)
    dims = [0, 2, 3]
    x64, dy64 = x.cpu().double(), grad_out.cpu().double()
    shape = (1, -1, 1, 1)
    xhat = (x64 - mean_ref.view(shape)) * invstd_ref.view(shape)
    sum_dy, sum_dy_xhat = dy64.sum(dims), (dy64 * xhat).sum(dims)
    count = x.numel() // C
    grad_input_ref = (weight.double() * invstd_ref).view(shape) * (
        dy64 - (sum_dy / count).view(shape) - xhat * (sum_dy_xhat / count).view(shape)
    )
    # The weight and bias gradients are sums whose terms cancel. Before their rounding to
    # float16, float32 sums of a million terms are off by some units of 2**-24 of the sum of
    # the terms' magnitudes, when they are summed in blocks (1e-6 of it allowed); one
    # float32 running sum would be off by more (6e-6 to 1.3e-5 of it for these sum(dy)).
    sum_error = {
        "grad_weight": 1e-6 * (dy64 * xhat).abs().sum(dims),
        "grad_bias": 1e-6 * dy64.abs().sum(dims),
    }
    for label, actual, expected in [
        ("output", out, out_ref),
        ("running_mean", params[2], rm_ref),
        ("running_var", params[3], rv_ref),
        ("grad_input", grad_input, grad_input_ref),
        ("grad_weight", grad_weight, sum_dy_xhat),
        ("grad_bias", grad_bias, sum_dy),
    ]:
        assert actual.dtype == torch.float16, label
        error = (actual.cpu().double() - expected).abs()
        bound = HALF_RTOL * expected.abs() + HALF_ATOL + sum_error.get(label, 0.0)
        worst = (error / bound).max().item()
        assert worst <= 1, f"{label}: an error {worst:.3g} times its bound"


# Two values per channel whose float32 mean is half a unit in the last place (1.2e-7) from
# the exact one. 0.066 apart: the variance (1.1e-3) is a hundred times eps, so x_hat =
# +-0.9955 and the input gradient w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
# keeps 1 - x_hat^2 = 0.9% of its terms. 0.004 apart: the variance is 0.4 eps, so invstd
# (267) carries the mean's rounding into the output.
CLOSE_VALUES = {
    "gradient": [-2.2512032985687256, -2.1849365234375],
    "output": [-2.2512032985687256, -2.2472033500671387],
}
CLOSE_GRAD = [2.057591199874878, -0.03542188182473183]


@pytest.mark.parametrize("values", CLOSE_VALUES.values(), ids=CLOSE_VALUES.keys())
@pytest.mark.parametrize(
    "shape,layout",
    [((1, 1, 2), "contiguous"), ((2, 1), "contiguous"), ((1, 1, 1, 2), "channels_last")],
    ids=["planes", "2d", "channels_last"],
)
def test_close_values_against_float64(shape, layout, values, device):
    """Output and input gradient of a training step on the values above within float32
    tolerance of a float64 computation. The saved mean is float32 by the op contract; the
    kernels normalize and take the gradient's sums about the exact mean, so that its
    rounding does not reach the results: about save_mean, it moved dx by 8e-4 of its size
    and y by 5e-5, as it does torch 2.13's float32 results."""
    x = torch.tensor(values, device=device).reshape(shape)
    grad_out = torch.tensor(CLOSE_GRAD, device=device).reshape(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    weight = torch.tensor([1.5], device=device)
    bias = torch.tensor([0.25], device=device)
    x_ours = x.clone().requires_grad_(True)
    out = tbn.functional.batch_norm(x_ours, None, None, weight, bias, training=True)
    out.backward(grad_out)
    x64 = x.double().requires_grad_(True)
    out64 = torch.nn.functional.batch_norm(
        x64, None, None, weight.double(), bias.double(), training=True
    )
    out64.backward(grad_out.double())
    assert_close(out, out64.float(), "output")
    assert_close(x_ours.grad, x64.grad.float(), "input grad")


# Values whose squares overflow their dtype while their M2 does not. float64: a channel
# constant at 1e160 (squares past 1.8e308; a spread that float64 resolves there squares
# to some 1e280, so only a constant channel has a variance in range).
# float32: values about 2e19 (squares past 3.4e38) with a spread of 4e17, the first two of
# each channel 3e18 to either side, so that the CUDA kernels' centre (StatsOp::centre) is 0
# and the statistics are gathered about it.
OVERFLOW_SHAPES = [
    ((300, 4), "contiguous"),
    ((8, 4, 10, 10), "contiguous"),
    ((8, 4, 6, 6), "channels_last"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "shape,layout", OVERFLOW_SHAPES, ids=[f"{shape}-{layout}" for shape, layout in OVERFLOW_SHAPES]
)
def test_values_whose_squares_overflow(shape, layout, dtype, device):
    """Finite statistics and outputs, those of a float64 computation (for the constant
    channel, the exact ones: mean 1e160, variance 0, outputs equal to the bias): a first
    merge of partial statistics into an empty total took delta^2 * 0 = inf * 0, and the
    variance and every output of the channel came out NaN. (The CPU kernels reduce float32
    in double, where those squares fit: on the CPU the float32 cases check results only,
    the float64 ones the merge.)"""
    C = shape[1]
    count = math.prod(shape) // C
    if dtype == torch.float64:
        values = torch.full((C, count), 1e160, dtype=torch.float64)
    else:
        generator = torch.Generator().manual_seed(0)
        values = torch.randn(C, count, generator=generator, dtype=torch.float64) * 4e17 + 2e19
        values[:, 0] -= 3e18
        values[:, 1] += 3e18
    # [C, count] in the order (N, spatial...) of the values of a channel.
    logical = values.view((C, shape[0]) + shape[2:]).transpose(0, 1).to(dtype)
    x = logical.contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    weight, bias = torch.rand(C, dtype=dtype) + 0.5, torch.rand(C, dtype=dtype) - 0.5
    running_mean, running_var = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    momentum, eps = 0.1, 1e-5
    if dtype == torch.float64:
        # Exact (torch's own float64 mean of the constant may round away from it).
        mean_ref = torch.full((C,), 1e160, dtype=torch.float64)
        invstd_ref = torch.full((C,), 1 / math.sqrt(eps), dtype=torch.float64)
        out_ref = bias.view((1, C) + (1,) * (len(shape) - 2)).expand(shape)
        rm_ref = momentum * mean_ref + (1 - momentum) * running_mean
        rv_ref = (1 - momentum) * running_var
    else:
        out_ref, mean_ref, invstd_ref, rm_ref, rv_ref = _reference(
            x, running_mean, running_var, weight, bias, momentum, eps
        )

    params = [t.to(device) for t in (weight, bias, running_mean, running_var)]
    out, save_mean, save_invstd = (
        t.cpu() for t in ops.batch_norm_forward(x.to(device), *params, True, momentum, eps)
    )
    assert_close(save_mean.double(), mean_ref, "save_mean", dtype)
    assert_close(save_invstd.double(), invstd_ref, "save_invstd", dtype)
    assert_close(params[2].cpu().double(), rm_ref, "running_mean", dtype)
    assert_close(params[3].cpu().double(), rv_ref, "running_var", dtype)
    assert_close(out.double(), out_ref, "output", dtype)
