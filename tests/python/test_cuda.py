"""CUDA-specific tests of the torch_batchnorm ops.

Parity with torch.nn.BatchNorm on CUDA (dtypes, layouts, modes) comes from the shared
parity suite through its ``device`` fixture. This file checks what only CUDA has: agreement
with the CPU kernels (the reference implementation of the op contract), both launch shapes
of the kernels (one block per channel, and channels split over blocks with a grid merge),
vector and scalar memory paths, gradcheck/opcheck/torch.compile on CUDA tensors, no host
synchronisation, streams, device guards, determinism and tensors beyond 2**31 elements;
and the ops that split training for SyncBatchNorm, against float64 and against the
unsplit ops.
"""

import pytest
import torch
import torch_batchnorm as tbn

HAS_GPU = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="CUDA is not available")
needs_kernels = pytest.mark.skipif(
    not tbn.with_cuda, reason="torch_batchnorm was built without its CUDA kernels"
)

forward_op = torch.ops.torch_batchnorm.batch_norm_forward.default
backward_op = torch.ops.torch_batchnorm.batch_norm_backward.default
stats_op = torch.ops.torch_batchnorm.batch_norm_stats.default
forward_with_stats_op = torch.ops.torch_batchnorm.batch_norm_forward_with_stats.default
backward_reduce_op = torch.ops.torch_batchnorm.batch_norm_backward_reduce.default
backward_elemt_op = torch.ops.torch_batchnorm.batch_norm_backward_elemt.default

MIXED = "mixed"  # float16/bfloat16 input with float32 parameters and statistics

# (shape, memory layout). Chosen to reach every launch shape of the kernels:
#   planes = contiguous [N, C, HW]; rows = channels-last and 2D [N, C].
#   few channels with many values -> channels split over blocks, merged by one of them;
#   many channels -> one block per channel (statistics and elementwise pass in one kernel);
#   HW or C not a multiple of the 16-byte vector -> scalar path.
LAYOUTS = [
    ((4, 3, 32, 32), "contiguous"),  # planes, split channels, vector path
    ((2, 5, 7, 7), "contiguous"),  # planes, HW = 49: scalar path
    ((3, 6, 14, 14), "contiguous"),  # planes, HW = 196: 8-byte vectors for float16/bfloat16
    ((2, 3000, 4, 4), "contiguous"),  # planes, one block per channel (fused)
    ((6, 16, 10, 10), "channels_last"),  # rows, vector path
    ((3, 7, 9, 9), "channels_last"),  # rows, C = 7: scalar path
    ((2, 3, 4, 5, 6), "channels_last_3d"),
    ((2, 3, 4, 5, 6), "contiguous"),
    ((64, 40), "contiguous"),  # 2D [N, C] is rows
    ((4, 70000), "contiguous"),  # 2D with many channels: rows, one block per group (fused)
    ((5, 6, 11), "contiguous"),  # 3D [N, C, L]
    ((8, 6, 12, 12), "strided"),  # neither layout: made contiguous once
    ((512, 8, 1, 1), "contiguous"),  # [N, C, 1, 1] is rows in memory
    # Dense but neither contiguous nor channels_last(_3d): torch's rule makes the result
    # contiguous (3D with C innermost, transposed 2D, reversed 4D), except where the
    # suggested format is channels_last (reversed [1, C, 1, W]).
    ((5, 6, 11), "channels_innermost"),
    ((7, 33), "reversed"),
    ((2, 3, 6, 5), "reversed"),
    ((1, 3, 1, 4), "reversed"),
    ((0, 5, 3), "contiguous"),  # empty batch
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, MIXED]

# One input of each kind of launch: planes split over blocks, planes one block per
# channel, rows (channels-last) and 2D [N, C].
LAUNCH_SHAPES = [
    ((8, 3, 64, 64), "contiguous"),
    ((2, 3000, 4, 4), "contiguous"),
    ((8, 32, 16, 16), "channels_last"),
    ((16, 256), "contiguous"),
]


