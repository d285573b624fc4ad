"""torch.func transforms over our modules and ops give what they give over torch's: grad,
vjp and jacrev (reverse mode, the backward recorded for a second pass), jvp and jacfwd
(forward mode), hessian (forward over reverse), in training without running statistics
(with them, torch's own module mutates captured buffers, which the transforms refuse) and
in evaluation; and vmap (the batching rules) over every combination of batched arguments,
model ensembles and per-sample gradients."""

import copy

import pytest
import torch
import torch_batchnorm as tbn
from conftest import LAYOUTS, layout_applies, make_input, make_pair, randomize_state
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    stack_module_state,
    vjp,
    vmap,
)
from torch.utils._pytree import tree_leaves, tree_map

SHAPES = [(6, 3), (3, 4, 5), (2, 3, 4, 3), (2, 3, 2, 3, 2)]


def _transforms(x, tangent, params):
    """name -> transform of a function of (x, params) to a tensor or a tuple of them."""

    def loss(f):
        return lambda x, params: (f(x, params) ** 3).sum()

    return {
        "grad": lambda f: grad(loss(f), argnums=(0, 1))(x, params),
        "vjp": lambda f: vjp(lambda x: f(x, {}), x)[1](tangent),
        "jvp": lambda f: jvp(lambda x: f(x, {}), (x,), (tangent,)),
        "jacrev": lambda f: jacrev(lambda x: f(x, {}).sum(0))(x),
        "jacfwd": lambda f: jacfwd(lambda x: f(x, {}).sum(0))(x),
        "hessian": lambda f: hessian(lambda x: loss(f)(x, {}))(x),
    }


@pytest.mark.parametrize("transform", list(_transforms(None, None, None)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_transform_matches_torch(shape, layout, training, transform, device):
    if not layout_applies(layout, len(shape)):
        pytest.skip("layout does not apply to this shape")
    # torch's answer comes from its CPU kernels: on CUDA, torch's batch norm refuses vmap
    # (under jacrev, jacfwd and hessian) over channels-last inputs ("NYI: querying
    # is_contiguous inside of vmap"). Both run in float64 on the same values.
    ref, ours = make_pair(len(shape), shape[1], track_running_stats=not training)
    ref, ours = ref.double().train(training), ours.double().to(device).train(training)

    def run(module, device):
        generator = torch.Generator().manual_seed(0)
        leaf, view = make_input(shape, layout, torch.float64, device, generator=generator)
        x = view(leaf)
        tangent = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device)
        params = {name: p.detach().to(device) for name, p in ref.named_parameters()}

        def call(x, passed):
            # Parameters passed in (to be differentiated) replace the module's.
            return functional_call(module, {**params, **passed}, (x,))

        result = _transforms(x, tangent, params)[transform](call)
        tensors = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        assert all(t.device == x.device for t in tensors)
        return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, result)

    torch.testing.assert_close(run(ours, device), run(ref, "cpu"))


# (id, in_dims of (input, weight, bias, running_mean, running_var), training, whether
# running statistics are passed): the arguments that can carry the vmapped dim, alone and
# together, as torch's batching rule takes them.
VMAP_CASES = [
    ("input_eval", (0, None, None, None, None), False, True),
    ("input_at_dim_2_eval", (2, None, None, None, None), False, True),
    ("input_train", (0, None, None, None, None), True, False),
    ("input_and_stats_train", (0, None, None, 0, 0), True, True),
    ("input_and_stats_eval", (0, None, None, 0, 0), False, True),
    ("input_and_weight_eval", (0, 0, None, None, None), False, True),
    ("everything_train", (0, 0, 0, 0, 0), True, True),
    ("stats_only_train", (None, None, None, 0, 0), True, True),
    ("weight_and_bias_only_train", (None, 0, 0, None, None), True, True),
    ("input_with_shared_stats_train", (0, None, None, None, None), True, True),  # an error
]


def _outcome(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - errors are compared with torch's
        return type(e), str(e)


def _vmap_call(batch_norm, args, in_dims, training):
    """The outcome of vmap over `batch_norm` on copies of `args`, and the copies."""
    args = [t if t is None else t.clone() for t in args]

    def fn(x, weight, bias, mean, var):
        return batch_norm(x, mean, var, weight, bias, training=training)

    dims = tuple(None if t is None else d for t, d in zip(args, in_dims))
    return _outcome(lambda: vmap(fn, in_dims=dims)(*args)), args


@pytest.mark.parametrize("case", VMAP_CASES, ids=[c[0] for c in VMAP_CASES])
def test_vmap_matches_torch(case):
    """Outputs, errors and updated running statistics of torch.vmap over the functional
    form, against torch's."""
    _, in_dims, training, with_stats = case
    size = 5
    generator = torch.Generator().manual_seed(0)

    def draw(*shape, low=None):
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        return t.abs() + low if low is not None else t

    def batched(t, bdim):
        # Slices that differ, so that each must get statistics of its own.
        return t if bdim is None else torch.stack([t * (1 + 0.1 * i) for i in range(size)], bdim)

    unbatched = [draw(4, 3, 6), draw(3, low=0.5), draw(3), draw(3), draw(3, low=0.5)]
    if not with_stats:
        unbatched[3:] = [None, None]
    args = [t if t is None else batched(t, d) for t, d in zip(unbatched, in_dims)]
    results = [
        _vmap_call(batch_norm, args, in_dims, training)
        for batch_norm in (torch.nn.functional.batch_norm, tbn.functional.batch_norm)
    ]
    (expected, expected_args), (actual, actual_args) = results
    if isinstance(expected, tuple):
        assert actual == expected
        return
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_args, expected_args):
        if e is not None:
            torch.testing.assert_close(a, e)


def test_vmap_statistics_batched_at_another_dim():
    """Running statistics vmapped along their dim 1 are updated slice by slice (torch's
    own rule leaves them untouched there)."""
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    mean, var = torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
    vmap(
        lambda m, v: tbn.functional.batch_norm(x, m, v, training=True, momentum=0.5),
        in_dims=(1, 1),
    )(mean, var)
    torch.testing.assert_close(mean, (0.5 * x.mean((0, 2)))[:, None].expand(3, 5))
    torch.testing.assert_close(var, (0.5 + 0.5 * x.var((0, 2)))[:, None].expand(3, 5))


def test_ensemble_and_per_sample_gradients():
    """The two uses torch.func documents: a vmapped ensemble of modules
    (stack_module_state), training and evaluation, and per-sample gradients in
    evaluation (vmap of grad)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64)
    results = [_ensemble_and_per_sample(cls, x) for cls in (torch.nn.BatchNorm2d, tbn.BatchNorm2d)]
    for actual, expected in zip(*reversed(results)):
        torch.testing.assert_close(actual, expected)


def _ensemble_and_per_sample(cls, x):
    torch.manual_seed(1)
    models = [cls(4, dtype=torch.float64) for _ in range(3)]
    for m in models:
        randomize_state(m)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def ensemble(params, buffers, x):
        return functional_call(base, (params, buffers), (x,))

    train = vmap(ensemble, in_dims=(0, 0, None))(params, buffers, x)
    base.eval()
    evaluation = vmap(ensemble, in_dims=(0, 0, None))(params, buffers, x)
    single = models[0].eval()

    def loss(weight, sample):
        return (functional_call(single, {"weight": weight}, (sample[None],)) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(single.weight.detach(), x)
    return (train, evaluation, per_sample, *buffers.values())
