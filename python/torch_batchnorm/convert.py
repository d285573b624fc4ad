"""convert_batchnorm: swap torch's BatchNorm layers in a model for ours."""

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert_batchnorm"]

_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _convert_one(module: torch.nn.Module) -> torch.nn.Module:
    cls = _REPLACEMENTS.get(type(module))
    if cls is None:
        return module
    # Same class layout (ours subclass torch's), so moving the attribute dict carries
    # every parameter, buffer, hook and flag, on their device and dtype, training mode
    # included, with no copy.
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for name in ("_parameters", "_buffers", "_modules"):
        setattr(new, name, getattr(module, name).copy())
    return new


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Return ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` inside replaced by the
    torch_batchnorm equivalent, sharing its parameters and buffers and keeping its
    train/eval mode. Subclasses of torch's classes (SyncBatchNorm, custom variants) are
    left alone. A BatchNorm passed directly is converted and returned."""
    converted = _convert_one(module)
    if converted is not module:
        return converted
    for name, child in module.named_children():
        new_child = convert_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