def _make_input(shape, layout, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    if layout == "strided":
        # Every other element of a wider tensor: dense in no layout.
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        wide[..., ::2] = base
        x = wide.to(device=device, dtype=dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = base.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "channels_innermost":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "reversed":
        dims = list(reversed(range(x.dim())))
        x = x.permute(dims).contiguous().permute(dims)
    return x


def _params(channels, dtype, device, affine=True, track=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pdtype = torch.float32 if dtype == MIXED else dtype
    w = b = rm = rv = None
    if affine:
        w = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).to(device, pdtype)
        b = torch.randn(channels, generator=gen, dtype=torch.float64).to(device, pdtype)
    if track:
        rm = torch.randn(channels, generator=gen, dtype=torch.float64).to(device, pdtype)
        rv = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).to(device, pdtype)
    return w, b, rm, rv


def _input_dtype(dtype):
    return torch.bfloat16 if dtype == MIXED else dtype


def _tolerances(dtype):
    """(outputs, statistics, gradients) rtol/atol pairs for CPU-vs-CUDA agreement.

    Both backends accumulate in the same type but in a different order, so results agree
    to rounding: a few ulps of the accumulation type for statistics, one ulp of the
    output type for outputs rounded to float16/bfloat16.
    """
    if dtype == torch.float64:
        return (1e-10, 1e-10), (1e-12, 1e-12), (1e-9, 1e-10)
    if dtype == torch.float32:
        return (1e-5, 1e-5), (1e-5, 1e-6), (1e-4, 1e-5)
    if dtype == torch.float16:
        return (1e-3, 1e-3), (1e-5, 1e-6), (2e-3, 2e-3)
    return (8e-3, 8e-3), (1e-5, 1e-6), (1.6e-2, 1.6e-2)  # bfloat16 and mixed


def _run(device, x_cpu, layout, dtype, params, training, momentum=0.1, eps=1e-5, grad=None):
    """Forward (op), backward (autograd) on `device`; returns every result on the CPU."""
    if layout == "strided":
        x = _make_input(tuple(x_cpu.shape), layout, _input_dtype(dtype), device)
    else:
        x = x_cpu.to(device)
    x = x.detach().requires_grad_(x.numel() > 0)
    w, b, rm, rv = (None if p is None else p.to(device).clone() for p in params)
    if w is not None:
        w.requires_grad_(True)
        b.requires_grad_(True)
    out, save_mean, save_invstd = forward_op(x, w, b, rm, rv, training, momentum, eps)
    result = {
        "out": out,
        "save_mean": save_mean,
        "save_invstd": save_invstd,
        "running_mean": rm,
        "running_var": rv,
    }
    # Named by what they are: an empty input takes no gradient, weight and bias still do.
    leaves = {
        name: t
        for name, t in zip(("grad_input", "grad_weight", "grad_bias"), (x, w, b))
        if t is not None and t.requires_grad
    }
    if grad is not None and leaves:
        y = tbn.functional.batch_norm(
            x, None if training else rm, None if training else rv, w, b, training, momentum, eps
        )
        result.update(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad.to(device))))
    return {k: (None if v is None else v.detach().cpu()) for k, v in result.items()}


def _ulp(t):
    """The spacing of t's dtype at each element of t, as float64."""
    finfo = torch.finfo(t.dtype)
    mantissa, exponent = torch.frexp(t.double().abs())  # |t| = mantissa * 2**exponent
    spacing = torch.ldexp(torch.full_like(mantissa, finfo.eps), exponent - 1)
    subnormal = finfo.eps * finfo.tiny
    return torch.where(t == 0, subnormal, spacing).clamp_min(subnormal)


def _running_reference(x, running_mean, running_var, training, momentum):
    """The running statistics after the forward, in float64 from the input's values."""
    rm, rv = running_mean.double(), running_var.double()
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if not training or count == 0:
        return rm, rv
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(xd, dim=dims, unbiased=True)
    return (1 - momentum) * rm + momentum * mean, (1 - momentum) * rv + momentum * var


def _assert_rounded(actual, exact, what, scale=None):
    """`actual` is `exact` computed in the accumulation type and rounded once to its dtype:
    within half a unit in the last place of that dtype, plus the accumulation error
    relative to `scale` (default |exact|; the sum of the magnitudes of the terms where
    they cancel).

    Two backends that sum in different orders get float32 values a few ulps apart; when
    those straddle a rounding boundary of float16/bfloat16, the stored results are one
    unit in the last place apart. Each is still a correct rounding, which is what this
    checks, against float64 rather than against the other backend."""
    acc_rtol = 1e-12 if actual.dtype == torch.float64 else 1e-5
    scale = exact.abs() if scale is None else scale
    bound = 0.5 * _ulp(actual) + acc_rtol * (1 + scale)
    err = (actual.double() - exact).abs()
    worst = int(torch.argmax(err - bound)) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{what}: {int((err > bound).sum())} of {err.numel()} elements beyond half an ulp of "
        f"{actual.dtype}; worst at {worst}: {actual[worst].item()} vs exact {exact[worst].item()}"
    )


