"""Quick parity check of the torch_batchnorm CPU kernels against torch, for use while
tuning the kernels (the test suite under tests/ is the thorough one).

Covers NCHW, channels_last, channels_last_3d, 2D [N, C] and non-contiguous inputs in
float32, float64, bfloat16 (same-dtype and float parameters), training and evaluation,
and checks outputs, saved statistics, running statistics and all three gradients. It also
checks that results are bitwise identical for every thread count and that large-mean
inputs keep their precision. Exits non-zero on the first mismatch.

    python benchmarks/check_parity.py
"""

import argparse
import itertools
import sys

import torch
import torch_batchnorm  # noqa: F401  (registers the ops)

OPS = torch.ops.torch_batchnorm

# (shape, memory format): layouts the kernels treat differently, and sizes that exercise
# the tails of vector loops, several reduction pieces, and channels-last blocks.
SHAPES = [
    ((4, 10), None),
    ((3, 1), None),
    ((256, 37), None),
    ((4096, 64), None),
    ((4, 5, 3), None),
    ((2, 3, 6, 6), None),
    ((8, 16, 4, 4), None),
    ((8, 16, 4, 4), torch.channels_last),
    ((4, 9, 1, 1), torch.channels_last),
    ((4, 1, 9, 9), None),
    ((5, 7, 13, 11), None),
    ((5, 7, 13, 11), torch.channels_last),
    ((3, 67, 33, 35), None),
    ((3, 67, 33, 35), torch.channels_last),
    ((2, 3, 4, 4, 4), None),
    ((2, 6, 3, 5, 7), torch.channels_last_3d),
    ((64, 3, 70, 70), None),
    ((2, 1030, 3, 3), torch.channels_last),
]

# Tolerances against torch (float32 and bf16 statistics differ from torch's double
# accumulation by rounding only).
TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-10},
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def make_input(shape, fmt, dtype, noncontig=False, mean=0.0):
    x = torch.randn(shape, dtype=torch.float64) * 2 + mean
    x = x.to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    if noncontig:
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x


def run_pair(x, training, param_dtype, affine, track, threads, value_dtype=None):
    # value_dtype: round the parameters through it first (a float64 reference run of a
    # bfloat16 case sees the same parameter values).
    torch.set_num_threads(threads)
    C = x.shape[1]
    value_dtype = value_dtype or param_dtype

    def param(t):
        return t.to(value_dtype).to(param_dtype)

    results = []
    for impl in ("torch", "ours"):
        torch.manual_seed(1)
        w = param(torch.rand(C, dtype=torch.float64) + 0.5) if affine else None
        b = param(torch.randn(C, dtype=torch.float64)) if affine else None
        rm = param(torch.randn(C, dtype=torch.float64)) if track else None
        rv = param(torch.rand(C, dtype=torch.float64) + 0.5) if track else None
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        params = [p.requires_grad_(True) for p in (w, b) if p is not None]
        torch.manual_seed(3)
        g = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
        if impl == "torch":
            y = torch.nn.functional.batch_norm(xi, rm, rv, w, b, training, 0.1, 1e-5)
            grads = torch.autograd.grad(y, [xi] + params, g)
        else:
            # The ops themselves, forward then backward, as the autograd kernel calls them.
            with torch.no_grad():
                y, sm, si = OPS.batch_norm_forward(xi, w, b, rm, rv, training, 0.1, 1e-5)
                gi, gw, gb = OPS.batch_norm_backward(
                    g, xi, w, rm, rv, sm, si, training, 1e-5, [True, affine, affine]
                )
            grads = [gi] + ([gw, gb] if affine else [])
        results.append(
            {"y": y.detach(), "grads": grads, "rm": rm, "rv": rv, "layout_cl": _is_cl(y)}
        )
    return results


def _is_cl(t):
    return t.dim() > 2 and t.movedim(1, -1).is_contiguous() and not t.is_contiguous()


def assert_no_worse(ours, torch_result, exact, label):
    # bfloat16 outputs round to 8 bits, and torch's own result is off by up to a few of
    # its ulps: ours must be at least as close to the float64 result, within a factor.
    err_torch = (torch_result.double() - exact).abs().max().item() if exact.numel() else 0.0
    err_ours = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    bound = 2 * err_torch + 1e-3 * (exact.abs().max().item() if exact.numel() else 0.0)
    if err_ours > bound:
        raise AssertionError(f"{label}: max error {err_ours} vs float64, torch's is {err_torch}")


def check_case(x, training, param_dtype, affine, track, label):
    tol = TOL[x.dtype]
    ref, ours = run_pair(x, training, param_dtype, affine, track, threads=torch.get_num_threads())
    if x.dtype == torch.bfloat16:
        exact, _ = run_pair(
            x.double(), training, torch.float64, affine, track, torch.get_num_threads(), param_dtype
        )
        assert_no_worse(ours["y"], ref["y"], exact["y"], f"{label} output")
        for i, (a, b, e) in enumerate(zip(ours["grads"], ref["grads"], exact["grads"])):
            assert_no_worse(a, b, e, f"{label} grad {i}")
    else:
        torch.testing.assert_close(ours["y"], ref["y"], **tol, msg=lambda m: f"{label} output: {m}")
        for i, (a, b) in enumerate(zip(ours["grads"], ref["grads"])):
            gtol = tol if x.dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
            torch.testing.assert_close(a, b, **gtol, msg=lambda m, i=i: f"{label} grad {i}: {m}")
    if track:
        torch.testing.assert_close(
            ours["rm"], ref["rm"], **tol, msg=lambda m: f"{label} running_mean: {m}"
        )
        torch.testing.assert_close(
            ours["rv"], ref["rv"], **tol, msg=lambda m: f"{label} running_var: {m}"
        )
    if x.dim() > 2 and _is_cl(x) and ours["layout_cl"] != ref["layout_cl"]:
        raise AssertionError(f"{label}: output layout differs from torch's")


