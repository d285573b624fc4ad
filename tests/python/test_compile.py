"""torch.compile(fullgraph=True) and torch.export trace the ops through their fake kernels
and the C++ autograd kernel: a compiled training step (forward, backward, running
statistics, momentum=None included) and a compiled evaluation match torch's BatchNorm
run eagerly, compiled autograd records the backward of an eager forward,
torch.fx.symbolic_trace keeps the layers whole as it keeps torch's, and torch.jit.script
compiles the modules; torch.onnx.export writes ONNX's batch normalization for them. Few
cases, since every compilation takes seconds."""

import copy
import io
import re
import warnings

import pytest
import torch
import torch_batchnorm as tbn
from conftest import assert_close
from torch.export import Dim


class Net(torch.nn.Module):
    """conv-bn-relu, then a BatchNorm1d with momentum=None (a cumulative average, which
    torch's own module cannot compile with fullgraph=True) on the features. The
    layers before a BatchNorm have no bias, as in real networks: in training its gradient
    is zero, and two computations of it differ only by rounding noise."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 5 * 5, 5, bias=False)
        self.bn1d = torch.nn.BatchNorm1d(5, momentum=None)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(self.head(x.flatten(1)))


def _pair():
    torch.manual_seed(0)
    ref = Net()
    return ref, tbn.convert_batchnorm(copy.deepcopy(ref))


def _train_step(model, x):
    model.zero_grad()
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss.backward()
    return out.detach()


def _assert_same(ours, ref):
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        assert_close(p_ours.grad, p_ref.grad, f"{name} grad")
    for (name, b_ref), b_ours in zip(ref.named_buffers(), ours.buffers()):
        if b_ref.is_floating_point():
            assert_close(b_ours, b_ref, name)
        else:
            assert torch.equal(b_ours, b_ref), name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_train_step(backend):
    ref, ours = _pair()
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    for step in range(3):
        x = torch.randn(6, 3, 5, 5).to(memory_format=torch.channels_last) * 2 + 1
        assert_close(_train_step(compiled, x), _train_step(ref, x), f"step {step} output")
        _assert_same(ours, ref)
    assert ours.bn1d.num_batches_tracked.item() == 3


@pytest.mark.parametrize("transform", ["aot_eager", "inductor", "fx"])
def test_cumulative_average_as_eager(transform):
    """With momentum=None, a compiled or FX-traced module updates the running statistics
    to the bit as it does eagerly: the same update as the kernels', m * batch + (1 - m) *
    running with m = 1 / count rounded from a double. (running + (batch - running) / count,
    the same average, was one unit in the last place off in 12 of these 16 channels.)"""
    torch.manual_seed(0)
    batches = [torch.randn(8, 16, 5, 5) * 3 + 1 for _ in range(5)]
    eager = tbn.BatchNorm2d(16, momentum=None)
    module = copy.deepcopy(eager)
    if transform == "fx":
        run = module = torch.fx.symbolic_trace(module)
    else:
        run = torch.compile(module, backend=transform, fullgraph=True)
    for x in batches:
        eager(x)
        run(x)
    for name, buffer in eager.named_buffers():
        assert torch.equal(module.get_buffer(name), buffer), name


def _trained_pair_in_eval():
    """The pair after one training step (running statistics moved), in eval mode."""
    ref, ours = _pair()
    x = torch.randn(6, 3, 5, 5)
    for model in (ref, ours):
        _train_step(model, x)
        model.eval()
    return ref, ours


def test_compiled_eval():
    ref, ours = _trained_pair_in_eval()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 3, 5, 5)
    with torch.no_grad():
        assert_close(compiled(x), ref(x), "output")


@pytest.mark.parametrize("transform", ["compile", "script"])
def test_frozen_training(transform):
    """A frozen net trains, compiled (fullgraph=True) or scripted, as torch's does with
    its BatchNorm layers in eval mode: running statistics stay, gradients flow."""
    ref, ours = _trained_pair_in_eval()
    ref.bn.eval()
    ref.bn1d.eval()
    ours.bn.freeze()
    ours.bn1d.freeze()
    ours.train()
    if transform == "compile":
        run = torch.compile(ours, backend="aot_eager", fullgraph=True)
    else:
        run = torch.jit.script(ours)
    for step in range(2):
        x = torch.randn(6, 3, 5, 5) * 2 + 1
        assert_close(_train_step(run, x), _train_step(ref, x), f"step {step} output")
        _assert_same(ours, ref)
    assert ours.bn1d.num_batches_tracked.item() == 1


def test_export_eval():
    ref, ours = _trained_pair_in_eval()
    x = torch.randn(4, 3, 5, 5)
    program = torch.export.export(ours, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "torch_batchnorm.batch_norm_forward.default" in targets
    with torch.no_grad():
        assert_close(program.module()(x), ref(x), "output")


def test_export_train():
    """torch.export of a training net (torch's own modules fail to export momentum=None
    there): the exported program trains as torch's modules, running statistics and
    num_batches_tracked included, and exporting changes no buffer."""
    ref, ours = _pair()
    state = copy.deepcopy(ours.state_dict())
    program = torch.export.export(ours, (torch.randn(6, 3, 5, 5),))
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    exported = program.module()
    for step in range(3):
        x = torch.randn(6, 3, 5, 5) * 2 + 1
        assert_close(_train_step(exported, x), _train_step(ref, x), f"step {step} output")
        _assert_same(exported, ref)
    assert exported.bn1d.num_batches_tracked.item() == 3


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("transform", ["compile", "export"])
def test_rejected_while_traced(transform, training, dynamic):
    """A layer of 3 channels given 4: torch.compile and torch.export fail while they trace
    it, with the exception and words of torch's (the op's validation routine runs in its
    fake kernel), rather than as a program that fails when it runs or, compiled, as an
    error about the gradients it was traced to have. With dynamic shapes too, where the
    routine reads the symbolic sizes as the traced call's."""

    def trace(cls):
        layer = cls(3).train(training)
        x = torch.randn(4, 4, 5, 5)
        if transform == "export":
            dims = {0: Dim("n"), 2: Dim("h"), 3: Dim("w")} if dynamic else None
            torch.export.export(layer, (x,), dynamic_shapes=(dims,))
        else:
            torch._dynamo.reset()
            torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=dynamic)(x)

    errors = []
    for cls in (torch.nn.BatchNorm2d, tbn.BatchNorm2d):
        with pytest.raises(Exception) as info:
            trace(cls)
        errors.append((info.type, str(info.value)))
    (torch_type, torch_message), (ours_type, ours_message) = errors
    assert ours_type is torch_type
    # Compiled with dynamic shapes, torch's words name the channel count by its symbol;
    # ours give its value in the call.
    assert re.search(r"running_mean should contain (4|s\d+) elements not 3", torch_message)
    assert "running_mean should contain 4 elements not 3" in ours_message


