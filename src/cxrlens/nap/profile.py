"""The NAP profiler: one streaming pass of forward hooks over any number of images.

A NAP of a group of images is the mean feature map of a layer over the group's images; the
contrastive NAP is the group NAP minus the (unweighted) mean of all group NAPs, so it shows what is
special about a group. Feature maps that are constant over every image and position are "dead";
their share is reported and they are left out of rankings, distances and plots.

Forward hooks capture a batch's activations, which are folded at once into per-group running sums
(float64), per-map minima/maxima and per-group sums and sums of squares of the spatially averaged
maps. Memory depends on the layer sizes and the number of groups, never on the number of images.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cxrlens import distributed
from cxrlens.errors import CxrlensError
from cxrlens.io import progress_bar
from cxrlens.models import MODELS
from cxrlens.nap.config import NapConfig
from cxrlens.nap.groups import PRED_THRESHOLD, GroupExpr, class_index, resolve_groups

# --- layers --------------------------------------------------------------------------------------

def resolve_layers(
    model: nn.Module, layers: Sequence[str] | None, architecture: str | None = None
) -> dict[str, nn.Module]:
    """Modules to profile, by name: ``layers`` or the architecture's default NAP layers."""
    modules = dict(model.named_modules())
    if layers is None:
        if architecture not in MODELS:
            raise CxrlensError(
                f"model '{architecture}' is not a registered architecture, so it has no default NAP layers; "
                f"pass layers by name (top-level modules: {', '.join(_top_level(model))})"
            )
        layers = MODELS[architecture].nap_layers
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise CxrlensError("no layers given; pass at least one module name")
    chosen = {}
    for name in layers:
        if name not in modules or name == "":
            defaults = MODELS[architecture].nap_layers if architecture in MODELS else ()
            close = difflib.get_close_matches(str(name), [n for n in modules if n], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            default_text = f"default NAP layers: {', '.join(defaults)}; " if defaults else ""
            raise CxrlensError(
                f"unknown layer '{name}' for model {architecture or type(model).__name__}; {hint}"
                f"{default_text}top-level modules: {', '.join(_top_level(model))} "
                "(nested modules are named with dots, e.g. layer1.0.conv1)"
            )
        chosen[name] = modules[name]
    return chosen


def _top_level(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


# --- streaming accumulation ----------------------------------------------------------------------

class _LayerAccumulator:
    """Running per-group sums of one layer's (possibly gradient-weighted) activations.

    The arrays are numpy (so Python's tracemalloc sees them) and are updated in place through torch
    views, which lets one float64 GEMM per batch add every group's sum at once.
    """

    def __init__(self, name: str, num_groups: int):
        self.name, self.num_groups = name, num_groups
        self.shape: tuple[int, ...] | None = None  # per image, channel first

    def _allocate(self, act: torch.Tensor) -> None:
        self.raw_shape = tuple(act.shape[1:])
        self.shape = self.raw_shape if act.dim() > 2 else (act.shape[1], 1, 1)
        channels, size = self.shape[0], math.prod(self.shape)
        g = self.num_groups
        self.sums = np.zeros((g, size), dtype=np.float64)
        self.map_sums = np.zeros((g, channels), dtype=np.float64)  # of spatially averaged maps
        self.map_squares = np.zeros((g, channels), dtype=np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self._views = [torch.from_numpy(a) for a in (self.sums, self.map_sums, self.map_squares)]

    def update(self, act: torch.Tensor, profiled: torch.Tensor, masks: torch.Tensor) -> None:
        """``act``: raw activations [B, C, ...] (for dead maps); ``profiled``: what is averaged
        (the activations, or activation x gradient); ``masks``: [B, groups] float64 0/1."""
        if self.shape is None:
            self._allocate(act)
        if tuple(act.shape[1:]) != self.raw_shape:
            raise CxrlensError(
                f"layer {self.name} changed shape from {self.raw_shape} to {tuple(act.shape[1:])} between "
                "batches; all images must have the same size"
            )
        batch = act.shape[0]
        flat = act.detach().reshape(batch, self.shape[0], -1)
        # dead-map test: min and max over every image and position of the raw activation
        # (positions first, then images: reducing the contiguous axis first is twice as fast)
        np.minimum(self.min, flat.amin(dim=2).amin(dim=0).double().cpu().numpy(), out=self.min)
        np.maximum(self.max, flat.amax(dim=2).amax(dim=0).double().cpu().numpy(), out=self.max)
        values = profiled.detach().reshape(batch, -1).double()
        spatial_means = values.reshape(batch, self.shape[0], -1).mean(dim=2)
        masks_t = masks.t().to(values.device)
        sums, map_sums, map_squares = self._views
        if values.device.type == "cpu":
            sums.addmm_(masks_t, values)
            map_sums.addmm_(masks_t, spatial_means)
            map_squares.addmm_(masks_t, spatial_means * spatial_means)
        else:  # accumulate on the device, fold into the host arrays once per batch
            sums += (masks_t @ values).cpu()
            map_sums += (masks_t @ spatial_means).cpu()
            map_squares += (masks_t @ spatial_means.square()).cpu()

    @property
    def nbytes(self) -> int:
        if self.shape is None:
            return 0
        return sum(a.nbytes for a in (self.sums, self.map_sums, self.map_squares, self.min, self.max))

    def reduce(self) -> None:
        """Add up the sums of every process (and take min / max of the extremes); a process that saw
        no image allocates zeros first, from the shape another one saw."""
        shapes = [s for s in distributed.gather(self.raw_shape if self.shape is not None else None) if s is not None]
        if not shapes:
            return
        if self.shape is None:
            self._allocate(torch.empty((1, *shapes[0])))
        for name, op in (("sums", "sum"), ("map_sums", "sum"), ("map_squares", "sum"), ("min", "min"), ("max", "max")):
            getattr(self, name)[...] = distributed.all_reduce(getattr(self, name), op)


@dataclass
class LayerNap:
    """NAP results of one layer. Group axes follow ``NapResult.groups``; empty groups hold NaN."""

    name: str
    nap: np.ndarray  # [G, C, h, w] mean feature maps per group
    contrastive: np.ndarray  # [G, C, h, w] group NAP minus the mean of the group NAPs
    dead: np.ndarray  # [C] bool: constant over every image and position
    act_min: np.ndarray  # [C]
    act_max: np.ndarray  # [C]
    map_mean: np.ndarray  # [G, C] group mean of the spatially averaged map
    map_std: np.ndarray  # [G, C] its sample standard deviation within the group
    map_score: np.ndarray  # [C] mean |contrastive NAP| over groups and positions (dead maps: NaN)
    top_maps: np.ndarray  # [<=TOP_MAPS] map indices with the highest map_score
    distances: dict[str, np.ndarray]  # [G, G] per metric
    separation: np.ndarray | None  # [C] |mean_a - mean_b| / pooled std, for the separated pair
    separation_order: np.ndarray | None  # map indices, best separating first (dead maps last)

    @property
    def dead_share(self) -> float:
        return float(self.dead.mean()) if self.dead.size else 0.0


@dataclass
class NapResult:
    """NAPs of one model over one data set."""

    model: str
    architecture: str | None
    image_size: int | None
    groups: list[str]
    expressions: list[str]
    counts: np.ndarray  # [G] images per group
    images: int
    layers: dict[str, LayerNap]
    input_mean: np.ndarray  # [G, 3, H, W] mean input image per group
    input_contrast: np.ndarray  # [G, 3, H, W] minus the mean of the group means
    gradient_class: str | None = None  # class whose score weights the activations, if any
    contrast_weighted: bool = False
    separated: tuple[str, str] | None = None
    accumulator_bytes: int = 0


class _ModelProfiler:
    """Hooks on one model's layers and the accumulators they feed."""

    def __init__(
        self, name: str, model: nn.Module, layers: dict[str, nn.Module], groups: list[tuple[str, GroupExpr]],
        gradient_class: int | None, num_classes: int | None = None,
    ):
        self.name, self.model, self.layers, self.groups = name, model, layers, groups
        self.gradient_class, self.num_classes = gradient_class, num_classes
        self.need_predictions = any(g.uses_predictions for _, g in groups)
        self.accumulators = {n: _LayerAccumulator(n, len(groups)) for n in layers}
        self.counts = np.zeros(len(groups), dtype=np.int64)
        self.input_sums: np.ndarray | None = None
        self.input_shape: tuple[int, ...] = ()
        self.images = 0
        self.captured: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.clone: set[str] = set()  # layers whose output is changed in place later in the forward
        self.handles: list = []
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def __enter__(self) -> _ModelProfiler:
        self.was_training = self.model.training
        self.model.eval()  # BatchNorm must use its running statistics, not update them
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.captured.clear()
        self.model.train(self.was_training)

    def _hook(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise CxrlensError(
                    f"layer {name} of {self.name} returns {type(output).__name__}, not a [batch, channels, ...] "
                    "tensor; choose a module that outputs feature maps"
                )
            self.calls[name] = self.calls.get(name, 0) + 1
            self.captured[name] = output
            self.versions[name] = output._version
            if name in self.clone:  # the rest of the network gets (and may overwrite) a copy
                return output.clone()
            return None

        return hook

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Logits and, when gradient-weighted, d(class logit)/d(activation) of every hooked layer."""
        grad_mode = self.gradient_class is not None
        for attempt in range(2):
            self.captured.clear()
            self.calls.clear()
            # no_grad, not inference_mode: version counters must work for the in-place check below
            with torch.enable_grad() if grad_mode else torch.no_grad():
                x = images.detach().requires_grad_(grad_mode)  # a graph even if the weights are frozen
                logits = self.model(x)
            changed = {n for n, t in self.captured.items() if t._version != self.versions[n]}
            if not changed or attempt == 1:
                break
            self.clone |= changed  # a later in-place op overwrote a captured output: hand on a copy, redo
        missing = [n for n in self.layers if n not in self.captured]
        if missing:
            raise CxrlensError(f"layer(s) {', '.join(missing)} of {self.name} did not run in the forward pass")
        repeated = [n for n, c in self.calls.items() if c > 1]
        if repeated:
            raise CxrlensError(
                f"layer(s) {', '.join(repeated)} of {self.name} run more than once per forward pass, so their "
                "feature maps are ambiguous; choose modules that run once (e.g. a whole stage)"
            )
        if self.need_predictions or grad_mode:
            self._check_logits(logits)
        if not grad_mode:
            return logits, None
        score = logits[:, self.gradient_class].sum()  # images are independent in eval mode
        grads = torch.autograd.grad(score, [self.captured[n] for n in self.layers], allow_unused=True)
        return logits.detach(), list(grads)

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or (self.num_classes is not None and logits.shape[1] != self.num_classes):
            raise CxrlensError(
                f"model {self.name} outputs shape {tuple(logits.shape)}, but the taxonomy has "
                f"{self.num_classes} classes; use a model trained on this taxonomy"
            )

    def update(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        logits, grads = self._forward(images.to(self.device))
        labels = targets.detach().cpu() > 0.5
        predictions = (torch.sigmoid(logits.float()).cpu() >= PRED_THRESHOLD) if self.need_predictions else None
        masks = torch.stack(
            [torch.as_tensor(g.evaluate(labels, predictions)).reshape(-1) for _, g in self.groups], dim=1
        ).double()
        self.counts += masks.sum(0).long().numpy()
        self.images += images.shape[0]
        with torch.no_grad():
            for i, name in enumerate(self.layers):
                act = self.captured[name]
                profiled = act
                if grads is not None:
                    grad = grads[i] if grads[i] is not None else torch.zeros_like(act)
                    profiled = act.detach() * grad
                self.accumulators[name].update(act, profiled, masks.to(act.device))
            flat = images.detach().reshape(images.shape[0], -1).double().cpu()
            if self.input_sums is None:
                self.input_shape = tuple(images.shape[1:])
                self.input_sums = np.zeros((len(self.groups), flat.shape[1]), dtype=np.float64)
            torch.from_numpy(self.input_sums).addmm_(masks.t(), flat)
        self.captured.clear()  # drop the batch's activations before the next batch

    def reduce(self) -> None:
        """Combine the accumulators of every process (each profiled its own share of the images)."""
        for accumulator in self.accumulators.values():
            accumulator.reduce()
        self.counts = distributed.all_reduce(self.counts)
        self.images = int(distributed.all_reduce(np.array([self.images]))[0])
        shapes = [s for s in distributed.gather(self.input_shape or None) if s is not None]
        if shapes and self.input_sums is None:
            self.input_shape = shapes[0]
            self.input_sums = np.zeros((len(self.groups), math.prod(self.input_shape)), dtype=np.float64)
        if self.input_sums is not None:
            self.input_sums = distributed.all_reduce(self.input_sums)

    @property
    def nbytes(self) -> int:
        extra = self.input_sums.nbytes if self.input_sums is not None else 0
        return extra + self.counts.nbytes + sum(a.nbytes for a in self.accumulators.values())


def _finish_layer(
    acc: _LayerAccumulator, counts: np.ndarray, weighted: bool, pair: tuple[int, int] | None, top_k: int
) -> LayerNap:
    g = len(counts)
    valid = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        nap = acc.sums / counts[:, None]
        nap[~valid] = np.nan
        weights = counts[valid] / counts[valid].sum() if weighted else np.full(valid.sum(), 1 / valid.sum())
        centre = weights @ nap[valid]
        contrastive = nap - centre
        map_mean = acc.map_sums / counts[:, None]
        # squared deviations from streamed sums of squares (float64 keeps the cancellation harmless)
        map_ss = np.clip(acc.map_squares - counts[:, None] * np.nan_to_num(map_mean) ** 2, 0, None)
        map_std = np.sqrt(map_ss / (counts[:, None] - 1))  # sample std; NaN for groups of < 2 images
    shape = (g, *acc.shape)
    dead = acc.max == acc.min
    channels = acc.shape[0]
    per_map = np.abs(contrastive[valid]).reshape(valid.sum(), channels, -1)
    map_score = per_map.mean(axis=(0, 2)) if valid.any() else np.full(channels, np.nan)
    map_score[dead] = np.nan
    ranked = np.argsort(np.where(np.isnan(map_score), np.inf, -map_score), kind="stable")
    top_maps = ranked[: min(top_k, int((~dead).sum()))]
    # distances between groups over the live maps
    live = np.repeat(~dead, math.prod(acc.shape[1:]))
    flat, flat_c = nap[:, live], contrastive[:, live]
    distances = {
        "euclidean": _pairwise(flat, "euclidean"),
        "cosine": _pairwise(flat, "cosine"),
        "cosine_contrastive": _pairwise(flat_c, "cosine"),
    }
    separation = order = None
    if pair is not None:
        a, b = pair
        na, nb = counts[a], counts[b]
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.sqrt((map_ss[a] + map_ss[b]) / (na + nb - 2))
            diff = np.abs(map_mean[a] - map_mean[b])
            separation = np.where(pooled > 0, diff / pooled, np.where(diff > 0, np.inf, 0.0))
        if na + nb <= 2 or na == 0 or nb == 0:
            separation = np.full(channels, np.nan)
        separation[dead] = np.nan
        order = np.argsort(np.where(np.isnan(separation), np.inf, -separation), kind="stable")
    return LayerNap(
        acc.name, nap.reshape(shape), contrastive.reshape(shape), dead, acc.min.copy(), acc.max.copy(),
        map_mean, map_std, map_score, top_maps, distances, separation, order,
    )


def _pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    """[G, G] distances between the rows of ``x`` [G, D]; rows with NaN (empty groups) give NaN."""
    if metric == "euclidean":  # from differences, not from a Gram matrix: no cancellation
        return np.stack([np.sqrt(np.einsum("jd,jd->j", diff := x - row, diff)) for row in x])
    gram = x @ x.T
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 1.0 - gram / np.outer(norms, norms)
    out[np.outer(norms, norms) == 0] = np.nan
    return out


def _default_pair(group_names: list[str]) -> tuple[str, str] | None:
    if "COVID-19" in group_names and "Pneumonia without COVID-19" in group_names:
        return ("COVID-19", "Pneumonia without COVID-19")
    return tuple(group_names[:2]) if len(group_names) >= 2 else None


def _separated_pair(group_names: list[str], separate: tuple[str, str] | None) -> tuple[str, str] | None:
    pair_names = tuple(separate) if separate is not None else _default_pair(group_names)
    for n in pair_names or ():
        if n not in group_names:
            raise CxrlensError(f"group '{n}' to separate is not a group; the groups are: {', '.join(group_names)}")
    return pair_names


def _gradient_class(gradient_weighted: bool | str, classes: Sequence[str]) -> int | None:
    """The class whose logit's gradient weights the activations (None: plain NAPs)."""
    if gradient_weighted is True:
        return 0
    if isinstance(gradient_weighted, str) and gradient_weighted:
        return class_index(gradient_weighted, classes)
    return None


def _stream(profilers: list[_ModelProfiler], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            total: int | None, progress: bool) -> None:
    """Feed every batch to every profiler, hooks attached only for the pass."""
    names = ", ".join(p.name for p in profilers)
    bar = progress_bar(total=total, unit="img", desc=f"NAP {names}", enabled=progress, leave=False)
    try:
        for p in profilers:
            p.__enter__()
        for images, targets in batches:
            for p in profilers:
                p.update(images, targets)
            bar.update(images.shape[0])
    finally:
        for p in profilers:
            p.__exit__(None, None, None)
        bar.close()


def _finish_model(p: _ModelProfiler, named_groups: list[tuple[str, GroupExpr]], pair_names: tuple[str, str] | None,
                  config: NapConfig) -> dict:
    """The NapResult fields a profiler's sums give: per-layer NAPs and the mean input per group."""
    if p.images == 0:
        raise CxrlensError("no images to profile; check the manifest or split is not empty")
    counts = p.counts.astype(np.float64)
    if not (counts > 0).any():
        raise CxrlensError(f"every group is empty over the {p.images} images; check the group expressions")
    group_names = [n for n, _ in named_groups]
    pair = (group_names.index(pair_names[0]), group_names.index(pair_names[1])) if pair_names else None
    layer_results = {
        n: _finish_layer(a, counts, config.contrast_weighted, pair, config.top_k) for n, a in p.accumulators.items()
    }
    valid = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        input_mean = p.input_sums / counts[:, None]
    input_mean[~valid] = np.nan
    n_valid = valid.sum()
    weights = counts[valid] / counts[valid].sum() if config.contrast_weighted else np.full(n_valid, 1 / n_valid)
    input_contrast = input_mean - weights @ input_mean[valid]
    shape = (len(counts), *p.input_shape)
    return dict(
        groups=group_names, expressions=[g.text for _, g in named_groups], counts=p.counts.copy(), images=p.images,
        layers=layer_results, input_mean=input_mean.reshape(shape), input_contrast=input_contrast.reshape(shape),
        contrast_weighted=config.contrast_weighted, separated=pair_names, accumulator_bytes=p.nbytes,
    )


def compute_naps(
    models: Mapping[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classes: Sequence[str],
    config: NapConfig | None = None,
    *,
    architectures: Mapping[str, str] | None = None,
    total: int | None = None,
    image_size: int | None = None,
) -> dict[str, NapResult]:
    """NAPs of several models in one streaming pass over ``batches`` of (images [B,3,H,W], targets [B,K]).

    ``config``: layers, groups, gradient weighting, contrast centre, separated pair, top maps,
    progress bar (see :class:`NapConfig`; layers None: each architecture's defaults, where
    ``architectures`` maps model name -> registry name, by default the model name itself). Gradient
    weighting profiles activation x d(class logit)/d(activation) instead of the activation (after
    Krug & Stober's GradNAPs); dead maps are still judged on the raw activations. ``total``: images,
    for the progress bar; ``image_size``: recorded in the results (default ``config.image_size``).
    Under several processes (:mod:`cxrlens.distributed`) each passes its own share of the batches; the
    sums are added up across processes, so every process returns the NAPs of all the images.
    """
    config = config or NapConfig()
    config.check()
    if not models:
        raise CxrlensError("no models given for NAPs")
    architectures = dict(architectures or {})
    named_groups = resolve_groups(config.groups, classes)
    pair_names = _separated_pair([n for n, _ in named_groups], config.separate)
    grad_class = _gradient_class(config.gradient_weighted, classes)
    profilers = []
    for name, model in models.items():
        layers = resolve_layers(model, config.layers_for(name), architectures.get(name, name))
        profilers.append(_ModelProfiler(name, model, layers, named_groups, grad_class, len(classes)))
    _stream(profilers, batches, total, config.progress and distributed.is_main())
    if distributed.active():  # every process profiled its own batches: add the sums up
        for p in profilers:
            p.reduce()
    return {
        p.name: NapResult(
            model=p.name, architecture=architectures.get(p.name, p.name if p.name in MODELS else None),
            image_size=image_size if image_size is not None else config.image_size,
            gradient_class=classes[grad_class] if grad_class is not None else None,
            **_finish_model(p, named_groups, pair_names, config),
        )
        for p in profilers
    }