# Checked against float64 instead (_assert_rounded): each backend rounds its own float32
# value to the parameter dtype.
_ROUNDED_KEYS = ("running_mean", "running_var")


def _assert_agree(cpu, cuda, dtype, what):
    tol_out, tol_stats, tol_grad = _tolerances(dtype)
    for key in cpu:
        if key in _ROUNDED_KEYS:
            continue
        a, b = cpu[key], cuda[key]
        if a is None:
            assert b is None, key
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (
            what,
            key,
            a.dtype,
            b.dtype,
            a.shape,
            b.shape,
        )
        if key in ("out", "grad_input"):
            assert a.stride() == b.stride(), (what, key, "layout differs", a.stride(), b.stride())
        if key.startswith("grad"):
            tol = tol_grad
        elif key == "out" or a.dtype in (torch.float16, torch.bfloat16):
            tol = tol_out  # rounded to the reduced dtype, like the output
        else:
            tol = tol_stats
        torch.testing.assert_close(
            b,
            a,
            rtol=tol[0],
            atol=tol[1],
            equal_nan=True,
            msg=lambda m, key=key: f"{what} {key}: {m}",
        )


def test_built_with_cuda():
    # A GPU is visible, so a build without the CUDA kernels is a broken build, not a skip.
    assert tbn.with_cuda, "torch_batchnorm was built without CUDA kernels on a machine with a GPU"


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", ["train", "train_untracked", "eval", "train_noaffine"])
def test_cuda_matches_cpu(shape, layout, dtype, mode):
    training = mode != "eval"
    if training and shape[0] * (torch.Size(shape[2:]).numel()) == 1:
        pytest.skip("one value per channel is rejected in training")
    x = _make_input(
        shape, "contiguous" if layout == "strided" else layout, _input_dtype(dtype), "cpu"
    )
    params = _params(
        shape[1], dtype, "cpu", affine=mode != "train_noaffine", track=mode != "train_untracked"
    )
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(_input_dtype(dtype))
    cpu = _run("cpu", x, layout, dtype, params, training, grad=grad)
    cuda = _run("cuda", x, layout, dtype, params, training, grad=grad)
    what = f"{mode} {shape} {layout} {dtype}"
    _assert_agree(cpu, cuda, dtype, what)
    if params[2] is not None:
        exact = _running_reference(x, params[2], params[3], training, momentum=0.1)
        for device, result in (("cpu", cpu), ("cuda", cuda)):
            for key, e in zip(_ROUNDED_KEYS, exact):
                _assert_rounded(result[key], e, f"{what} {device} {key}")


@needs_kernels
@pytest.mark.parametrize(
    "mask", [(True, False, False), (False, True, True), (True, True, False), (False, False, True)]
)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((4, 3, 16, 16), "contiguous"),
        ((4, 24, 6, 6), "channels_last"),
        ((4, 5000, 2, 2), "contiguous"),
    ],
)
def test_backward_op_masks_match_cpu(shape, layout, training, mask):
    x = _make_input(shape, layout, torch.float32, "cpu")
    g = _make_input(shape, "contiguous", torch.float32, "cpu", seed=3)
    w, _, rm, rv = _params(shape[1], torch.float32, "cpu")
    _, sm, si = forward_op(x, w, None, None, None, True, 0.1, 1e-5)
    args = (g, x, w, rm, rv, sm, si, training, 1e-5, list(mask))
    expected = backward_op(*args)
    actual = backward_op(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and e.dtype == a.dtype
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(layout, training):
    shape = (3, 4, 5, 6)
    x = _make_input(shape, layout, torch.float64, "cuda").requires_grad_(True)
    w, b, rm, rv = _params(4, torch.float64, "cuda")
    w.requires_grad_(True)
    b.requires_grad_(True)

    def fn(x, w, b):
        # Running statistics: constants in evaluation, left out in training (they would
        # be updated on every evaluation of fn).
        return tbn.functional.batch_norm(
            x, None if training else rm, None if training else rv, w, b, training, 0.1, 1e-5
        )

    assert torch.autograd.gradcheck(fn, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), check_fwd_over_rev=True)


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, MIXED], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(layout, dtype, training):
    shape = (4, 8, 6, 6)
    x = _make_input(shape, layout, _input_dtype(dtype), "cuda").requires_grad_(True)
    w, b, rm, rv = _params(8, dtype, "cuda")
    w.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(forward_op, (x, w, b, rm, rv, training, 0.1, 1e-5))
    _, sm, si = forward_op(x.detach(), w.detach(), b.detach(), None, None, True, 0.1, 1e-5)
    g = torch.randn_like(x)
    torch.library.opcheck(
        backward_op,
        (g, x.detach(), w.detach(), rm, rv, sm, si, training, 1e-5, [True, True, True]),
    )


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_compile(layout):
    torch.manual_seed(0)
    ours = tbn.BatchNorm2d(16).cuda()
    ref = tbn.BatchNorm2d(16).cuda()
    ref.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, fullgraph=True)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        x = _make_input((8, 16, 12, 12), layout, torch.float32, "cuda").requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        out = compiled(x)
        expected = ref(x_ref)
        torch.testing.assert_close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def _training_step(x, w, b, rm, rv, g):
    """A training forward and backward through the ops: (out, save_mean, save_invstd,
    grad_input, grad_weight, grad_bias); rm and rv are updated in place."""
    out, sm, si = forward_op(x, w, b, rm, rv, True, 0.1, 1e-5)
    grads = backward_op(g, x, w, rm, rv, sm, si, True, 1e-5, [True, True, True])
    return (out, sm, si) + tuple(grads)


