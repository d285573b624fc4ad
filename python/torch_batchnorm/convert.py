"""convert_batchnorm: swap torch's BatchNorm layers in a model for ours; revert_batchnorm:
swap ours back."""

import torch

from . import modules

__all__ = ["convert_batchnorm", "revert_batchnorm"]

_REPLACEMENTS = {
    getattr(torch.nn, name): getattr(modules, name)
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
    + ("LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d")
}
_REVERSALS = {ours: theirs for theirs, ours in _REPLACEMENTS.items()}


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


def revert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`convert_batchnorm`: every one of our BatchNorm1d/2d/3d (and
    lazy) layers inside ``module`` turned into torch's, in place, everything else kept, for
    tools that look torch's classes up exactly: FX-based fusion and quantization
    (``torch.fx.experimental.optimization.fuse``, ``torch.ao.quantization.quantize_fx``)
    leave ours unfused. A frozen layer (see ``freeze``) is refused: torch's class has no
    such mode. Subclasses of ours, and our SyncBatchNorm, are left alone. Returns
    ``module``."""
    layers = [m for m in module.modules() if type(m) in _REVERSALS]
    frozen = [m for m in layers if m.frozen]
    if frozen:
        raise ValueError(
            f"revert_batchnorm: {len(frozen)} frozen BatchNorm layer(s), a mode torch's "
            "classes do not have; unfreeze them (freeze(False)) or call eval() instead"
        )
    for m in layers:
        m.__class__ = _REVERSALS[type(m)]
    return module
