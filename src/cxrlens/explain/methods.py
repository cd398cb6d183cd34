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

Cost: gradient methods run one forward pass and one backward pass per target (the graph is kept
between them); Captum needs a forward and a backward per target. Occlusion runs one sweep for all
targets, under ``torch.inference_mode``, with up to ``max_batch`` occluded images per forward pass,
and (``incremental=True``, the default) recomputes the early layers only on a crop around each
window where that is verified to be exact and saves work (see :mod:`cxrlens.explain.occlusion`;
``meta["incremental_layer"]`` names the layer it cut at, None when it ran full passes).

Conventions follow Captum so results can be compared: ``maps`` are the per-channel attributions
summed over channels (for occlusion, whose window covers all channels, that is C times the mean
output drop); ``delta`` is the signed convergence delta sum(attribution) - (f(x) - f(baseline)) for
integrated gradients and DeepLIFT.
"""

from __future__ import annotations

import math
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
from cxrlens.explain.occlusion import MIN_WINDOWS, occluded_scores, plan_incremental
from cxrlens.explain.rewrite import is_explainable, make_explainable
from cxrlens.explain.rules import EPS, DeepLiftHooks, GuidedState, guided_relus
from cxrlens.models import MODELS

OUTPUTS = ("sigmoid", "logit")
IG_METHODS = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid")
SMOOTHGRAD_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


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
class _Result:
    attr: torch.Tensor  # [N, T, C, H, W]
    delta: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class _Context:
    """One attribute() call: the model, the explained output and the execution options."""

    def __init__(self, model: nn.Module, targets: list[int], output: str, max_batch: int,
                 channels_last: bool, autocast_bf16: bool, model_name: str | None) -> None:
        self.model, self.targets, self.output = model, targets, output
        self.max_batch, self.channels_last, self.bf16 = max_batch, channels_last, autocast_bf16
        self.model_name = model_name

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


def _describe(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly copy of the parameters (tensors become their shape)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, torch.Tensor):
            out[key] = f"tensor{list(value.shape)}"
        elif isinstance(value, dict):
            out[key] = _describe(value)
        else:
            out[key] = value
    return out


# --- gradient methods ----------------------------------------------------------------------------

def _saliency(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    grads, scores = ctx.input_gradients(x)
    return _Result(grads.abs() if p["abs"] else grads, scores=scores)


def _input_x_gradient(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    grads, scores = ctx.input_gradients(x)
    return _Result(widen(x.unsqueeze(1)) * grads, scores=scores)


def _guided_backprop(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    with guided_relus(ctx.model):
        grads, scores = ctx.input_gradients(x)
    return _Result(grads, scores=scores)


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


def _integrated_gradients(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
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
    ends = ctx.scores_no_grad(torch.cat([x, baseline.expand_as(x)]))
    scores, start_scores = ends[:b], ends[b:]
    delta = attr.flatten(2).sum(2) - (scores - start_scores)
    return _Result(attr, delta=delta, scores=scores)


def _deeplift(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
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
    return _Result(torch.cat(attrs), delta=torch.cat(deltas), scores=torch.cat(all_scores))


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


def _grad_cam_common(ctx: _Context, x: torch.Tensor, p: dict[str, Any], guided: bool) -> _Result:
    if p["interpolate"] not in ("bilinear", "nearest", "bicubic"):
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
    return _Result(torch.cat(attrs), scores=torch.cat(all_scores), meta={"layer": layer})


def _grad_cam(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    return _grad_cam_common(ctx, x, p, guided=False)


def _guided_grad_cam(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    return _grad_cam_common(ctx, x, p, guided=True)


# --- occlusion -----------------------------------------------------------------------------------

def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window positions along one side: from 0 in steps of ``stride`` until the side is covered
    (the last window may stick out and is then cut off), as Captum does."""
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def _occlusion(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    (wh, ww), (sh, sw) = _pair(p["window"], "window"), _pair(p["stride"], "stride")
    b, c, h, w = x.shape
    if wh > h or ww > w:
        raise CxrlensError(
            f"occlusion window {wh}x{ww} is larger than the {h}x{w} image; use a window of at most {h}x{w}"
        )
    baseline = _baseline(p["baseline"], x)
    ys, xs = window_starts(h, wh, sh), window_starts(w, ww, sw)
    windows = [(y0, x0) for y0 in ys for x0 in xs]
    n_targets = len(ctx.targets)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return ctx.scores(ctx.prepare(batch))

    attrs = []
    with torch.inference_mode():
        plan = None
        if p["incremental"] and len(windows) >= MIN_WINDOWS:
            plan = plan_incremental(ctx.model, x[:1], (wh, ww), run)
        cached: dict[str, torch.Tensor] = {}
        if plan is not None:  # C's output for the unoccluded images, with their scores
            def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                cached.setdefault("maps", []).append(out)  # type: ignore[attr-defined]

            handle = plan.module.register_forward_hook(keep)
            try:
                scores = torch.cat([run(chunk) for chunk in x.split(ctx.max_batch)])
            finally:
                handle.remove()
            features = torch.cat(cached["maps"])  # type: ignore[arg-type]
            probe = sorted({0, len(windows) // 2 + len(xs) // 2, len(windows) - 1})
            try:  # exactness on three windows, or no plan
                occluded_scores(plan, x[0], baseline[0], features[:1], [windows[i] for i in probe], wh, ww,
                                run, ctx.max_batch, check=True)
            except (AssertionError, RuntimeError, IndexError):
                plan = None
        else:
            scores = ctx.scores_no_grad(x)
        # How many windows cover each pixel, and the sum of the output drops of those windows, by a
        # transposed convolution of the grid of drops with a window of ones.
        ones = torch.ones(n_targets, 1, wh, ww, device=x.device, dtype=scores.dtype)
        grid = torch.ones(1, 1, len(ys), len(xs), device=x.device, dtype=scores.dtype)
        counts = F.conv_transpose2d(grid, ones[:1], stride=(sh, sw))[..., :h, :w]
        for i in range(b):
            image, base = x[i], baseline[i if baseline.shape[0] > 1 else 0]
            if plan is not None:
                occluded = occluded_scores(plan, image, base, features[i: i + 1], windows, wh, ww, run,
                                           ctx.max_batch)
            else:
                occluded = torch.empty(len(windows), n_targets, device=x.device, dtype=scores.dtype)
                for start in range(0, len(windows), ctx.max_batch):
                    batch_windows = windows[start: start + ctx.max_batch]
                    batch = image.unsqueeze(0).repeat(len(batch_windows), 1, 1, 1)
                    for j, (y0, x0) in enumerate(batch_windows):
                        batch[j, :, y0: y0 + wh, x0: x0 + ww] = base[:, y0: y0 + wh, x0: x0 + ww]
                    occluded[start: start + len(batch_windows)] = run(batch)
            drops = scores[i] - occluded
            grid_drops = drops.T.reshape(1, n_targets, len(ys), len(xs))
            summed = F.conv_transpose2d(grid_drops, ones, stride=(sh, sw), groups=n_targets)[..., :h, :w]
            attrs.append((summed / counts.clamp(min=1))[0])
    attr = torch.stack(attrs).unsqueeze(2).expand(b, n_targets, c, h, w)
    meta = {"n_windows": len(windows), "incremental_layer": plan.layer if plan is not None else None}
    return _Result(attr, scores=scores, meta=meta)


# --- SmoothGrad ----------------------------------------------------------------------------------

def _smoothgrad(ctx: _Context, x: torch.Tensor, p: dict[str, Any]) -> _Result:
    base = p["base"]
    if base not in METHODS or not METHODS[base].gradient or base == "smoothgrad":
        valid = [name for name, m in METHODS.items() if m.gradient and name != "smoothgrad"]
        raise CxrlensError(f"smoothgrad cannot wrap '{base}'; base must be one of: {', '.join(valid)}")
    if p["kind"] not in SMOOTHGRAD_KINDS:
        raise CxrlensError(f"unknown smoothgrad kind '{p['kind']}'; choose one of: {', '.join(SMOOTHGRAD_KINDS)}")
    n, b = int(p["n_samples"]), x.shape[0]
    if n < 1:
        raise CxrlensError(f"n_samples must be >= 1, got {n}")
    base_params = METHODS[base].resolve(dict(p["base_params"] or {}))
    baseline = base_params.get("baseline")
    if isinstance(baseline, torch.Tensor) and baseline.dim() == 4 and baseline.shape[0] == b > 1:
        base_params["baseline"] = baseline.repeat(n, 1, 1, 1)  # one copy per noise sample
    generator = torch.Generator(device=x.device).manual_seed(int(p["seed"]))
    noise = torch.randn((n * b, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    noisy = x.repeat(n, 1, 1, 1) + float(p["stdev"]) * noise  # sample-major: index = sample * B + image
    result = METHODS[base].fn(ctx, noisy, base_params)
    attr = result.attr.view(n, b, *result.attr.shape[1:])
    if p["kind"] == "smoothgrad":
        attr = attr.mean(0)
    elif p["kind"] == "smoothgrad_sq":
        attr = attr.pow(2).mean(0)
    else:
        attr = attr.var(0, unbiased=False)
    return _Result(attr, scores=ctx.scores_no_grad(x), meta={"base_params": _describe(base_params)})


# --- registry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One attribution method; call it like :func:`attribute` without ``method``."""

    name: str
    fn: Callable[[_Context, torch.Tensor, dict[str, Any]], _Result]
    defaults: dict[str, Any]
    signed: bool  # maps have meaningful signs (shown with a diverging colour map)
    gradient: bool  # can be wrapped by SmoothGrad
    needs_rewrite: bool  # uses backward rules on nonlinear modules (see explain.rewrite)
    description: str

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise CxrlensError(
                f"unknown parameter '{unknown[0]}' for method '{self.name}'; valid parameters: "
                f"{', '.join(self.defaults) or 'none'}"
            )
        return {**self.defaults, **params}

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: Sequence[int] | int,
                 **kwargs: Any) -> Attribution:
        return attribute(model, images, targets, method=self.name, **kwargs)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("occlusion", _occlusion, {"window": 50, "stride": 4, "baseline": 0.0, "incremental": True},
               True, False, False,
               "output drop when a window is replaced by the baseline, averaged over windows"),
        Method("saliency", _saliency, {"abs": True}, False, True, False, "absolute input gradient"),
        Method("input_x_gradient", _input_x_gradient, {}, True, True, False, "input times gradient"),
        Method("guided_backprop", _guided_backprop, {}, True, True, True,
               "gradient passing only positive gradients back through ReLUs"),
        Method("integrated_gradients", _integrated_gradients,
               {"n_steps": 50, "integration": "gausslegendre", "baseline": 0.0}, True, True, False,
               "path integral of gradients from the baseline"),
        Method("deeplift", _deeplift, {"baseline": 0.0}, True, True, True, "DeepLIFT, rescale rule"),
        Method("grad_cam", _grad_cam, {"layer": None, "relu": True, "interpolate": "bilinear"}, False, True,
               False, "gradient-weighted class activation map of a convolutional layer"),
        Method("guided_grad_cam", _guided_grad_cam, {"layer": None, "interpolate": "bilinear"}, True, True,
               True, "guided backprop times Grad-CAM"),
        Method("smoothgrad", _smoothgrad,
               {"base": "saliency", "n_samples": 16, "stdev": 0.15, "kind": "smoothgrad", "seed": 0,
                "base_params": None}, True, False, False,
               "average of a gradient method over noisy copies of the input"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CxrlensError(f"unknown attribution method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


@contextmanager
def _evaluating(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Eval mode, no parameter gradients (only input gradients are needed), optional channels-last;
    the model's own settings are restored afterwards."""
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for module, training in zip(model.modules(), modes, strict=True):
            module.training = training
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def _needs_rewrite(method: Method, params: dict[str, Any]) -> bool:
    if method.name == "smoothgrad":
        return METHODS.get(params["base"], method).needs_rewrite
    return method.needs_rewrite


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
    model; one that is not gets rewritten here, on every call: call ``make_explainable`` once
    instead when explaining many batches.
    """
    spec = get_method(method)
    resolved = spec.resolve(params)
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
    if _needs_rewrite(spec, resolved) and not is_explainable(model):
        model = make_explainable(model, images[:1])
    started = time.perf_counter()
    ctx = _Context(model, target_list, output, max_batch, channels_last, autocast_bf16, model_name)
    with _evaluating(model, channels_last):
        result = spec.fn(ctx, images, resolved)
    channel_maps = widen(result.attr)
    signed = spec.signed
    if spec.name == "smoothgrad":
        signed = resolved["kind"] == "smoothgrad" and METHODS[resolved["base"]].signed
    meta = {
        "method": spec.name,
        "params": _describe(resolved),
        "output": output,
        "targets": target_list,
        "signed": signed,
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