@pytest.mark.parametrize("dynamic", ["all", "weight_stride"])
def test_valid_calls_trace_with_symbolic_shapes(dynamic):
    """Calls with a symbolic size, stride or offset pass the fake kernels' validation, which
    reads them as the traced call's, and run as eagerly: a compiled call with dynamic
    shapes, and one whose sizes are static but whose weight, a column of a table of dynamic
    width, has a symbolic stride."""

    def fn(x, table):
        return tbn.functional.batch_norm(x, None, None, table[:, 0], None, training=True)

    x, table = torch.randn(4, 3, 5), torch.rand(3, 6)
    torch._dynamo.reset()
    if dynamic == "weight_stride":
        torch._dynamo.mark_dynamic(table, 1)
    compiled = torch.compile(
        fn, backend="aot_eager", fullgraph=True, dynamic=True if dynamic == "all" else None
    )
    assert_close(compiled(x, table), fn(x, table), "output")


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export", "torch.jit.trace"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_onnx_export(training, dynamo):
    """torch.onnx.export, with either of its exporters, writes for our layers the graph it
    writes for torch's (which the exporters fold into the convolutions), onnxruntime runs it
    to the same outputs, and exporting changes no buffer. In training both export what
    evaluation computes, as torch's exporters do for torch's layers."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    ref, ours = _trained_pair_in_eval()
    # torch's own layer cannot export a momentum=None average in training (see Net).
    ref.bn1d.momentum = ours.bn1d.momentum = 0.1
    x = torch.randn(4, 3, 5, 5)

    def run_exported(model):
        model.train(training)
        state = copy.deepcopy(model.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' notes on training and deprecation
            if dynamo:
                proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
            else:
                f = io.BytesIO()
                torch.onnx.export(model, (x,), f, dynamo=False)
                proto = onnx.load_from_string(f.getvalue())
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        session = onnxruntime.InferenceSession(proto.SerializeToString())
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        return [node.op_type for node in proto.graph.node], torch.from_numpy(out)

    nodes, out = run_exported(ours)
    nodes_ref, out_ref = run_exported(ref)
    assert nodes == nodes_ref
    assert_close(out, out_ref, "output")
    with torch.no_grad():
        assert_close(out, ours.eval()(x), "output of the module in evaluation")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(training):
    """torch.fx.symbolic_trace (as torchvision's feature extraction and FX passes use it)
    keeps our modules whole, as it keeps torch's: tracing changes no buffer, the graph
    trains (running statistics, momentum=None included) as the module, and the graph
    module's train() and eval() still switch its BatchNorm layers."""
    ref, ours = _pair()
    ref.train(training)
    ours.train(training)
    state = copy.deepcopy(ours.state_dict())
    graph = torch.fx.symbolic_trace(ours)
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    leaves = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert leaves == [
        n.target for n in torch.fx.symbolic_trace(ref).graph.nodes if n.op == "call_module"
    ]
    assert {"bn", "bn1d"} <= set(leaves)
    for mode in (training, not training):
        graph.train(mode)
        ref.train(mode)
        for step in range(2):
            x = torch.randn(6, 3, 5, 5) * 2 + 1
            assert_close(_train_step(graph, x), _train_step(ref, x), f"{mode} step {step} output")
            _assert_same(graph, ref)


def _hooked(bn):
    bn.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    bn.register_forward_hook(lambda module, args, out: out * 2)
    return bn


@pytest.mark.parametrize("cls", [tbn.BatchNorm2d, tbn.SyncBatchNorm])
@pytest.mark.parametrize("hooks", [False, True], ids=["plain", "hooks"])
def test_fx_symbolic_trace_layer(hooks, cls):
    """Traced in a network, a BatchNorm layer (SyncBatchNorm included) gives the graph
    what torch's gives, mode switches and hooks included (they run once). Without hooks
    it is a leaf, as torch's is; with them, the graph runs the hooks and calls its
    forward."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 1)
    ref = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(3))
    ours = torch.nn.Sequential(copy.deepcopy(conv), cls(3))
    if hooks:
        _hooked(ref[1])
        _hooked(ours[1])
    graph = torch.fx.symbolic_trace(ours)
    leaves = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert ("1" in leaves) != hooks
    for mode in (True, False, True):
        graph.train(mode)
        ref.train(mode)
        x = torch.randn(6, 3, 5, 5) * 2 + 1
        assert_close(graph(x), ref(x), f"training={mode}")
        for name, buffer in ref[1].named_buffers():
            if buffer.is_floating_point():
                assert_close(graph.get_buffer(f"1.{name}"), buffer, name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_root(training):
    """A BatchNorm traced as the root module is recorded in the mode it is traced in, as
    torch's is, with its buffers as nodes of the graph, which updates them."""
    ref, ours = _pair()
    ref.bn1d.train(training)
    ours.bn1d.train(training)
    graph = torch.fx.symbolic_trace(ours.bn1d)
    for step in range(3):
        x = torch.randn(6, 5) * 2 + 1
        assert_close(graph(x), ref.bn1d(x), f"step {step} output")
        for name, buffer in ref.bn1d.named_buffers():
            if buffer.is_floating_point():
                assert_close(graph.get_buffer(name), buffer, name)
            else:
                assert torch.equal(graph.get_buffer(name), buffer), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript(training):
    """torch.jit.script compiles our modules, leaving the eager model as it was: the
    program trains (running statistics, momentum=None included) as torch's modules do,
    shares the eager modules' parameters and buffers, and saves and loads."""
    ref, ours = _pair()
    ref.train(training)
    ours.train(training)
    modules = dict(ours.named_modules())
    scripted = torch.jit.script(ours)
    assert dict(ours.named_modules()) == modules, "scripting replaced modules of the model"
    for step in range(2):
        x = torch.randn(6, 3, 5, 5) * 2 + 1
        assert_close(_train_step(scripted, x), _train_step(ref, x), f"step {step} output")
        _assert_same(scripted, ref)
    _assert_same(ours, ref)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    assert_close(_train_step(loaded, x), _train_step(ref, x), "output after loading")
    _assert_same(loaded, ref)


class _WiderBatchNorm2d(tbn.BatchNorm2d):
    """A subclass that also takes 3-D input and adds a constant and a method, as subclasses
    of torch's modules in the wild do."""

    __constants__ = tbn.BatchNorm2d.__constants__ + ["min_dim"]
    min_dim = 3

    def _check_input_dim(self, input):
        if input.dim() < self.min_dim or input.dim() > 4:
            raise ValueError(f"expected 3D or 4D input (got {input.dim()}D input)")

    @torch.jit.export
    def channels(self) -> int:
        return self.num_features


def test_torchscript_subclass():
    """Scripted, a subclass of ours keeps its overrides, constants and methods."""
    ours = _WiderBatchNorm2d(3)
    ref = torch.nn.BatchNorm1d(3)
    scripted = torch.jit.script(ours)
    assert scripted.channels() == 3
    for step in range(2):
        x = torch.randn(4, 3, 5) * 2 + 1
        assert_close(scripted(x), ref(x), f"step {step} output")
    assert_close(ours.running_var, ref.running_var, "running_var")


TORCHSCRIPT_ERRORS = [
    ("wrong_dim", 2, {}, (3, 4, 4)),
    ("one_value_per_channel", 1, {}, (1, 3)),
    ("wrong_channel_count", 2, {}, (2, 4, 3, 3)),
    ("eps_zero", 1, {"eps": 0.0}, (4, 3)),
]


@pytest.mark.parametrize(
    "dims,kwargs,shape", [c[1:] for c in TORCHSCRIPT_ERRORS], ids=[c[0] for c in TORCHSCRIPT_ERRORS]
)
def test_torchscript_errors(dims, kwargs, shape):
    """Scripted, ours raise what torch's scripted modules raise, and change no buffer."""
    x = torch.randn(shape)

    def raised(module):
        with pytest.raises(Exception) as info:
            module(x)
        return type(info.value), str(info.value).strip().splitlines()[-1]

    ours = getattr(tbn, f"BatchNorm{dims}d")(3, **kwargs)
    state = copy.deepcopy(ours.state_dict())
    expected = raised(torch.jit.script(getattr(torch.nn, f"BatchNorm{dims}d")(3, **kwargs)))
    assert raised(torch.jit.script(ours)) == expected
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


class _OwnLayer(torch.nn.Module):
    """A layer of one's own over our functional form, with running statistics."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.bias = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3))
        self.register_buffer("running_mean", torch.zeros(3))
        self.register_buffer("running_var", torch.ones(3))

    def forward(self, x):
        return tbn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.3
        )


class _OwnTorchLayer(_OwnLayer):
    """The same over torch's functional form."""

    def forward(self, x):
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.3
        )


