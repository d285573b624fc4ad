"""The LibTorch side of the pip-installed package, from outside: examples/cpp is configured
with nothing but ``find_package(TorchBatchNorm)`` and the two prefixes a pip install
provides (``torch.utils.cmake_prefix_path`` and ``torch_batchnorm.cmake_prefix_path``),
built, and run; then state crosses between Python and C++ both ways through torch.save
files.

Building the example takes about a minute; the test skips when no CMake or C++ compiler
is installed.
"""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch_batchnorm
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cpp"

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or (shutil.which("c++") or shutil.which("g++")) is None,
    reason="needs cmake and a C++ compiler",
)


def _python_state():
    """examples/cpp/python_state.py: the Python twin of the C++ example network."""
    spec = importlib.util.spec_from_file_location("python_state", EXAMPLE / "python_state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("example_build")
    prefixes = f"{torch.utils.cmake_prefix_path};{torch_batchnorm.cmake_prefix_path}"
    configure = ["cmake", "-S", str(EXAMPLE), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefixes}"]
    configure += ["-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    jobs = os.environ.get("MAX_JOBS", "2")
    for cmd in (configure, ["cmake", "--build", str(build), "--parallel", jobs]):
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, (
            f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return build


def _run(cmd):
    result = subprocess.run(
        [str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"{cmd[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def test_python_state_loads_into_cpp_modules(example_build, tmp_path):
    # torch.nn's BatchNorm2d state from Python, evaluated by torch_batchnorm::BatchNorm2d in
    # C++: load_python_state exits non-zero unless it reproduces Python's output.
    _python_state().save(tmp_path)
    out = _run(
        [example_build / "load_python_state", tmp_path / "net_state.pt", tmp_path / "reference.pt"]
    )
    assert "has seen 5 batches" in out


def test_cpp_training_state_loads_into_torch_nn(example_build, tmp_path):
    # train_convnet exits non-zero unless its loss falls.
    state = tmp_path / "convnet_state.pt"
    out = _run([example_build / "train_convnet", "--save", state])
    assert "loss" in out
    net = _python_state().make_net()
    net.load_state_dict(torch.load(state))  # strict, with torch.load's weights_only default
    batchnorms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 2
    for bn in batchnorms:
        assert int(bn.num_batches_tracked) == 40
        assert bn.running_var.min() > 0
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_ordered_dict_state_is_refused_with_a_hint(example_build, tmp_path):
    # torch.save(model.state_dict()) pickles a collections.OrderedDict, which LibTorch's
    # unpickler cannot rebuild: the error says what to save instead.
    python_state = _python_state()
    python_state.save(tmp_path)
    torch.save(python_state.make_net().state_dict(), tmp_path / "ordered.pt")
    result = subprocess.run(
        [
            str(example_build / "load_python_state"),
            str(tmp_path / "ordered.pt"),
            str(tmp_path / "reference.pt"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "save dict(model.state_dict()) instead" in result.stderr
