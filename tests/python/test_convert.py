"""convert_batchnorm on a small real CNN: the converted model trains step for step like
the original (losses, parameters, buffers), contiguous and channels-last; state_dicts
move both ways; device, dtype and train/eval modes are kept; repr and isinstance are
torch's."""

import copy

import pytest
import torch
import torch_batchnorm as tbn
from conftest import assert_close, assert_same_state


def make_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 6 * 6, 10),
    )


def _converted_pair(device="cpu", memory_format=torch.contiguous_format):
    ref = make_cnn().to(device=device, memory_format=memory_format)
    ours = tbn.convert_batchnorm(copy.deepcopy(ref))
    return ref, ours


@pytest.mark.parametrize(
    "memory_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["contiguous", "channels_last"],
)
def test_trains_step_for_step(memory_format, device):
    # cuDNN convolutions default to TF32 on Ampere and later, which rounds their inputs to
    # 10 mantissa bits: float32 differences between the two BatchNorms then come back
    # out of the next convolution a thousand times larger. Compare in true float32.
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        _train_step_for_step(memory_format, device)


def _train_step_for_step(memory_format, device):
    ref, ours = _converted_pair(device, memory_format)
    assert sum(isinstance(m, tbn.BatchNorm2d) for m in ours.modules()) == 2
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, ours)]
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(8, 3, 12, 12, generator=generator).to(
            device=device, memory_format=memory_format
        )
        target = torch.randint(0, 10, (8,), generator=generator).to(device)
        losses = []
        for model, optimizer in zip((ref, ours), optimizers):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], f"step {step} loss")
        assert_same_state(ours, ref, f"step {step}: ")
    for model in (ref, ours):
        model.eval()
    x = torch.randn(4, 3, 12, 12, generator=generator).to(
        device=device, memory_format=memory_format
    )
    with torch.no_grad():
        assert_close(ours(x), ref(x), "eval output")


def test_state_dict_both_ways():
    ref, ours = _converted_pair()
    ours.train()
    ours(torch.randn(4, 3, 12, 12))  # moves the running statistics of ours only
    state = ours.state_dict()
    fresh = make_cnn()
    fresh.load_state_dict(state)  # strict: same keys
    assert_same_state(fresh, ours)
    back = tbn.convert_batchnorm(make_cnn())
    back.load_state_dict(fresh.state_dict())
    assert_same_state(back, fresh)
    assert list(back.state_dict()) == list(ref.state_dict())


def test_keeps_device_dtype_and_modes(device):
    model = make_cnn().to(device=device, dtype=torch.float64)
    model.eval()
    model[4].train()  # a mix of modes is kept as it is
    converted = tbn.convert_batchnorm(model)
    bn1, bn2 = converted[1], converted[4]
    assert isinstance(bn1, tbn.BatchNorm2d) and isinstance(bn2, tbn.BatchNorm2d)
    assert (bn1.training, bn2.training) == (False, True)
    for t in list(bn1.parameters()) + [bn1.running_mean, bn1.running_var]:
        assert t.dtype == torch.float64 and t.device.type == torch.device(device).type
    assert bn1.num_batches_tracked.dtype == torch.long


def test_shares_parameters_hooks_and_repr():
    model = make_cnn()
    original = copy.deepcopy(model)
    bn = model[1]
    calls = []
    bn.register_forward_hook(lambda *args: calls.append(1))
    weight = bn.weight
    converted = tbn.convert_batchnorm(model)
    assert converted is model  # converted in place, as the docstring says
    assert converted[1].weight is weight
    converted(torch.randn(2, 3, 12, 12))
    assert calls == [1]
    assert repr(converted) == repr(original)
    assert isinstance(converted[1], torch.nn.BatchNorm2d)
    assert isinstance(converted[1], torch.nn.modules.batchnorm._BatchNorm)


def test_shared_batchnorm_stays_shared():
    """A BatchNorm registered in several places (twice in one container, and in another)
    becomes one module of ours everywhere, as it was one module of torch's."""
    bn = torch.nn.BatchNorm2d(3)
    inner = torch.nn.Sequential(bn)
    model = torch.nn.Sequential(bn, torch.nn.ReLU(), bn, inner)
    tbn.convert_batchnorm(model)
    assert type(model[0]) is tbn.BatchNorm2d
    assert model[0] is model[2] is model[3][0]