def test_torchscript_functional():
    """torch.jit.script compiles a layer over our functional form as it compiles one over
    torch's: the same outputs, gradients and running statistics in training and
    evaluation, and the same error for one value per channel."""
    ours, ref = torch.jit.script(_OwnLayer()), torch.jit.script(_OwnTorchLayer())
    for step, training in enumerate((True, True, False)):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        results = []
        for m in (ours, ref):
            m.train(training)
            m.zero_grad()
            out = m(x)
            out.pow(2).sum().backward()
            results.append([out, m.weight.grad, m.bias.grad, m.running_mean, m.running_var])
        names = ["output", "weight grad", "bias grad", "running_mean", "running_var"]
        for name, a, b in zip(names, *results):
            assert_close(a, b, f"step {step} {name}")
    errors = []
    for m in (ours, ref):
        m.train()
        with pytest.raises(Exception) as info:
            m(torch.randn(1, 3))
        errors.append((type(info.value), str(info.value).strip().splitlines()[-1]))
    assert errors[0] == errors[1]


class _ShapedAffine(torch.nn.Module):
    """The functional form with parameters kept as [1, C, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x):
        return tbn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True)


@pytest.mark.parametrize(
    "transform", [torch.fx.symbolic_trace, torch.jit.script], ids=["fx", "script"]
)
def test_parameters_of_any_shape(transform):
    """Traced (proxies of unknown rank then) or scripted, parameters of any shape holding C
    values give the eager module's outputs and gradients (torch's backward refuses them)."""
    module = _ShapedAffine()
    graph = transform(module)
    x = torch.randn(4, 3, 5, 5)
    grads = []
    for m in (module, graph):
        m.zero_grad()
        out = m(x)
        out.pow(2).sum().backward()
        grads.append((out.detach(), module.weight.grad.clone(), module.bias.grad.clone()))
    for name, a, b in zip(("output", "weight grad", "bias grad"), *grads):
        assert_close(a, b, name)


# Our backward node speaks compiled autograd's interface as of torch 2.13.
COMPILED_AUTOGRAD = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)


@pytest.mark.skipif(not COMPILED_AUTOGRAD, reason="compiled autograd support needs torch >= 2.13")
@pytest.mark.parametrize("training", [True, False])
def test_compiled_autograd(training):
    """The forward runs eagerly and records our backward node; compiled autograd turns the
    whole backward into one graph, with the node as a call in it."""
    ref, ours = _trained_pair_in_eval()
    graphs = []

    def compiler(gm):
        graphs.append(gm.code)
        return torch.compile(gm, backend="aot_eager", fullgraph=True)

    for model in (ref, ours):
        model.train(training)
    for step in range(2):
        x = torch.randn(6, 3, 5, 5) * 2 + 1
        expected = _train_step(ref, x)
        with torch._dynamo.compiled_autograd._enable(compiler):
            assert_close(_train_step(ours, x), expected, f"step {step} output")
        _assert_same(ours, ref)
    assert graphs and all("BatchNormBackward" in code for code in graphs)


@pytest.mark.skipif(not COMPILED_AUTOGRAD, reason="compiled autograd support needs torch >= 2.13")
@pytest.mark.parametrize("training", [True, False])
def test_compiled_autograd_second_derivative(training):
    """A gradient penalty (backward of a gradient taken with create_graph=True) under
    compiled autograd: the graph of the first backward is compiled with the derivatives
    of its batch_norm_backward, and the second runs through it."""
    ref, ours = _trained_pair_in_eval()

    def compiler(gm):
        return torch.compile(gm, backend="aot_eager", fullgraph=True)

    def penalty_step(model, x):
        model.zero_grad()
        x = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad((model(x) ** 2).sum(), x, create_graph=True)
        (grad_x**2).sum().backward()
        return x.grad

    for model in (ref, ours):
        model.train(training)
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    expected = penalty_step(ref, x)
    with torch._dynamo.compiled_autograd._enable(compiler):
        assert_close(penalty_step(ours, x), expected, "input grad")
    _assert_same(ours, ref)


def test_torch_function_sees_the_op():
    """Eager calls skip torch.ops' Python entry; __torch_function__ (modes, tensor
    subclasses, FX proxies) must still see the op."""
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    bn = tbn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with Record():
        out = bn(x)
    assert torch.ops.torch_batchnorm.batch_norm_forward.default in seen
    assert_close(out, torch.nn.functional.batch_norm(x, None, None, training=True), "output")

    traced = torch.fx.symbolic_trace(
        lambda x: tbn.functional.batch_norm(x, None, None, training=True)
    )
    assert_close(traced(x), out, "traced output")
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert torch.ops.torch_batchnorm.batch_norm_forward.default in targets
