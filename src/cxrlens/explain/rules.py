"""Backward rules for nonlinear modules: Guided Backprop and DeepLIFT (rescale rule).

A rule is installed as a forward hook on each nonlinear module. The hook wraps the module's output
in :class:`_ReplaceBackward`, an autograd function that is the identity going forward and whose
backward computes the rule's gradient for the module input from the gradient of its output
(the module's own derivative is bypassed). This behaves like a full backward hook, but keeps working
with ``retain_graph`` and repeated ``torch.autograd.grad`` calls (one per explained class), and it
lets the multipliers be computed once per forward pass rather than once per backward pass.

The model must be explainable (see :mod:`cxrlens.explain.rewrite`): every nonlinearity a module,
each called once per forward pass, no in-place ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cxrlens.explain.rewrite import ACTIVATION_TYPES, MAXPOOL_TYPES

EPS = 1e-10  # |x - x_ref| below this counts as "no change": the plain gradient is used there


class _ReplaceBackward(torch.autograd.Function):
    """Identity on ``y`` going forward; going backward, ``rule(grad_y)`` is the gradient of ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, rule: Callable) -> torch.Tensor:  # noqa: ANN001
        ctx.rule = rule
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return ctx.rule(grad), None, None


def _replace_backward(x: torch.Tensor, y: torch.Tensor, rule: Callable) -> torch.Tensor:
    return _ReplaceBackward.apply(x, y.detach(), rule)


