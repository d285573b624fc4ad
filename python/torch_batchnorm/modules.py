"""Drop-in modules for torch.nn.BatchNorm1d/2d/3d and LazyBatchNorm1d/2d/3d.

Each subclasses torch's own class, so it takes the same constructor arguments with the
same defaults, has the same parameters, buffers, state_dict keys, input-dim checks and
repr, and passes isinstance checks that code written for torch's modules makes. Only
forward differs: it runs the torch_batchnorm ops. They also have a frozen mode (see
_Freezable).
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from . import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


class _Freezable:
    """The frozen mode that fine-tuning asks for: a frozen BatchNorm normalises as in
    evaluation, with its running statistics, which it leaves as they are, whether or not
    the module is training. model.train() sets every module's training flag, so code that
    freezes BatchNorm by calling eval() on it has to do so again after each train();
    frozen survives that. Gradients still reach the input, weight and bias (set their
    requires_grad to freeze those too, as torchvision's FrozenBatchNorm2d does). Not part
    of the state_dict: like training, it is a mode of the module, not data."""

    #: Whether the module normalises as in evaluation even while training (see freeze).
    frozen: bool = False
    # torch.jit.script compiles it as a constant, as it does eps and momentum: a module
    # scripted before freeze() stays unfrozen. A list, as torch's, which subclasses extend
    # with +.
    __constants__ = [*torch.nn.modules.batchnorm._NormBase.__constants__, "frozen"]  # noqa: RUF012

    def freeze(self, mode: bool = True):
        """Freezes (or, with ``mode=False``, unfreezes) the module; returns it."""
        if not isinstance(mode, bool):
            raise ValueError("freeze mode is expected to be boolean")  # noqa: TRY004 (as train())
        self.frozen = mode
        return self

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + ", frozen=True" if self.frozen else text


class _BatchNormForward(_Freezable):
    """The forward shared by the three classes: torch's _BatchNorm.forward, except that
    num_batches_tracked is only advanced once the op has updated the running statistics,
    so a call that raises in validation leaves every buffer as it was, that
    momentum=None traces under torch.compile(fullgraph=True), and that a frozen module
    (see _Freezable) normalises as in evaluation. torch.jit.script compiles a TorchScript
    version of it."""

    def forward(self, input: Tensor) -> Tensor:
        # torch.jit.script compiles _scripted_forward only: _eager_forward's Python (fx
        # proxies, compile checks, the checkpointing count) is not TorchScript.
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        symbolic = isinstance(input, torch.fx.Proxy)
        if symbolic:
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
            # Traced as the root module, the forward is recorded in the mode it is traced
            # in, as torch's is: the input's rank is unknown then, and the buffers become
            # nodes of the graph, so that the graph updates them each time it runs.
            buffers = [_graph_buffer(self, name, input) for name in _BUFFERS]
        else:
            self._check_input_dim(input)
            # Registered buffers straight from their dict: Module.__getattr__ costs more
            # than the kernels on small inputs.
            registered = self._buffers
            buffers = [
                registered[name] if name in registered else getattr(self, name) for name in _BUFFERS
            ]
        running_mean_buffer, running_var_buffer, num_batches_tracked = buffers

        training = self.training and not self.frozen
        track = training and self.track_running_stats
        # Batch statistics in training, and in eval when there are no buffers.
        bn_training = training or (running_mean_buffer is None and running_var_buffer is None)
        # Buffers are passed only where they are updated (training with tracking) or
        # read (evaluation).
        use_buffers = not training or self.track_running_stats
        running_mean = running_mean_buffer if use_buffers else None
        running_var = running_var_buffer if use_buffers else None
        momentum = 0.0 if self.momentum is None else self.momentum
        cumulative = (
            track
            and self.momentum is None
            and num_batches_tracked is not None
            and running_mean is not None
        )
        traced = cumulative and (symbolic or torch.compiler.is_compiling())
        if cumulative and not traced:
            # Cumulative moving average over the batches seen, this one included.
            momentum = 1.0 / float(num_batches_tracked + 1)
        elif traced:
            # The op takes its momentum as a Python float, and 1 / num_batches_tracked as
            # one is data-dependent (a graph break under torch.compile). So the op writes
            # this batch's statistics (momentum 1) into copies, and the cumulative average
            # is taken with tensor arithmetic. The copies start as the running values, so
            # an empty batch, which the op leaves alone, changes nothing. (With float16 or
            # bfloat16 buffers the copies round the batch statistics once more, which is
            # why eager mode passes the exact momentum instead.)
            running_mean, running_var = running_mean.clone(), running_var.clone()
            momentum = 1.0
        out = _count_batch(
            num_batches_tracked if track else None,
            running_mean,
            lambda: F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                momentum,
                self.eps,
            ),
        )
        if traced:
            acc = torch.promote_types(self.running_mean.dtype, torch.float32)
            _cumulative_update(running_mean_buffer, running_mean, num_batches_tracked, acc)
            _cumulative_update(running_var_buffer, running_var, num_batches_tracked, acc)
        return out

    def _scripted_forward(self, input: Tensor) -> Tensor:
        # torch's forward through our functional's scripted form (torch's checks, which
        # raise its TorchScript errors, then the op); the batch is counted after the op, so
        # that a call that raises in validation changes no buffer.
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = self.num_batches_tracked
        training = self.training and not self.frozen
        track = training and self.track_running_stats and num_batches_tracked is not None
        # (num_batches_tracked tested again: TorchScript refines an Optional only so.)
        if track and self.momentum is None and num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked + 1)
        bn_training = training or (self.running_mean is None and self.running_var is None)
        use_buffers = not training or self.track_running_stats
        out = F.batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
        )
        if track and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return out


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _fx_leaf(module: torch.nn.Module, input: torch.fx.Proxy) -> Optional[torch.fx.Proxy]:
    """torch.fx.symbolic_trace keeps torch's BatchNorm layers whole, as leaves (call_module
    nodes), so that the graph module's train() and eval() still switch them; this keeps
    ours whole too, returning the node's value. None for the root module, which is
    traced, not called."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:
        return None
    if not _has_hooks(module):
        return tracer.create_proxy("call_module", path, (input,), {})
    # The tracer takes torch.nn's classes for leaves by their module name, so it has
    # entered this one's __call__ already: the hooks ran on the traced values, into the
    # graph, and a call_module node would run them again. This node calls forward alone.
    layer = tracer.create_proxy("get_attr", path, (), {})
    return tracer.create_proxy("call_method", "forward", (layer, input), {})


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` runs hooks (Module._call_impl's own test)."""
    hooks = torch.nn.modules.module
    return bool(
        module._backward_hooks
        or module._backward_pre_hooks
        or module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_backward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _graph_buffer(root: torch.nn.Module, name: str, input: torch.fx.Proxy):
    """The buffer `name` of the `root` module torch.fx is tracing `input` through, as a
    node of the graph (None stays None)."""
    buffer = getattr(root, name)
    if buffer is None or isinstance(buffer, torch.fx.Proxy):
        return buffer
    return input.tracer.create_proxy("get_attr", name, (), {})


def _count_batch(
    num_batches_tracked: Optional[Tensor], running_mean: Optional[Tensor], op: Callable[[], Tensor]
) -> Tensor:
    """op(), a forward that validates everything, then updates running_mean in place
    (which bumps its version); then num_batches_tracked += 1 where given.

    A call that raises after the update also counts the batch, as torch's forward (which
    counts before it calls the op) does: activation checkpointing runs the forward again
    in the backward, and its non-reentrant form stops that run with an exception as soon
    as the op has saved its tensors. A call that raises in validation changes nothing.
    This relies on the op bumping the version with the update (batch_norm_forward's
    autograd kernel does, under no_grad too; torch's own op does not). (Inference tensors
    have no version, and nothing runs again in inference mode; compiled and symbolically
    traced graphs recompute without exceptions.)

    A count made in inference mode cannot be updated outside it; torch finds out before
    its op runs, and so does this, with torch's error, before anything has changed."""
    version = None
    eager = (
        num_batches_tracked is not None
        and not torch.compiler.is_compiling()
        and not isinstance(num_batches_tracked, torch.fx.Proxy)
    )
    if eager and num_batches_tracked.is_inference():
        # Adds nothing, and raises where the update would (outside inference mode).
        num_batches_tracked.add_(0)
    if eager and running_mean is not None and not running_mean.is_inference():
        version = running_mean._version
    try:
        out = op()
    except Exception:
        if version is not None and running_mean._version != version:
            num_batches_tracked.add_(1)
        raise
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return out


def _cumulative_update(running: Tensor, batch: Tensor, count: Tensor, acc: torch.dtype) -> None:
    """running = m * batch + (1 - m) * running with m = 1 / count: the kernels' update with
    the momentum eager mode passes them (1 / count as a double, rounded to `acc`), in the
    same operations and in `acc` (float32 at least, as the kernels update float16/bfloat16
    statistics), so that a traced or compiled forward leaves the bits an eager one does (on
    the CPU; a GPU kernel's fused multiply-add may round its update differently)."""
    m = (1.0 / count.double()).to(acc)
    running.copy_(m * batch.to(acc) + (1 - m) * running.to(acc))


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on 4D ``(N, C, H, W)`` input."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on 5D ``(N, C, D, H, W)`` input."""


class LazyBatchNorm1d(_BatchNormForward, torch.nn.LazyBatchNorm1d):
    """Drop-in for :class:`torch.nn.LazyBatchNorm1d`: takes num_features from the first
    input, then becomes a :class:`BatchNorm1d` of ours."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, torch.nn.LazyBatchNorm2d):
    """Drop-in for :class:`torch.nn.LazyBatchNorm2d`: takes num_features from the first
    input, then becomes a :class:`BatchNorm2d` of ours."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, torch.nn.LazyBatchNorm3d):
    """Drop-in for :class:`torch.nn.LazyBatchNorm3d`: takes num_features from the first
    input, then becomes a :class:`BatchNorm3d` of ours."""

    cls_to_become = BatchNorm3d