def check_thread_independence(x, training, param_dtype, label, thread_counts):
    outs = []
    for t in thread_counts:
        torch.set_num_threads(t)
        C = x.shape[1]
        torch.manual_seed(2)
        w = torch.rand(C).to(param_dtype) + 0.5
        b = torch.randn(C).to(param_dtype)
        rm = torch.zeros(C, dtype=param_dtype)
        rv = torch.ones(C, dtype=param_dtype)
        y, sm, si = OPS.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5)
        g = torch.ones_like(y).mul_(0.5).add_(y)
        gi, gw, gb = OPS.batch_norm_backward(
            g, x, w, rm, rv, sm, si, training, 1e-5, [True, True, True]
        )
        outs.append([y, sm, si, rm, rv, gi, gw, gb])
    for t, other in zip(thread_counts[1:], outs[1:]):
        for i, (a, b) in enumerate(zip(outs[0], other)):
            if not torch.equal(a, b) and not (a.numel() == b.numel() == 0):
                raise AssertionError(
                    f"{label}: output {i} differs between {thread_counts[0]} and {t} threads"
                )


def check_large_mean():
    # Inputs with mean 1e4 and unit spread: E[x^2]-E[x]^2 would lose every digit of the
    # variance in float32. The mean must be within 2 float32 ulps of the exact one, the
    # variance close to the exact one.
    for shape, fmt in [
        ((64, 3, 70, 70), None),
        ((64, 3, 70, 70), torch.channels_last),
        ((20000, 8), None),
    ]:
        x = make_input(shape, fmt, torch.float32, mean=1e4)
        C = shape[1]
        _, mean, invstd = OPS.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        exact_mean = x64.mean(dims)
        exact_var = x64.var(dims, unbiased=False)
        ulp = torch.finfo(torch.float32).eps * 2 ** torch.floor(torch.log2(exact_mean.abs()))
        err = (mean.double() - exact_mean).abs()
        if (err > 2 * ulp).any():
            raise AssertionError(f"large mean {shape} {fmt}: mean error {err.max().item()} > 2 ulp")
        var = invstd.double().pow(-2) - 1e-5
        torch.testing.assert_close(
            var,
            exact_var,
            rtol=1e-4,
            atol=0,
            msg=lambda m, shape=shape: f"large mean var {shape}: {m}",
        )
        assert C == mean.numel()


def check_large():
    # Outputs of 64 MiB and more are written with streaming stores. The reference is
    # float64: over 400k rows, torch's own channels-last float32 statistics are off by
    # about 1e-4 here (ours by 1e-6).
    for shape, fmt in [((32, 64, 112, 112), None), ((32, 64, 112, 112), torch.channels_last)]:
        x = make_input(shape, fmt, torch.float32)
        for training in (True, False):
            label = f"large {shape} {fmt} train={training}"
            _, ours = run_pair(x, training, torch.float32, True, True, torch.get_num_threads())
            exact, _ = run_pair(
                x.double(), training, torch.float64, True, True, torch.get_num_threads()
            )
            for name, a, b in [("output", ours["y"], exact["y"])] + [
                (f"grad {i}", g, e) for i, (g, e) in enumerate(zip(ours["grads"], exact["grads"]))
            ]:
                scale = b.abs().max().item()
                torch.testing.assert_close(
                    a.double(),
                    b,
                    rtol=1e-4,
                    atol=1e-5 * scale,
                    msg=lambda m, name=name, label=label: f"{label} {name}: {m}",
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="float32 and bfloat16 only, fewer variants"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    n = 0
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    for (shape, fmt), dtype in itertools.product(SHAPES, dtypes):
        if args.quick and dtype == torch.float64:
            continue
        param_dtypes = [dtype] + ([torch.float32] if dtype == torch.bfloat16 else [])
        for noncontig in (False, True):
            if noncontig and (args.quick or fmt is not None):
                continue
            x = make_input(shape, fmt, dtype, noncontig)
            for training, pdt, affine, track in itertools.product(
                (True, False), param_dtypes, (True, False), (True, False)
            ):
                if not training and not track:
                    continue
                if training and x.numel() // x.shape[1] == 1:
                    continue
                label = f"{tuple(shape)} {fmt} {dtype} params={pdt} train={training} affine={affine} track={track} noncontig={noncontig}"
                check_case(x, training, pdt, affine, track, label)
                n += 1
            if not noncontig and x.numel() // x.shape[1] > 1:
                for pdt in param_dtypes:
                    check_thread_independence(
                        x, True, pdt, f"{tuple(shape)} {fmt} {dtype}", [threads, 1, 3, 7]
                    )
    torch.set_num_threads(threads)
    check_large_mean()
    if not args.quick:
        check_large()
    print(f"parity OK: {n} cases, thread independence and large-mean checks passed")


if __name__ == "__main__":
    sys.exit(main())
