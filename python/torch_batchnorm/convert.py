"""convert_batchnorm: swap torch's BatchNorm layers in a model for ours."""

import torch

from . import modules

__all__ = ["convert_batchnorm"]

_REPLACEMENTS = {
    getattr(torch.nn, name): getattr(modules, name)
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
    + ("LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d")
}


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Return ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` (and
    ``LazyBatchNorm1d/2d/3d``, which then become ours when they take their size) inside
    turned into the torch_batchnorm equivalent, in place: the same objects, with their
    parameters, buffers, hooks, train/eval mode and every reference to them kept (a
    BatchNorm used in several places stays one module). Subclasses of torch's classes
    (SyncBatchNorm, custom variants) are left alone. A BatchNorm passed directly is
    converted and returned."""
    for m in module.modules():
        cls = _REPLACEMENTS.get(type(m))
        if cls is not None:
            # Ours subclass torch's and add no state of their own, so the object only
            # changes class, as torch.nn.utils.parametrize changes a module's.
            m.__class__ = cls
    return module
