"""torch.func transforms over our modules give what they give over torch's: grad, vjp
and jacrev (reverse mode, the backward recorded for a second pass), jvp and jacfwd
(forward mode), hessian (forward over reverse), in training without running statistics
(with them, torch's own module mutates captured buffers, which the transforms refuse) and
in evaluation."""

import pytest
import torch
from conftest import LAYOUTS, layout_applies, make_input, make_pair
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp

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
def test_transform_matches_torch(shape, layout, training, transform):
    if not layout_applies(layout, len(shape)):
        pytest.skip("layout does not apply to this shape")
    ref, ours = make_pair(len(shape), shape[1], track_running_stats=not training)
    ref, ours = ref.double().train(training), ours.double().train(training)
    generator = torch.Generator().manual_seed(0)
    leaf, view = make_input(shape, layout, torch.float64, "cpu", generator=generator)
    x = view(leaf)
    tangent = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    params = {name: p.detach() for name, p in ref.named_parameters()}

    def call(module):
        # Parameters passed in (to be differentiated) replace the module's.
        return lambda x, passed: functional_call(module, {**params, **passed}, (x,))

    run = _transforms(x, tangent, params)[transform]
    torch.testing.assert_close(run(call(ours)), run(call(ref)))
