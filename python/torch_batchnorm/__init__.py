"""BatchNorm for PyTorch as a C++ extension.

Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` backed by hand-written CPU
(OpenMP) and CUDA kernels registered as ``torch.ops.torch_batchnorm.*``.
"""

import os as _os

import torch as _torch

try:
    from . import _C  # noqa: F401  (loads libtorch_batchnorm, which registers the ops)
except ImportError as _err:  # pragma: no cover - only reached on a broken install
    raise ImportError(
        "torch_batchnorm: the compiled library (torch_batchnorm/_C and "
        "torch_batchnorm/lib/libtorch_batchnorm.so) could not be loaded: "
        f"{_err}. It must be built against the installed torch {_torch.__version__}; "
        "rebuild with `pip install --no-build-isolation .` (or `-e .`) from the source tree."
    ) from _err

from . import _fake  # noqa: E402,F401  (fake kernels for torch.compile / export)
from . import _vmap  # noqa: E402,F401  (batching rules for torch.vmap)
from . import functional  # noqa: E402
from .convert import convert_batchnorm, revert_batchnorm  # noqa: E402
from .modules import (  # noqa: E402
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .sync_batchnorm import SyncBatchNorm  # noqa: E402

#: CMake prefix for LibTorch programs: find_package(TorchBatchNorm) looks here.
cmake_prefix_path = _os.path.join(_os.path.dirname(__file__), "lib", "cmake")

#: Whether the CUDA kernels were compiled into this build.
with_cuda = _C.compiled_with_cuda()

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "functional",
    "convert_batchnorm",
    "revert_batchnorm",
    "cmake_prefix_path",
    "with_cuda",
]
