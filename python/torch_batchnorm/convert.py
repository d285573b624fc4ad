"""convert_batchnorm: swap torch's BatchNorm layers in a model for ours."""

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert_batchnorm"]

_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


# The containers every torch.nn.Module keeps in its attribute dict: parameters, buffers,
# submodules, hooks (by kind, for this torch release) and the names of non-persistent
# buffers.
_CONTAINERS = tuple(
    name for name, value in vars(torch.nn.Module()).items() if isinstance(value, (dict, set))
)


def _convert_one(module: torch.nn.Module) -> torch.nn.Module:
    cls = _REPLACEMENTS.get(type(module))
    if cls is None:
        return module
    # Same class layout (ours subclass torch's), so moving the attribute dict carries
    # every parameter, buffer, hook and flag, on their device and dtype, training mode
    # included, with no copy. The containers are copied: a hook registered on either
    # module afterwards is that module's alone.
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for name in _CONTAINERS:
        if name in new.__dict__:
            setattr(new, name, getattr(module, name).copy())
    return new


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Return ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` inside replaced by the
    torch_batchnorm equivalent, sharing its parameters and buffers and keeping its
    train/eval mode and hooks. A BatchNorm used in several places is replaced by one
    module in all of them. Subclasses of torch's classes (SyncBatchNorm, custom variants)
    are left alone. A BatchNorm passed directly is converted and returned."""
    return _convert(module, {})


def _convert(module: torch.nn.Module, converted: dict) -> torch.nn.Module:
    # `converted` maps id(original) to its replacement, for modules met again; children
    # come from _modules, which, unlike named_children(), lists a shared module every
    # time it is registered.
    if id(module) in converted:
        return converted[id(module)]
    new = _convert_one(module)
    converted[id(module)] = new
    if new is module:
        for name, child in list(module._modules.items()):
            if child is not None:
                new_child = _convert(child, converted)
                if new_child is not child:
                    setattr(module, name, new_child)
    return new
