"""torch's own BatchNorm module test inputs (torch.testing._internal.common_modules,
module_db entries for nn.BatchNorm1d/2d/3d): every sample, built with the same
constructor arguments as torch's module and ours, gives the same outputs, input and
parameter gradients and buffers, in training and evaluation, in float32 and float64."""

import pytest
import torch
from conftest import OUR_CLASSES, assert_close, assert_same_state, single_threaded

# Needs expecttest installed (a dependency of torch's test utilities).
# torch's test helpers need expecttest (installed by scripts/setup_env.sh; a GPU machine
# with torch preinstalled may lack it).
pytest.importorskip("expecttest")
from torch.testing._internal.common_modules import module_db  # noqa: E402

MODULE_INFOS = [info for info in module_db if info.module_cls in OUR_CLASSES]


def _samples(info, dtype, training):
    torch.manual_seed(0)
    return info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=training
    )


def _clone_input(x):
    return x.detach().clone().requires_grad_(x.requires_grad)


def test_module_db_has_batchnorm():
    assert {info.module_cls for info in MODULE_INFOS} == set(OUR_CLASSES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda info: info.name)
def test_module_inputs(info, training, dtype):
    samples = _samples(info, dtype, training)
    assert samples
    for sample in samples:
        ctor, fwd = sample.constructor_input, sample.forward_input
        msg = f"{info.name} {sample.desc or 'default'}: "
        ref = info.module_cls(*ctor.args, **ctor.kwargs).to(dtype).train(training)
        ours = OUR_CLASSES[info.module_cls](*ctor.args, **ctor.kwargs).to(dtype).train(training)
        ours.load_state_dict(ref.state_dict())
        # Two steps, so the second runs with the statistics the first one updated.
        for step in range(2):
            args = [_clone_input(a) for a in fwd.args]
            ours_args = [_clone_input(a) for a in fwd.args]
            with single_threaded():
                expected = ref(*args, **fwd.kwargs)
            actual = ours(*ours_args, **fwd.kwargs)
            assert_close(actual, expected, f"{msg}step {step} output")
            grad_out = torch.randn_like(expected)
            for module, out in ((ref, expected), (ours, actual)):
                module.zero_grad()
                out.backward(grad_out)
            for a, b in zip(ours_args, args):
                assert_close(a.grad, b.grad, f"{msg}step {step} input grad")
            for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
                assert_close(p_ours.grad, p_ref.grad, f"{msg}step {step} {name} grad")
            assert_same_state(ours, ref, f"{msg}step {step} ")