@needs_kernels
@pytest.mark.parametrize("shape,layout", LAUNCH_SHAPES)
def test_no_host_sync(shape, layout):
    x = _make_input(shape, layout, torch.float32, "cuda")
    w, b, rm, rv = _params(shape[1], torch.float32, "cuda")
    g = torch.randn_like(x)
    # Warm up first: one-time initialisation is not what is being checked.
    _training_step(x, w, b, rm, rv, g)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for training in (True, False):
            _, sm, si = forward_op(x, w, b, rm, rv, training, 0.1, 1e-5)
            if training:
                backward_op(g, x, w, rm, rv, sm, si, True, 1e-5, [True, True, True])
            else:
                backward_op(g, x, w, rm, rv, None, None, False, 1e-5, [True, True, True])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@needs_kernels
@pytest.mark.parametrize("shape,layout", LAUNCH_SHAPES)
def test_current_stream_is_used(shape, layout):
    # Everything is queued on a side stream behind a long sleep: a kernel launched on any
    # other stream would run before the input is written and produce different numbers.
    x_src = _make_input(shape, layout, torch.float32, "cuda")
    w, b, rm, rv = _params(shape[1], torch.float32, "cuda")
    rm_ref, rv_ref = rm.clone(), rv.clone()
    g = torch.randn_like(x_src)
    expected = _training_step(x_src, w, b, rm_ref, rv_ref, g)
    x = torch.zeros_like(x_src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(x_src)
        actual = _training_step(x, w, b, rm, rv, g)
    torch.cuda.synchronize()
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(rm, rm_ref, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv_ref, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("shape,layout", LAUNCH_SHAPES)
def test_cuda_graph_replay(shape, layout):
    # A training step captured in a CUDA graph (as torch.compile's "reduce-overhead" mode
    # captures one) replays on new input as eager calls run: the same results bit for bit,
    # and the running statistics updated in place by every replay.
    x = _make_input(shape, layout, torch.float32, "cuda")
    w, b, rm, rv = _params(shape[1], torch.float32, "cuda")
    g = torch.randn_like(x)

    def step(x, rm, rv):
        return _training_step(x, w, b, rm, rv, g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x, rm, rv)  # one-time initialisation happens outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(x, rm, rv)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for seed in (1, 2):
        x.copy_(_make_input(shape, layout, torch.float32, "cuda", seed=seed))
        expected = step(x.clone(), rm_ref, rv_ref)
        graph.replay()
        torch.cuda.synchronize()
        for a, e in zip(captured, expected):
            assert torch.equal(a, e)
        assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref)


@needs_kernels
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard():
    # Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1.
    shape = (4, 6, 8, 8)
    x_cpu = _make_input(shape, "contiguous", torch.float32, "cpu")
    params = _params(6, torch.float32, "cpu")
    grad = torch.randn(shape)
    with torch.cuda.device(0):
        x1 = x_cpu.to("cuda:1")
        w, b, rm, rv = (p.to("cuda:1") for p in params)
        out, sm, si = forward_op(x1, w, b, rm, rv, True, 0.1, 1e-5)
        assert out.device == torch.device("cuda:1") and sm.device == torch.device("cuda:1")
        gi, gw, gb = backward_op(
            grad.to("cuda:1"), x1, w, rm, rv, sm, si, True, 1e-5, [True, True, True]
        )
    torch.cuda.synchronize(1)
    e_out, e_sm, e_si = forward_op(x_cpu, *params, True, 0.1, 1e-5)
    expected_grads = backward_op(
        grad, x_cpu, params[0], params[2], params[3], e_sm, e_si, True, 1e-5, [True, True, True]
    )
    torch.testing.assert_close(out.cpu(), e_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm.cpu(), e_sm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(si.cpu(), e_si, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm.cpu(), params[2], rtol=1e-5, atol=1e-6)
    for a, e in zip((gi, gw, gb), expected_grads):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize(
    "shape,layout", [((16, 3, 64, 64), "contiguous"), ((16, 24, 32, 32), "channels_last")]
)
def test_deterministic(shape, layout):
    # Partial results are merged in a fixed order: repeated runs agree bit for bit.
    x = _make_input(shape, layout, torch.float32, "cuda")
    w, b, _, _ = _params(shape[1], torch.float32, "cuda")
    g = torch.randn_like(x)
    runs = []
    for _ in range(3):
        out, sm, si = forward_op(x, w, b, None, None, True, 0.1, 1e-5)
        grads = backward_op(g, x, w, None, None, sm, si, True, 1e-5, [True, True, True])
        runs.append((out, sm, si) + tuple(grads))
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)


@needs_kernels
def test_large_mean_statistics():
    # Welford merges keep the variance of inputs with a large mean: E[x^2] - E[x]^2 would
    # lose it in float32.
    x = (torch.randn(32, 4, 64, 64, device="cuda", dtype=torch.float64) * 0.01 + 1000.0).float()
    _, sm, si = forward_op(x, None, None, None, None, True, 0.1, 1e-5)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(sm.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(si.double(), (var + 1e-5).rsqrt(), rtol=1e-3, atol=0)


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@needs_kernels
@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_over_2_pow_31_elements_bfloat16(layout):
    # 64-bit indexing: a bfloat16 input of more than 2**31 elements (4.3 GB); the last
    # elements lie beyond every 32-bit offset.
    numel_target = 2**31 + 4096
    if layout == "planes":
        shape = (2, 4, numel_target // 8)
    else:
        shape = (numel_target // 8, 8)
    nbytes = torch.Size(shape).numel() * 2
    # input, grad_out, output, grad_input, plus per-channel float64 work
    if _free_bytes() < 4 * nbytes + (4 << 30):
        pytest.skip("not enough free GPU memory for a tensor over 2**31 elements")
    torch.manual_seed(0)
    x = torch.empty(shape, device="cuda", dtype=torch.bfloat16).normal_(1.0, 2.0)
    assert x.numel() > 2**31
    channels = shape[1]
    w = torch.rand(channels, device="cuda") + 0.5
    b = torch.randn(channels, device="cuda")
    rm = torch.zeros(channels, device="cuda")
    rv = torch.ones(channels, device="cuda")
    out, sm, si = forward_op(x, w, b, rm, rv, True, 1.0, 1e-5)
    assert out.shape == x.shape and sm.dtype == torch.float32

    # Per-channel statistics in float64, one channel at a time.
    for c in range(channels):
        xc = x.select(1, c).double()
        var, mean = torch.var_mean(xc, unbiased=False)
        torch.testing.assert_close(sm[c].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(si[c].double(), (var + 1e-5).rsqrt(), rtol=1e-4, atol=0)
        torch.testing.assert_close(
            rv[c].double(), var * xc.numel() / (xc.numel() - 1), rtol=1e-4, atol=0
        )
        del xc

    # Output at the first and last elements of the flat storage and in between.
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    positions = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**31 + 1, x.numel() - 1], device="cuda")
    positions = torch.cat([positions, torch.randint(0, x.numel(), (1000,), device="cuda")])
    if layout == "planes":
        chan = (positions // x.shape[2]) % channels
    else:
        chan = positions % channels
    expected = (flat_x[positions].float() - sm[chan]) * si[chan] * w[chan] + b[chan]
    torch.testing.assert_close(flat_out[positions].float(), expected, rtol=1.6e-2, atol=1.6e-2)
    del out

    g = torch.empty_like(x).normal_()
    gi, gw, gb = backward_op(g, x, w, None, None, sm, si, True, 1e-5, [True, True, True])
    for c in range(channels):
        gc = g.select(1, c).double()
        # float accumulation of ~5e8 values of unit scale: absolute error well below 5
        torch.testing.assert_close(gb[c].double(), gc.sum(), rtol=1e-4, atol=5.0)
        del gc
    n = x.numel() // channels
    flat_g, flat_gi = g.reshape(-1), gi.reshape(-1)
    sum_dy = gb[chan]
    sum_dy_xmu = gw[chan] / si[chan]
    xmu = flat_x[positions].float() - sm[chan]
    expected = (
        (flat_g[positions].float() - sum_dy / n - xmu * si[chan] ** 2 * sum_dy_xmu / n)
        * si[chan]
        * w[chan]
    )
    torch.testing.assert_close(flat_gi[positions].float(), expected, rtol=1.6e-2, atol=1.6e-2)


# ---------------------------------------------------------------------------------------
# The ops that split training for statistics that span processes (SyncBatchNorm): each
# against its float64 formula, and together, on pieces of a batch as ranks would hold
# them, against batch_norm_forward/backward on the whole batch.

SPLIT_LAYOUTS = [
    ((6, 3, 16, 16), "contiguous"),  # planes, channels split over blocks
    ((4, 3000, 2, 2), "contiguous"),  # planes, one block per channel
    ((6, 16, 10, 10), "channels_last"),
    ((3, 5, 4, 3, 2), "channels_last_3d"),  # rows, C = 5: scalar path
    ((64, 40), "contiguous"),
    ((5, 6, 11), "channels_innermost"),
    ((8, 6, 12, 12), "strided"),
]
EPS = 1e-5
MOMENTUM = 0.1


def _split_cases(test):
    """Runs `test` over SPLIT_LAYOUTS and every dtype."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)
    test = pytest.mark.parametrize("shape,layout", SPLIT_LAYOUTS, ids=lambda v: str(v))(test)
    return needs_kernels(test)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pieces(x):
    """x split along the batch as ranks would hold it: one sample, none, the rest."""
    return [x[:1], x[1:1], x[1:]]


def _channel_view(t, x):
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _c64(t, x):
    """A per-channel tensor in float64, broadcastable against x."""
    return _channel_view(t.double(), x)


def _result_strides(x):
    """Strides of batch_norm_forward's result for x (its layout rule is checked against
    the CPU's by test_cuda_matches_cpu)."""
    C = x.shape[1]
    stats = [
        torch.zeros(C, dtype=x.dtype, device=x.device),
        torch.ones(C, dtype=x.dtype, device=x.device),
    ]
    return forward_op(x, None, None, *stats, False, MOMENTUM, EPS)[0].stride()


def _batch_stats(x):
    """batch_norm_forward in training, without parameters: (out, save_mean, save_invstd)."""
    return forward_op(x, None, None, None, None, True, MOMENTUM, EPS)


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _stats64(x):
    """Mean, M2 and max |x| per channel, in float64."""
    xd = x.double()
    dims = _reduce_dims(x)
    if x.numel() == 0:
        zeros = xd.new_zeros(x.shape[1])
        return zeros, zeros, zeros
    mean = xd.mean(dims)
    m2 = ((xd - _channel_view(mean, xd)) ** 2).sum(dims)
    return mean, m2, xd.abs().amax(dims)


def _merge64(stats):
    """Chan's merge of per-piece (mean, m2, count) in float64, as SyncBatchNorm merges the
    statistics gathered from its ranks."""
    count = sum(n for _, _, n in stats)
    mean = sum(m.double() * n for m, _, n in stats) / count
    m2 = sum(q.double() + n * (m.double() - mean) ** 2 for m, q, n in stats)
    return mean, m2, count


def _split_inputs(shape, layout, dtype, affine=True):
    x = _make_input(shape, layout, _input_dtype(dtype), "cuda")
    g = _make_input(shape, layout, _input_dtype(dtype), "cuda", seed=5)
    w, b, rm, rv = _params(shape[1], dtype, "cuda", affine=affine)
    return x, g, w, b, rm, rv


@_split_cases
def test_stats_matches_float64(shape, layout, dtype):
    x = _make_input(shape, layout, _input_dtype(dtype), "cuda")
    acc_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for piece in _pieces(x) + [x]:
        mean, m2 = stats_op(piece)
        assert mean.dtype == m2.dtype == _acc_dtype(dtype) and mean.shape == (shape[1],)
        mean64, m2_64, abs_max = _stats64(piece)
        what = f"{tuple(piece.shape)} {layout} {dtype}"
        # The bounds are 0 for an empty piece: its mean and M2 are exactly 0.
        assert bool(((mean.double() - mean64).abs() <= acc_rtol * abs_max).all()), f"{what} mean"
        assert bool(((m2.double() - m2_64).abs() <= acc_rtol * m2_64).all()), f"{what} m2"
    # The statistics of batch_norm_forward come from the same reduction.
    _, save_mean, save_invstd = _batch_stats(x)
    mean, m2 = stats_op(x)
    assert torch.equal(save_mean, mean)
    count = x.numel() // shape[1]
    torch.testing.assert_close(save_invstd, (m2 / count + EPS).rsqrt(), rtol=1e-6, atol=0)


@_split_cases
def test_forward_with_stats_matches_float64(shape, layout, dtype):
    x, _, w, b, rm0, rv0 = _split_inputs(shape, layout, dtype)
    # Statistics of a larger batch than the local one, as in SyncBatchNorm.
    other = _make_input(shape, layout, _input_dtype(dtype), "cuda", seed=9)
    mean64, m2_64, count = _merge64([stats_op(t) + (t.numel() // shape[1],) for t in (x, other)])
    mean, m2 = mean64.to(_acc_dtype(dtype)), m2_64.to(_acc_dtype(dtype))
    # The float64 reference starts from the statistics as passed.
    invstd = (m2.double() / count + EPS).rsqrt()
    rm_exact = (1 - MOMENTUM) * rm0.double() + MOMENTUM * mean.double()
    rv_exact = (1 - MOMENTUM) * rv0.double() + MOMENTUM * m2.double() / (count - 1)
    for piece in _pieces(x) + [x]:
        rm, rv = rm0.clone(), rv0.clone()
        out, save_mean, save_invstd = forward_with_stats_op(
            piece, w, b, rm, rv, mean, m2, count, MOMENTUM, EPS
        )
        what = f"{tuple(piece.shape)} {layout} {dtype}"
        assert out.shape == piece.shape and out.dtype == piece.dtype, what
        assert out.stride() == _result_strides(piece), what
        assert torch.equal(save_mean, mean), what
        _assert_rounded(save_invstd, invstd, f"{what} save_invstd")
        # Updated from the global statistics even where the piece is empty.
        _assert_rounded(rm, rm_exact, f"{what} running_mean")
        _assert_rounded(rv, rv_exact, f"{what} running_var")
        scaled = (piece.double() - _c64(mean, piece)) * _c64(invstd, piece) * _c64(w, piece)
        exact = scaled + _c64(b, piece)
        scale = scaled.abs() + _c64(b, piece).abs()
        _assert_rounded(out, exact, f"{what} out", scale=scale)


@_split_cases
def test_backward_reduce_matches_float64(shape, layout, dtype):
    x, g, _, _, _, _ = _split_inputs(shape, layout, dtype)
    _, mean, invstd = _batch_stats(x)
    acc_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for piece, g_piece in zip(_pieces(x) + [x], _pieces(g) + [g]):
        sum_dy, sum_dy_xmu = backward_reduce_op(g_piece, piece, mean, invstd)
        assert sum_dy.dtype == sum_dy_xmu.dtype == _acc_dtype(dtype)
        gd, dims = g_piece.double(), _reduce_dims(piece)
        terms = gd * (piece.double() - _channel_view(mean.double(), piece))
        what = f"{tuple(piece.shape)} {layout} {dtype}"
        # Summation error is relative to the sum of the magnitudes of the terms (0 for an
        # empty piece: its sums are exactly 0).
        for name, actual, t in (("sum_dy", sum_dy, gd), ("sum_dy_xmu", sum_dy_xmu, terms)):
            err = (actual.double() - t.sum(dims)).abs()
            assert bool((err <= acc_rtol * t.abs().sum(dims)).all()), f"{what} {name}"


@_split_cases
def test_backward_elemt_matches_float64(shape, layout, dtype):
    x, g, w, _, _, _ = _split_inputs(shape, layout, dtype)
    _, mean, invstd = _batch_stats(x)
    # Sums and count of a larger batch than the local one.
    sum_dy, sum_dy_xmu = (3 * s for s in backward_reduce_op(g, x, mean, invstd))
    count = 3 * x.numel() // shape[1]
    for weight in (w, None):
        for piece, g_piece in zip(_pieces(x) + [x], _pieces(g) + [g]):
            grad_input = backward_elemt_op(
                g_piece, piece, weight, mean, invstd, sum_dy, sum_dy_xmu, count
            )
            what = f"{tuple(piece.shape)} {layout} {dtype} weight={weight is not None}"
            assert grad_input.shape == piece.shape and grad_input.dtype == piece.dtype, what
            assert grad_input.stride() == _result_strides(piece), what
            # dx = a * dy + b * (x - mean) + c with the coefficients of batch_norm_math.h.
            a = _c64(invstd, piece) * (1 if weight is None else _c64(weight, piece))
            terms = (
                a * g_piece.double(),
                -a
                * _c64(invstd, piece) ** 2
                * _c64(sum_dy_xmu, piece)
                / count
                * (piece.double() - _c64(mean, piece)),
                -a * _c64(sum_dy, piece) / count,
            )
            _assert_rounded(
                grad_input, sum(terms), f"{what} grad_input", scale=sum(t.abs() for t in terms)
            )


@needs_kernels
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SPLIT_LAYOUTS, ids=lambda v: str(v))
def test_split_training_matches_whole_batch(shape, layout, dtype, affine):
    """SyncBatchNorm's training step on pieces of a batch, one of them empty: local
    statistics, merged; normalisation with the merged ones; local sums, added; input
    gradients from the added ones. The same results as batch_norm_forward/backward on the
    whole batch, to summation order."""
    x, g, w, b, rm0, rv0 = _split_inputs(shape, layout, dtype, affine=affine)
    C = shape[1]
    acc = _acc_dtype(dtype)
    pieces, g_pieces = _pieces(x), _pieces(g)

    stats = [stats_op(p) + (p.numel() // C,) for p in pieces]
    mean64, m2_64, count = _merge64(stats)
    mean, m2 = mean64.to(acc), m2_64.to(acc)
    outs, running = [], []
    for p in pieces:
        rm = rv = None
        if rm0 is not None:
            rm, rv = rm0.clone(), rv0.clone()
            running.append((rm, rv))
        outs.append(forward_with_stats_op(p, w, b, rm, rv, mean, m2, count, MOMENTUM, EPS))
    save_mean, save_invstd = outs[0][1], outs[0][2]
    sums = [backward_reduce_op(gp, p, save_mean, save_invstd) for gp, p in zip(g_pieces, pieces)]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xmu = sum(s[1] for s in sums)
    grads = [
        backward_elemt_op(gp, p, w, save_mean, save_invstd, sum_dy, sum_dy_xmu, count)
        for gp, p in zip(g_pieces, pieces)
    ]

    rm_ref = rv_ref = None
    if rm0 is not None:
        rm_ref, rv_ref = rm0.clone(), rv0.clone()
    expected = forward_op(x, w, b, rm_ref, rv_ref, True, MOMENTUM, EPS)
    gi, gw, gb = backward_op(
        g, x, w, None, None, expected[1], expected[2], True, EPS, [True, affine, affine]
    )
    split = {
        "out": torch.cat([o[0] for o in outs]),
        "save_mean": save_mean,
        "save_invstd": save_invstd,
        "grad_input": torch.cat(grads),
    }
    whole = {
        "out": expected[0],
        "save_mean": expected[1],
        "save_invstd": expected[2],
        "grad_input": gi,
    }
    if affine:
        pdtype = w.dtype
        split["grad_weight"] = (sum_dy_xmu * save_invstd).to(pdtype)
        split["grad_bias"] = sum_dy.to(pdtype)
        whole["grad_weight"], whole["grad_bias"] = gw, gb
    # Pieces concatenated have their own strides: values are compared here, layouts by
    # the tests of each op.
    _assert_agree(
        {k: v.contiguous().cpu() for k, v in whole.items()},
        {k: v.contiguous().cpu() for k, v in split.items()},
        dtype,
        f"split {shape} {layout} {dtype}",
    )
    if rm0 is not None:
        exact = _running_reference(x, rm0, rv0, True, MOMENTUM)
        for rm, rv in running:
            _assert_rounded(rm, exact[0], "running_mean")
            _assert_rounded(rv, exact[1], "running_var")


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, MIXED], ids=str)
def test_split_ops_opcheck(layout, dtype):
    x, g, w, b, rm, rv = _split_inputs((4, 8, 6, 6), layout, dtype)
    mean, m2 = stats_op(x)
    count = 3 * x.numel() // 8
    _, save_mean, save_invstd = _batch_stats(x)
    sum_dy, sum_dy_xmu = backward_reduce_op(g, x, save_mean, save_invstd)
    torch.library.opcheck(stats_op, (x,))
    torch.library.opcheck(
        forward_with_stats_op, (x, w, b, rm, rv, mean, 3 * m2, count, MOMENTUM, EPS)
    )
    torch.library.opcheck(backward_reduce_op, (g, x, save_mean, save_invstd))
    torch.library.opcheck(
        backward_elemt_op, (g, x, w, save_mean, save_invstd, sum_dy, sum_dy_xmu, count)
    )