def _route_through(module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of ``module`` at ``inputs`` (for max-pool: route to the arg-max)."""
    with torch.enable_grad():
        leaf = inputs.detach().requires_grad_(True)
        out = module.forward(leaf)  # .forward, not __call__: our own hooks must not fire here
        (grad,) = torch.autograd.grad(out, leaf, grads)
    return grad


def _local_derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Elementwise derivative of an activation module at ``x``."""
    if isinstance(module, nn.ReLU):
        return (x > 0).to(x.dtype)
    return _route_through(module, x, torch.ones_like(x))


# --- guided backprop ---------------------------------------------------------------------------

class GuidedState:
    """Switch shared by all guided ReLUs: guided rule, or the plain ReLU derivative (for Grad-CAM)."""

    def __init__(self) -> None:
        self.guided = True


@contextmanager
def guided_relus(model: nn.Module, state: GuidedState | None = None) -> Iterator[GuidedState]:
    """Guided Backprop: a ReLU passes back only positive gradients, and only where its input > 0.

    The ReLU's own backward keeps the gradient where its input > 0; a hook on its output clamps the
    incoming gradient at zero first, so the rule costs one clamp per ReLU and backward pass (no mask
    kept from the forward pass, no Python autograd function)."""
    state = state or GuidedState()

    def positive(grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0) if state.guided else grad

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(positive)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


# --- DeepLIFT (rescale rule) -------------------------------------------------------------------

class DeepLiftHooks:
    """Two-pass DeepLIFT: a reference pass records each nonlinearity's input and output, the
    actual pass replaces the nonlinearities' backward by DeepLIFT multipliers.

    Activations use the rescale rule, multiplier = (y - y_ref) / (x - x_ref), computed once in the
    forward pass. Max-pools split the output difference at the cross maximum
    ``m = max(y, y_ref)``: ``m - y_ref`` (>= 0) is credited to the arg-max of the actual input and
    ``y - m`` (<= 0) to the arg-max of the reference input, each divided by ``x - x_ref`` there, so
    that sum(multiplier * (x - x_ref)) equals y - y_ref exactly (Captum's convention). Positions where
    the input does not change get the plain gradient (their contribution is zero anyway).
    Overlapping pooling windows add up (we route with max-pool's own backward, a scatter-add).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES + MAXPOOL_TYPES)]
        self.reference: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = False

    @contextmanager
    def active(self) -> Iterator[DeepLiftHooks]:
        handles = [m.register_forward_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.reference.clear()

    @contextmanager
    def record_reference(self) -> Iterator[None]:
        self.recording = True
        self.reference.clear()
        try:
            yield
        finally:
            self.recording = False

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.recording:
            if id(module) in self.reference:
                raise RuntimeError(f"{type(module).__name__} ran twice in one pass; use make_explainable")
            self.reference[id(module)] = (x.detach(), output.detach())
            return output
        if not (torch.is_grad_enabled() and x.requires_grad):
            return output
        x_ref, y_ref = self.reference[id(module)]
        if isinstance(module, MAXPOOL_TYPES):
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{type(module).__name__} returns indices; DeepLIFT needs it to return values only")
            with torch.no_grad():
                rule = self._maxpool_rule(module, x.detach(), x_ref, output.detach(), y_ref)
            return _replace_backward(x, output, rule)
        with torch.no_grad():
            dx = x - x_ref
            near = dx.abs() < EPS
            rescale = (output - y_ref) / dx.masked_fill(near, 1)
            multiplier = torch.where(near, _local_derivative(module, x.detach()), rescale)
        return _replace_backward(x, output, lambda grad: grad * multiplier)

    @staticmethod
    def _maxpool_rule(module: nn.Module, x: torch.Tensor, x_ref: torch.Tensor, y: torch.Tensor,
                      y_ref: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        cross = torch.maximum(y, y_ref)
        gain, loss = cross - y_ref, y - cross
        x_ref = x_ref.expand_as(x)
        dx = x - x_ref
        near = dx.abs() < EPS
        inverse_dx = 1 / dx.masked_fill(near, 1)
        x_index, ref_index = _argmax_indices(module, x), _argmax_indices(module, x_ref)
        if x_index is None or ref_index is None:
            return DeepLiftHooks._maxpool_rule_by_autograd(module, x, x_ref, gain, loss, dx, near)

        def rule(grad: torch.Tensor) -> torch.Tensor:
            # Scatter-add (not assign): an input that wins several overlapping windows gets them all.
            flat = grad.new_zeros(*x.shape[:2], x[0, 0].numel())
            flat.scatter_add_(2, x_index, (grad * gain).flatten(2))
            flat.scatter_add_(2, ref_index, (grad * loss).flatten(2))
            plain = grad.new_zeros(flat.shape).scatter_add_(2, x_index, grad.flatten(2))
            return torch.where(near, plain.view_as(x), flat.view_as(x) * inverse_dx)

        return rule

    @staticmethod
    def _maxpool_rule_by_autograd(module: nn.Module, x: torch.Tensor, x_ref: torch.Tensor, gain: torch.Tensor,
                                  loss: torch.Tensor, dx: torch.Tensor,
                                  near: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The same rule for pooling modules without ``return_indices``: route with their backward."""
        n = x.shape[0]

        def rule(grad: torch.Tensor) -> torch.Tensor:
            routed = _route_through(
                module, torch.cat([x, x_ref, x]), torch.cat([grad * gain, grad * loss, grad])
            )
            delta_part, plain = routed[:n] + routed[n: 2 * n], routed[2 * n:]
            return torch.where(near, plain, delta_part / dx.masked_fill(near, 1))

        return rule


_POOL_WITH_INDICES: dict[type[nn.Module], Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    nn.MaxPool1d: lambda m, x: F.max_pool1d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True),
    nn.MaxPool2d: lambda m, x: F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True),
    nn.MaxPool3d: lambda m, x: F.max_pool3d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True),
    nn.AdaptiveMaxPool1d: lambda m, x: F.adaptive_max_pool1d(x, m.output_size, True),
    nn.AdaptiveMaxPool2d: lambda m, x: F.adaptive_max_pool2d(x, m.output_size, True),
    nn.AdaptiveMaxPool3d: lambda m, x: F.adaptive_max_pool3d(x, m.output_size, True),
}


def _argmax_indices(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Arg-max of every pooling window as flat indices into each (image, channel) plane of ``x``,
    shaped [N, C, windows]; None for pooling modules we do not know."""
    pool = _POOL_WITH_INDICES.get(type(module))
    if pool is None or x.dim() < 3:
        return None
    _, indices = pool(module, x)
    return indices.flatten(2)
