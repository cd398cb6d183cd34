"""Attribution methods with one signature, explaining all target classes at once.

``METHODS[name](model, images, targets, **options_and_params) -> Attribution``, or
``attribute(model, images, targets, method=name, ...)``:

* ``images``: float tensor [B, 3, H, W]; ``targets``: class indices explained for every image.
* ``output``: ``"sigmoid"`` (default, as in the study: the explained quantity is the class's sigmoid
  probability) or ``"logit"``.
* ``max_batch``: largest batch one forward pass sees (perturbations, IG steps, noise samples).
* ``per_channel``: also return ``Attribution.channel_maps`` [B, T, C, H, W].
* ``channels_last`` / ``autocast_bf16``: run the model in channels-last memory format and/or under
  bfloat16 autocast (results change within the tolerances stated in tests/test_explain.py).
* ``model_name``: registry name, only used for the default Grad-CAM layer.
* anything else is a method parameter (see ``METHODS[name].defaults``); unknown ones are errors.
  (Integrated gradients calls Captum's ``method`` argument ``integration``: gausslegendre,
  riemann_right, riemann_left, riemann_middle or riemann_trapezoid.)

Each method is a :class:`Method` that knows itself (as Captum's attribution objects answer
``has_convergence_delta()``): ``needs_rewrite(params)``, ``signed(params)``, ``cost``,
``batched_targets``, ``has_convergence_delta()`` and the parameters an interactive front end may offer
(``ui_params(size)``, ``interactive_params(size)``). Callers (explain_images, the scorecard, the web
app) ask the method and never name one. A new method is a function registered beside its
definition (as timm's ``@register_model``)::

    @register_method("edge", description="...", defaults={"scale": 1.0}, signed=False,
                     ui=(UiParam("scale", "float", 1.0, low=0.0, high=10.0),))
    def edge(ctx: MethodContext, x: Tensor, params: dict) -> MethodResult: ...

``ctx`` holds the model and the explained output (``ctx.scores(x)``, ``ctx.input_gradients(x)``);
the function returns per-channel maps [N, T, C, H, W]. SmoothGrad wraps another method (parameter
``base``, its parameters ``base_params``); the wrapped method's capabilities flow through it.

Cost: gradient methods run one forward pass and one backward pass per target (the graph is kept
between them); Captum needs a forward and a backward per target. Occlusion runs one sweep for all
targets, under ``torch.inference_mode``, with up to ``max_batch`` occluded images per forward pass,
and (``incremental=True``, the default) recomputes every layer only on the box around each window
that the window can reach, as deep as that pays, where it is verified to be exact (see
:mod:`cxrlens.explain.incremental` and :mod:`cxrlens.explain.occlusion`; ``meta["incremental_layer"]``
names the last layer computed on boxes, None when it ran full passes, and ``meta["occlusion_plan"]``
says why). ``approximate=True`` (never the default) sweeps one window position in 2 per axis and
interpolates the others (``approximate=<share>``: Krypton's projective-field thresholding instead);
``meta["approximation_error"]`` gives, per image, its error against exact outputs. Memory: the
unoccluded image's feature maps that boxes read are kept per image, plus one batch; ``max_batch``
bounds the batch part.

Conventions follow Captum so results can be compared: ``maps`` are the per-channel attributions
summed over channels (for occlusion, whose window covers all channels, that is C times the mean
output drop); ``delta`` is the signed convergence delta sum(attribution) - (f(x) - f(baseline)) for
integrated gradients and DeepLIFT.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.explain.occlusion import BF16_TOLERANCE, TOLERANCE, Approximation, Runner, sweep_grid, window_starts
from cxrlens.explain.rewrite import explainable
from cxrlens.explain.rules import EPS, DeepLiftHooks, GuidedState, guided_relus
from cxrlens.models import MODELS
from cxrlens.registry import Registry

__all__ = [
    "COSTS", "METHODS", "Attribution", "Method", "MethodContext", "MethodResult", "UiParam", "attribute",
    "describe_params", "get_method", "register_method", "window_starts",
]

OUTPUTS = ("sigmoid", "logit")
IG_METHODS = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid")
SMOOTHGRAD_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic")
# What one explanation costs, roughly: one forward and T backward passes per image ("gradient"), many of
# them (integration steps, noise samples: "path"), or one forward pass per perturbation ("perturbation").
COSTS = ("gradient", "path", "perturbation")


@dataclass
class Attribution:
    """Attribution maps for B images x T targets.

    maps: [B, T, H, W] (channels summed); channel_maps: [B, T, C, H, W] when requested (Grad-CAM:
    C = 1); delta: [B, T] signed convergence delta, or None where the method has none; scores:
    [B, T] the explained output f(x) per image and target; meta: method, params, output, targets,
    signed (whether maps have meaningful signs), seconds.
    """

    maps: torch.Tensor
    delta: torch.Tensor | None
    meta: dict[str, Any]
    channel_maps: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@dataclass
class MethodResult:
    """What a method function returns: per-channel maps [N, T, C, H, W] (Grad-CAM: C = 1), signed
    convergence deltas [N, T] if it has them, the explained outputs [N, T], and metadata."""

    attr: torch.Tensor
    delta: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class MethodContext:
    """One attribute() call: the model, the explained output, the execution options and the method run."""

    def __init__(self, model: nn.Module, targets: list[int], output: str, max_batch: int,
                 channels_last: bool, autocast_bf16: bool, model_name: str | None) -> None:
        self.model, self.targets, self.output = model, targets, output
        self.max_batch, self.channels_last, self.bf16 = max_batch, channels_last, autocast_bf16
        self.model_name = model_name
        self.method: Method | None = None

    def using(self, method: Method, targets: list[int] | None = None) -> MethodContext:
        """A copy for running ``method`` (a wrapper asks ``ctx.method`` for its base), on ``targets``."""
        ctx = copy.copy(self)
        ctx.method = method
        if targets is not None:
            ctx.targets = targets
        return ctx

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def autocast(self, device: torch.device) -> Any:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the targets, float32 [N, T]."""
        with self.autocast(x.device):
            out = self.model(x)
        return self.target_logits(out)

    def target_logits(self, out: Any) -> torch.Tensor:
        """The targets' columns [N, T] of the model's output, checked (at least float32)."""
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise CxrlensError(
                f"the model must return logits of shape [batch, classes], got {type(out).__name__}"
                f"{list(out.shape) if isinstance(out, torch.Tensor) else ''}"
            )
        if max(self.targets) >= out.shape[1]:
            raise CxrlensError(
                f"target class {max(self.targets)} does not exist; the model has {out.shape[1]} outputs "
                f"(valid targets 0-{out.shape[1] - 1})"
            )
        return widen(out[:, self.targets])

    def apply_output(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.output == "sigmoid" else logits

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Explained outputs [N, T] of an input already passed through ``prepare``."""
        return self.apply_output(self.logits(x))

    def scores_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.scores(self.prepare(chunk)) for chunk in x.split(self.max_batch)])

    def input_gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d f_t / d x for every target: one forward and T backward passes per chunk.

        Returns gradients [N, T, C, H, W] and scores [N, T].
        """
        grads, scores = [], []
        n_targets = len(self.targets)
        for chunk in x.split(self.max_batch):
            leaf = self.prepare(chunk).requires_grad_(True)
            out = self.scores(leaf)
            per_target = [
                torch.autograd.grad(out[:, i].sum(), leaf, retain_graph=i < n_targets - 1)[0]
                for i in range(n_targets)
            ]
            grads.append(widen(torch.stack(per_target, 1)).contiguous())
            scores.append(out.detach())
        return torch.cat(grads), torch.cat(scores)


def widen(t: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision results (autocast) are widened, float64 stays float64, so a
    model and images in double precision are explained in double precision (tests use that to check
    exact properties far above rounding)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# --- registry ------------------------------------------------------------------------------------

MethodFn = Callable[[MethodContext, torch.Tensor, dict[str, Any]], MethodResult]
Rule = bool | Callable[[dict[str, Any]], bool]  # a fixed answer, or one that depends on the resolved parameters
UI_KINDS = ("int", "float", "bool", "choice")


@dataclass(frozen=True)
class UiParam:
    """A parameter an interactive front end may offer: its type, range and the value used there.

    ``default``, ``low`` and ``high`` may be functions of the image side in pixels (an occlusion window
    is a share of the image); ``choices`` may be a function, for lists that grow with the registry."""

    name: str
    kind: str  # int, float, bool or choice
    default: Any
    low: float | Callable[[int], float] | None = None
    high: float | Callable[[int], float] | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.kind not in UI_KINDS:
            raise CxrlensError(f"UiParam '{self.name}': kind must be one of {', '.join(UI_KINDS)}, not '{self.kind}'")

    def value(self, size: int) -> Any:
        """The value an interactive explanation of a ``size`` px image uses."""
        return self.default(size) if callable(self.default) else self.default

    def describe(self, size: int) -> dict[str, Any]:
        """JSON-friendly: name, type, default, and min/max or choices."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind, "default": self.value(size)}
        for key, bound in (("min", self.low), ("max", self.high)):
            if bound is not None:
                out[key] = bound(size) if callable(bound) else bound
        if self.kind == "choice":
            out["choices"] = list(self.choices() if callable(self.choices) else self.choices)
        return out


def _answer(rule: Rule, params: dict[str, Any]) -> bool:
    return bool(rule(params) if callable(rule) else rule)


@dataclass(frozen=True, eq=False)
class Method:
    """One attribution method and what it knows about itself; call it like :func:`attribute` without
    ``method``. Made by :func:`register_method` (see there for the fields)."""

    name: str
    fn: MethodFn
    defaults: dict[str, Any]
    description: str
    cost: str = "gradient"
    batched_targets: bool = True
    wraps: bool = False
    convergence_delta: bool = False
    signed_rule: Rule = True
    rewrite_rule: Rule = False
    check: Callable[[dict[str, Any], tuple[int, int]], None] | None = None
    ui: tuple[UiParam, ...] = ()

    def resolve(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with ``params``; unknown parameter names are errors."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise CxrlensError(
                f"unknown parameter '{unknown[0]}' for method '{self.name}'; valid parameters: "
                f"{', '.join(self.defaults) or 'none'}"
            )
        return {**self.defaults, **params}

    @property
    def wrappable(self) -> bool:
        """SmoothGrad-like wrappers can average it over noisy inputs: it is computed from gradients."""
        return not self.wraps and self.cost != "perturbation"

    def wrapped(self, params: dict[str, Any] | None = None) -> Method:
        """The method a wrapper applies (its ``base`` parameter), checked."""
        base = self.resolve(params)["base"]
        if base not in METHODS or not METHODS[base].wrappable:
            valid = [name for name, m in METHODS.items() if m.wrappable]
            raise CxrlensError(f"{self.name} cannot wrap '{base}'; base must be one of: {', '.join(valid)}")
        return METHODS[base]

    def needs_rewrite(self, params: dict[str, Any] | None = None) -> bool:
        """Uses backward rules on nonlinear modules, so the model must be explainable (see explain.rewrite)."""
        p = self.resolve(params)
        return _answer(self.rewrite_rule, p) or (self.wraps and self.wrapped(p).needs_rewrite(p["base_params"]))

    def signed(self, params: dict[str, Any] | None = None) -> bool:
        """The maps have meaningful signs (shown with a diverging colour map)."""
        p = self.resolve(params)
        return _answer(self.signed_rule, p) and (not self.wraps or self.wrapped(p).signed(p["base_params"]))

    def has_convergence_delta(self) -> bool:
        """Returns the convergence delta sum(attribution) - (f(x) - f(baseline)) (Captum's question)."""
        return self.convergence_delta

    def check_params(self, params: dict[str, Any] | None, image_size: tuple[int, int]) -> dict[str, Any]:
        """Resolved parameters, checked against the image size before any work (and any file) is done."""
        p = self.resolve(params)
        if self.check is not None:
            self.check(p, image_size)
        if self.wraps:
            self.wrapped(p).check_params(p["base_params"], image_size)
        return p

    def interactive_params(self, size: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Parameters that keep one explanation of a ``size`` px image interactive (a few seconds on a CPU),
        over ``params``; a wrapper passes its base method's on."""
        out = {u.name: u.value(size) for u in self.ui}
        out.update(params or {})
        if self.wraps:
            base = self.wrapped(out)
            out["base_params"] = base.interactive_params(size, self.resolve(out)["base_params"]) or None
        return out

    def ui_params(self, size: int) -> list[dict[str, Any]]:
        """What a front end may offer for a ``size`` px image: name, type, range or choices, default."""
        return [u.describe(size) for u in self.ui]

    def run(self, ctx: MethodContext, images: torch.Tensor, params: dict[str, Any]) -> MethodResult:
        """The function on resolved ``params``: once, or once per target if it explains one target at a time."""
        if self.batched_targets:
            return self.fn(ctx.using(self), images, params)
        parts = [self.fn(ctx.using(self, [t]), images, params) for t in ctx.targets]

        def joined(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(v is None for v in values) else torch.cat(values, 1)  # type: ignore[arg-type]

        return MethodResult(torch.cat([r.attr for r in parts], 1), delta=joined([r.delta for r in parts]),
                            scores=joined([r.scores for r in parts]), meta=parts[0].meta)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: Sequence[int] | int,
                 **kwargs: Any) -> Attribution:
        return attribute(model, images, targets, method=self.name, **kwargs)


METHODS: Registry[Method] = Registry("attribution method")


def register_method(
    name: str,
    *,
    description: str,
    defaults: dict[str, Any] | None = None,
    cost: str = "gradient",
    signed: Rule = True,
    needs_rewrite: Rule = False,
    convergence_delta: bool = False,
    batched_targets: bool = True,
    wraps: bool = False,
    check: Callable[[dict[str, Any], tuple[int, int]], None] | None = None,
    ui: Sequence[UiParam] = (),
    replace: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register the decorated function ``fn(ctx, images, params) -> MethodResult`` as method ``name``.

    description: one line for menus and reports; defaults: every parameter with its default (the
    only names accepted); cost: one of :data:`COSTS`; signed / needs_rewrite: True/False or a function
    of the resolved parameters; convergence_delta: the result carries deltas; batched_targets: the
    function explains all targets at once (otherwise it is called once per target); wraps: the method
    applies another (parameter ``base``, whose parameters are ``base_params``) and that method's
    needs_rewrite and signedness flow through; check(params, (H, W)): raises CxrlensError for
    parameters that do not fit the images; ui: the parameters an interactive front end may offer;
    replace: take the place of a method already registered under ``name``.
    """
    if cost not in COSTS:
        raise CxrlensError(f"method '{name}': cost must be one of {', '.join(COSTS)}, not '{cost}'")
    defaults = dict(defaults or {})
    if wraps and not {"base", "base_params"} <= set(defaults):
        raise CxrlensError(f"method '{name}' wraps another: its defaults need 'base' and 'base_params'")
    unknown = [u.name for u in ui if u.name not in defaults]
    if unknown:
        raise CxrlensError(f"method '{name}': UI parameter '{unknown[0]}' is not one of its parameters")

    def decorator(fn: MethodFn) -> MethodFn:
        METHODS.add(name, Method(
            name=name, fn=fn, defaults=defaults, description=description, cost=cost,
            batched_targets=batched_targets, wraps=wraps, convergence_delta=convergence_delta,
            signed_rule=signed, rewrite_rule=needs_rewrite, check=check, ui=tuple(ui),
        ), replace)
        return fn

    return decorator


def get_method(name: str) -> Method:
    return METHODS.lookup(name)


# --- parameters ----------------------------------------------------------------------------------

def _baseline(value: Any, x: torch.Tensor, name: str = "baseline") -> torch.Tensor:
    """A baseline broadcastable to ``x`` [B, C, H, W]: batch 1 (shared) or B."""
    if isinstance(value, (int, float)):
        return torch.full((1, *x.shape[1:]), float(value), dtype=x.dtype, device=x.device)
    if isinstance(value, torch.Tensor):
        b = value.to(device=x.device, dtype=x.dtype)
        if b.dim() == 3:
            b = b.unsqueeze(0)
        if b.dim() == 4 and b.shape[1:] == x.shape[1:] and b.shape[0] in (1, x.shape[0]):
            return b
    shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise CxrlensError(
        f"{name} must be a number or a tensor of shape [C, H, W] or [1 or B, C, H, W] matching the "
        f"images {list(x.shape)}, got {shape}"
    )


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 3:  # Captum-style (C, h, w): all channels
        value = tuple(value[1:])
    if (
        isinstance(value, (tuple, list)) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise CxrlensError(f"occlusion {name} must be a positive int or (height, width), got {value!r}")


def describe_params(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly copy of the parameters (tensors become their shape)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, torch.Tensor):
            out[key] = f"tensor{list(value.shape)}"
        elif isinstance(value, dict):
            out[key] = describe_params(value)
        else:
            out[key] = value
    return out


# --- occlusion -----------------------------------------------------------------------------------

def _check_window(p: dict[str, Any], image_size: tuple[int, int]) -> None:
    (wh, ww), h, w = _pair(p["window"], "window"), image_size[0], image_size[1]
    _pair(p["stride"], "stride")
    if wh > h or ww > w:
        raise CxrlensError(
            f"occlusion window {wh}x{ww} is larger than the {h}x{w} image; use a window of at most {h}x{w}"
        )
    _approximation(p["approximate"])


def _approximation(value: Any) -> Approximation | None:
    """None (exact), the grid approximation (True) or projective-field thresholding at a box side share."""
    if value is False or value is None:
        return None
    if value is True or value == "grid":
        return Approximation("grid")
    if isinstance(value, (int, float)) and 0 < value < 1:
        return Approximation("projective", threshold=float(value))
    raise CxrlensError(f"occlusion approximate must be true (every 2nd window position, the others interpolated), "
                       f"false, or a box side share in (0, 1) for projective-field thresholding; got {value!r}")


@register_method(
    "occlusion",
    description="output drop when a window is replaced by the baseline, averaged over windows",
    defaults={"window": 50, "stride": 4, "baseline": 0.0, "incremental": True, "approximate": False},
    cost="perturbation",
    check=_check_window,
    # The study's window (50 px at 512, stride 4: ~13,000 passes) is for batch jobs; interactively a window
    # of an eighth of the image.
    ui=(UiParam("window", "int", lambda size: max(4, size // 8), low=2, high=lambda size: size),
        UiParam("stride", "int", lambda size: max(2, size // 16), low=1, high=lambda size: size)),
)
def _occlusion(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    (wh, ww), (sh, sw) = _pair(p["window"], "window"), _pair(p["stride"], "stride")
    b, c, h, w = x.shape
    ys, xs = window_starts(h, wh, sh), window_starts(w, ww, sw)
    n_targets = len(ctx.targets)
    runner = Runner(ctx.model, lambda out: ctx.apply_output(ctx.target_logits(out)), ctx.prepare,
                    lambda: ctx.autocast(x.device), BF16_TOLERANCE if ctx.bf16 else TOLERANCE)
    with torch.inference_mode():
        result = sweep_grid(runner, x, _baseline(p["baseline"], x), ys, xs, (wh, ww), ctx.max_batch,
                            incremental=p["incremental"], approximation=_approximation(p["approximate"]))
    attr = result.maps.to(result.scores.dtype).unsqueeze(2).expand(b, n_targets, c, h, w)
    meta = {"n_windows": len(ys) * len(xs), "incremental_layer": result.plan.layer,
            "occlusion_plan": result.plan.reason}
    if result.errors is not None:  # one entry per image: errors per target, checked against exact outputs
        meta["approximation_error"] = result.errors
    return MethodResult(attr, scores=result.scores, meta=meta)


# --- gradient methods ----------------------------------------------------------------------------

@register_method("saliency", description="absolute input gradient", defaults={"abs": True},
                 signed=lambda p: not p["abs"], ui=(UiParam("abs", "bool", True),))
def _saliency(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    grads, scores = ctx.input_gradients(x)
    return MethodResult(grads.abs() if p["abs"] else grads, scores=scores)


@register_method("input_x_gradient", description="input times gradient")
def _input_x_gradient(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    grads, scores = ctx.input_gradients(x)
    return MethodResult(widen(x.unsqueeze(1)) * grads, scores=scores)


@register_method("guided_backprop", description="gradient passing only positive gradients back through ReLUs",
                 needs_rewrite=True)
def _guided_backprop(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    with guided_relus(ctx.model):
        grads, scores = ctx.input_gradients(x)
    return MethodResult(grads, scores=scores)


def ig_steps(n_steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Points alpha in [0, 1] and weights of the path integral's quadrature rule."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (nodes + 1) / 2, weights / 2
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise CxrlensError("integrated gradients with riemann_trapezoid needs n_steps >= 2")
        weights = np.full(n_steps, 1 / (n_steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, n_steps), weights
    offset = {"riemann_right": 1.0, "riemann_left": 0.0, "riemann_middle": 0.5}[method]
    return (np.arange(n_steps) + offset) / n_steps, np.full(n_steps, 1 / n_steps)


@register_method(
    "integrated_gradients",
    description="path integral of gradients from the baseline",
    defaults={"n_steps": 50, "integration": "gausslegendre", "baseline": 0.0},
    cost="path",
    convergence_delta=True,
    ui=(UiParam("n_steps", "int", 16, low=1, high=256),
        UiParam("integration", "choice", "gausslegendre", choices=IG_METHODS)),
)
def _integrated_gradients(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    n_steps, method = p["n_steps"], p["integration"]
    if method not in IG_METHODS:
        raise CxrlensError(f"unknown integration '{method}'; choose one of: {', '.join(IG_METHODS)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise CxrlensError(f"n_steps must be a positive int, got {n_steps!r}")
    baseline = _baseline(p["baseline"], x)
    alphas, weights = ig_steps(n_steps, method)
    b, n_targets = x.shape[0], len(ctx.targets)
    total = torch.zeros(b, n_targets, *x.shape[1:], device=x.device, dtype=widen(x).dtype)
    diff = x - baseline
    # All (step, image) pairs in chunks of max_batch; each chunk: one forward, T backwards.
    pairs = [(k, i) for k in range(n_steps) for i in range(b)]
    for start in range(0, len(pairs), ctx.max_batch):
        chunk = pairs[start: start + ctx.max_batch]
        steps = torch.tensor([k for k, _ in chunk], device=x.device)
        images = torch.tensor([i for _, i in chunk], device=x.device)
        alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)[steps].view(-1, 1, 1, 1)
        weight = torch.as_tensor(weights, dtype=total.dtype, device=x.device)[steps]
        scaled = baseline.expand_as(x)[images] + alpha * diff[images]
        grads, _ = ctx.input_gradients(scaled)
        total.index_add_(0, images, grads * weight.view(-1, 1, 1, 1, 1))
    attr = widen(diff.unsqueeze(1)) * total
    ends = ctx.scores_no_grad(torch.cat([x, baseline]))  # a shared baseline is scored once
    scores, start_scores = ends[:b], ends[b:].expand(b, -1)
    delta = attr.flatten(2).sum(2) - (scores - start_scores)
    return MethodResult(attr, delta=delta, scores=scores)


@register_method("deeplift", description="DeepLIFT, rescale rule", defaults={"baseline": 0.0},
                 needs_rewrite=True, convergence_delta=True)
def _deeplift(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    baseline = _baseline(p["baseline"], x)
    hooks = DeepLiftHooks(ctx.model)
    n_targets = len(ctx.targets)
    attrs, deltas, all_scores = [], [], []
    with hooks.active():
        for start in range(0, x.shape[0], ctx.max_batch):
            chunk = x[start: start + ctx.max_batch]
            ref = baseline if baseline.shape[0] == 1 else baseline[start: start + ctx.max_batch]
            with hooks.record_reference(), torch.no_grad():
                ref_logits = ctx.logits(ctx.prepare(ref))
            leaf = ctx.prepare(chunk).requires_grad_(True)
            logits = ctx.logits(leaf)
            # The output nonlinearity (sigmoid) gets the rescale rule too.
            with torch.no_grad():
                scores, ref_scores = ctx.apply_output(logits.detach()), ctx.apply_output(ref_logits)
                if ctx.output == "sigmoid":
                    dz = logits - ref_logits
                    near = dz.abs() < EPS
                    out_mult = torch.where(near, scores * (1 - scores), (scores - ref_scores) / dz.masked_fill(near, 1))
                else:
                    out_mult = torch.ones_like(logits)
            grads = widen(torch.stack([
                torch.autograd.grad(logits[:, i], leaf, out_mult[:, i], retain_graph=i < n_targets - 1)[0]
                for i in range(n_targets)
            ], 1))
            attr = widen((chunk - ref).unsqueeze(1)) * grads
            attrs.append(attr)
            deltas.append(attr.flatten(2).sum(2) - (scores - ref_scores))
            all_scores.append(scores)
    return MethodResult(torch.cat(attrs), delta=torch.cat(deltas), scores=torch.cat(all_scores))


# --- Grad-CAM ------------------------------------------------------------------------------------

def layer_choices(model: nn.Module, depth: int = 2) -> list[str]:
    """Module names up to ``depth`` levels deep (what an error message can list)."""
    return [name for name, _ in model.named_modules() if name and name.count(".") < depth]


def resolve_layer(model: nn.Module, layer: str | None, model_name: str | None = None,
                  example: torch.Tensor | None = None) -> str:
    """The Grad-CAM layer: ``layer``, else the registry's for ``model_name``, else the last module
    (in completion order) whose output is a 4-D map larger than 1x1."""
    names = dict(model.named_modules())
    if layer is None and model_name is not None and model_name in MODELS:
        layer = MODELS[model_name].gradcam_layer
    if layer is not None:
        if layer not in names or not layer:
            choices = layer_choices(model)
            shown = ", ".join(choices[:40]) + (", ..." if len(choices) > 40 else "")
            raise CxrlensError(f"unknown layer '{layer}'; valid layers include: {shown}")
        return layer
    if example is None:
        raise CxrlensError("pass layer=... (the name of a convolutional layer) for Grad-CAM")
    finished: list[str] = []
    handles = [
        module.register_forward_hook(
            lambda m, a, out, n=name: finished.append(n)
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2:].numel() > 1 else None
        )
        for name, module in model.named_modules() if name
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise CxrlensError("found no convolutional layer for Grad-CAM; pass layer=...")
    return finished[-1]


@contextmanager
def _capture(module: nn.Module, name: str) -> Iterator[dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise CxrlensError(
                f"layer '{name}' returns {type(out).__name__}"
                f"{list(out.shape) if isinstance(out, torch.Tensor) else ''}; Grad-CAM needs a "
                "convolutional layer with output [batch, channels, height, width]"
            )
        if not out.requires_grad:  # gradients are needed only down to this layer
            out = out.detach().requires_grad_(True)
        store["activation"] = out
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _cam(activation: torch.Tensor, grad: torch.Tensor, relu: bool, size: tuple[int, int], mode: str) -> torch.Tensor:
    weights = widen(grad).mean(dim=(2, 3), keepdim=True)
    cam = (weights * widen(activation.detach())).sum(1, keepdim=True)
    if relu:
        cam = cam.clamp(min=0)
    if mode == "bilinear":
        return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(cam, size=size, mode=mode)


def _grad_cam_common(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any], guided: bool) -> MethodResult:
    if p["interpolate"] not in INTERPOLATIONS:
        raise CxrlensError(f"interpolate must be bilinear, nearest or bicubic, got {p['interpolate']!r}")
    layer = resolve_layer(ctx.model, p["layer"], ctx.model_name, ctx.prepare(x[:1]))
    module = ctx.model.get_submodule(layer)
    size = (x.shape[2], x.shape[3])
    n_targets = len(ctx.targets)
    attrs, all_scores = [], []
    state = GuidedState()
    with _capture(module, layer) as store, (guided_relus(ctx.model, state) if guided else nullcontext()):
        for chunk in x.split(ctx.max_batch):
            leaf = ctx.prepare(chunk).requires_grad_(guided)
            scores = ctx.scores(leaf)
            activation = store["activation"]
            per_target = []
            for i in range(n_targets):
                state.guided = False  # Grad-CAM's own gradient is the plain one
                (grad,) = torch.autograd.grad(scores[:, i].sum(), activation, retain_graph=True)
                cam = _cam(activation, grad, p.get("relu", True), size, p["interpolate"])
                if guided:
                    state.guided = True
                    (gb,) = torch.autograd.grad(scores[:, i].sum(), leaf, retain_graph=i < n_targets - 1)
                    cam = widen(gb) * cam
                per_target.append(cam)
            attrs.append(torch.stack(per_target, 1).contiguous())
            all_scores.append(scores.detach())
    return MethodResult(torch.cat(attrs), scores=torch.cat(all_scores), meta={"layer": layer})


@register_method(
    "grad_cam",
    description="gradient-weighted class activation map of a convolutional layer",
    defaults={"layer": None, "relu": True, "interpolate": "bilinear"},
    signed=False,
    ui=(UiParam("relu", "bool", True), UiParam("interpolate", "choice", "bilinear", choices=INTERPOLATIONS)),
)
def _grad_cam(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    return _grad_cam_common(ctx, x, p, guided=False)


@register_method(
    "guided_grad_cam",
    description="guided backprop times Grad-CAM",
    defaults={"layer": None, "interpolate": "bilinear"},
    needs_rewrite=True,
    ui=(UiParam("interpolate", "choice", "bilinear", choices=INTERPOLATIONS),),
)
def _guided_grad_cam(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    return _grad_cam_common(ctx, x, p, guided=True)


# --- SmoothGrad ----------------------------------------------------------------------------------

def _wrappable_names() -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.wrappable)


@register_method(
    "smoothgrad",
    description="average of a gradient method over noisy copies of the input",
    defaults={"base": "saliency", "n_samples": 16, "stdev": 0.15, "kind": "smoothgrad", "seed": 0,
              "base_params": None},
    cost="path",
    wraps=True,
    signed=lambda p: p["kind"] == "smoothgrad",  # squares and variances are never negative
    ui=(UiParam("base", "choice", "saliency", choices=_wrappable_names),
        UiParam("kind", "choice", "smoothgrad", choices=SMOOTHGRAD_KINDS),
        UiParam("n_samples", "int", 8, low=1, high=64),
        UiParam("stdev", "float", 0.15, low=0.0, high=1.0)),
)
def _smoothgrad(ctx: MethodContext, x: torch.Tensor, p: dict[str, Any]) -> MethodResult:
    base = ctx.method.wrapped(p)
    if p["kind"] not in SMOOTHGRAD_KINDS:
        raise CxrlensError(f"unknown smoothgrad kind '{p['kind']}'; choose one of: {', '.join(SMOOTHGRAD_KINDS)}")
    n, b = int(p["n_samples"]), x.shape[0]
    if n < 1:
        raise CxrlensError(f"n_samples must be >= 1, got {n}")
    base_params = base.resolve(p["base_params"])
    baseline = base_params.get("baseline")
    if isinstance(baseline, torch.Tensor) and baseline.dim() == 4 and baseline.shape[0] == b > 1:
        base_params["baseline"] = baseline.repeat(n, 1, 1, 1)  # one copy per noise sample
    generator = torch.Generator(device=x.device).manual_seed(int(p["seed"]))
    noise = torch.randn((n * b, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    noisy = x.repeat(n, 1, 1, 1) + float(p["stdev"]) * noise  # sample-major: index = sample * B + image
    result = base.run(ctx, noisy, base_params)
    attr = result.attr.view(n, b, *result.attr.shape[1:])
    if p["kind"] == "smoothgrad":
        attr = attr.mean(0)
    elif p["kind"] == "smoothgrad_sq":
        attr = attr.pow(2).mean(0)
    else:
        attr = attr.var(0, unbiased=False)
    return MethodResult(attr, scores=ctx.scores_no_grad(x), meta={"base_params": describe_params(base_params)})


# --- attribute ----------------------------------------------------------------------------------

@contextmanager
def _evaluating(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Eval mode, no parameter gradients (only input gradients are needed), optional channels-last;
    the model's own settings come back afterwards, its weights as the very tensors they were (same
    storage and memory format, so its outputs do not move by a rounding)."""
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    params = [(p, p.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for module, training in zip(model.modules(), modes, strict=True):
            module.training = training
        if channels_last:
            for param, data in params:
                param.data = data
            for module, name, buffer in buffers:
                module._buffers[name] = buffer
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)


def _check_inputs(output: str, images: Any, targets: Sequence[int] | int, max_batch: Any) -> list[int]:
    """The target list, after checking the options every method shares."""
    if output not in OUTPUTS:
        raise CxrlensError(f"output must be one of {', '.join(OUTPUTS)}, got '{output}'")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CxrlensError(f"images must be a float tensor [batch, channels, height, width], got {shape}")
    target_list = [targets] if isinstance(targets, int) else list(targets)
    if not target_list or not all(isinstance(t, int) and t >= 0 for t in target_list):
        raise CxrlensError(f"targets must be a non-empty list of class indices >= 0, got {targets!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise CxrlensError(f"max_batch must be a positive int, got {max_batch!r}")
    return target_list


def attribute(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int] | int,
    *,
    method: str,
    output: str = "sigmoid",
    max_batch: int = 16,
    per_channel: bool = False,
    channels_last: bool = False,
    autocast_bf16: bool = False,
    model_name: str | None = None,
    **params: Any,
) -> Attribution:
    """Explain ``targets`` of every image in ``images`` with ``method`` (see the module docstring).

    Methods with backward rules (DeepLIFT, guided backprop, guided Grad-CAM) need an explainable
    model; one that is not is rewritten on the first such call and the copy is kept for the next
    ones, until the model's weights or modules change (``rewrite.explainable``).
    """
    spec = get_method(method)
    spec.resolve(params)  # unknown parameters first: the most likely mistake
    target_list = _check_inputs(output, images, targets, max_batch)
    resolved = spec.check_params(params, (images.shape[-2], images.shape[-1]))
    if spec.needs_rewrite(resolved):
        model = explainable(model, images[:1])
    started = time.perf_counter()
    ctx = MethodContext(model, target_list, output, max_batch, channels_last, autocast_bf16, model_name)
    with _evaluating(model, channels_last):
        result = spec.run(ctx, images, resolved)
    channel_maps = widen(result.attr)
    meta = {
        "method": spec.name,
        "params": describe_params(resolved),
        "output": output,
        "targets": target_list,
        "signed": spec.signed(resolved),
        "seconds": time.perf_counter() - started,
        "channels_last": channels_last,
        "autocast_bf16": autocast_bf16,
        **result.meta,
    }
    return Attribution(
        maps=channel_maps.sum(2).detach(),
        delta=None if result.delta is None else result.delta.detach(),
        meta=meta,
        channel_maps=channel_maps.detach() if per_channel else None,
        scores=None if result.scores is None else result.scores.detach(),
    )