def test_converts_in_place():
    """The BatchNorm objects themselves change class: references to them, and the handles
    of hooks registered before, stay valid."""
    bn = torch.nn.BatchNorm2d(3)
    calls = []
    handle = bn.register_forward_hook(lambda *args: calls.append(1))
    assert tbn.convert_batchnorm(bn) is bn
    assert type(bn) is tbn.BatchNorm2d
    x = torch.randn(2, 3, 2, 2)
    bn(x)
    handle.remove()
    bn(x)
    assert calls == [1]


@pytest.mark.parametrize(
    "torch_cls,our_cls",
    [
        (torch.nn.BatchNorm1d, tbn.BatchNorm1d),
        (torch.nn.BatchNorm2d, tbn.BatchNorm2d),
        (torch.nn.BatchNorm3d, tbn.BatchNorm3d),
    ],
)
def test_converts_a_batchnorm_itself(torch_cls, our_cls):
    bn = torch_cls(4, eps=1e-3, momentum=None, affine=False)
    converted = tbn.convert_batchnorm(bn)
    assert type(converted) is our_cls
    assert repr(converted) == repr(bn)
    assert (converted.eps, converted.momentum, converted.affine) == (1e-3, None, False)


def test_converts_lazy_batchnorms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LazyBatchNorm2d())
    tbn.convert_batchnorm(model)
    assert type(model[1]) is tbn.LazyBatchNorm2d
    model(torch.randn(2, 3, 5, 5))
    assert type(model[1]) is tbn.BatchNorm2d and model[1].num_features == 4


def test_leaves_other_batchnorms_alone():
    class CustomBatchNorm(torch.nn.BatchNorm2d):
        pass

    model = torch.nn.Sequential(
        torch.nn.SyncBatchNorm(4),
        CustomBatchNorm(4),
        torch.nn.Sequential(torch.nn.BatchNorm1d(4)),
    )
    tbn.convert_batchnorm(model)
    assert type(model[0]) is torch.nn.SyncBatchNorm
    assert type(model[1]) is CustomBatchNorm
    assert type(model[2][0]) is tbn.BatchNorm1d


def test_conv_bn_folding_for_inference():
    """Folding a trained BatchNorm into the convolution before it works on ours as on
    torch's: torch.nn.utils.fusion directly, torch.ao.quantization.fuse_modules with the
    mapping for our class in its custom config (it looks classes up exactly)."""
    from torch.ao.quantization import fuse_modules
    from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn_relu
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), tbn.BatchNorm2d(4), torch.nn.ReLU()
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    folded = fuse_conv_bn_eval(model[0], model[1])
    torch.testing.assert_close(torch.relu(folded(x)), expected)
    mapping = {(torch.nn.Conv2d, tbn.BatchNorm2d, torch.nn.ReLU): fuse_conv_bn_relu}
    fused = fuse_modules(
        model,
        [["0", "1", "2"]],
        fuse_custom_config_dict={"additional_fuser_method_mapping": mapping},
    )
    torch.testing.assert_close(fused(x), expected)


def test_revert_for_fx_fusion():
    """FX-based fusion looks torch's classes up exactly and leaves ours alone; reverted, our
    layers fold into the convolutions as torch's do, and convert_batchnorm takes them back.
    A frozen layer is refused, and nothing changes."""
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), tbn.BatchNorm2d(4), torch.nn.ReLU(), tbn.BatchNorm2d(4)
    ).eval()
    for bn in (model[1], model[3]):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert sum(isinstance(m, tbn.BatchNorm2d) for m in fuse(model).modules()) == 2

    model[3].freeze()
    with pytest.raises(ValueError, match="1 frozen BatchNorm layer"):
        tbn.revert_batchnorm(model)
    assert type(model[1]) is tbn.BatchNorm2d
    model[3].freeze(False)

    assert tbn.revert_batchnorm(model) is model
    assert [type(m) for m in model] == [
        torch.nn.Conv2d,
        torch.nn.BatchNorm2d,
        torch.nn.ReLU,
        torch.nn.BatchNorm2d,
    ]
    fused = fuse(model)
    # The first folds into the convolution; the second, after the ReLU, stays.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) == 1
    torch.testing.assert_close(fused(x), expected)
    tbn.convert_batchnorm(model)
    assert type(model[1]) is tbn.BatchNorm2d and type(model[3]) is tbn.BatchNorm2d
    torch.testing.assert_close(model(x), expected)
