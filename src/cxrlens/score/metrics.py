"""Measured interpretability: every metric vectorised over images and explained classes.

Shapes: ``maps`` are attribution maps [B, T, H, W] (T explained classes; [B, H, W] also works),
``mask`` is bool [B, H, W] (shared by the T maps of an image) or [B, T, H, W]. Each metric returns
[B, T] float64 with NaN where it is undefined (an empty mask, a map with no positive mass).

Localisation (against radiologists' masks):

* :func:`mass_share` — share of the *positive* attribution inside a mask. Against ``lungs`` this is
  the lung focus; against ``opacity`` the relevance mass accuracy (Arras et al. 2022); against
  ``devices`` / ``outside_body`` the share on devices / outside the thorax. Negative attribution is
  evidence *against* the class, so it is left out (on non-negative maps this equals Quantus's
  ``RelevanceMassAccuracy``).
* :func:`relevance_rank_accuracy` — share of the K highest-ranked pixels inside the mask, K = mask
  size (Arras et al. 2022; equals Quantus's ``RelevanceRankAccuracy``).
* :func:`pointing_game` — 1 when a pixel holding the map's maximum lies in the mask dilated by
  ``tolerance`` px (Zhang et al. 2018 use 15 px); with tolerance 0 it equals Quantus's ``PointingGame``.

Faithfulness: :func:`perturbation_curves` (deletion / insertion, Petsiuk et al. 2018), :func:`auc`,
:func:`faithfulness` (AUCs and their gaps to a random pixel order). Sanity:
:func:`cascading_randomisation` (Adebayo et al. 2018), with :func:`spearman` and :func:`ssim` between
maps. Robustness: :func:`max_sensitivity` (Yeh et al. 2019). Statistics: :func:`bootstrap_ci`.

The scorecard's columns are a registry, :data:`SCORECARD_METRICS`: each is a function of
:class:`MetricInputs` registered with :func:`register_metric` beside its facts (higher is better,
needs the model or only the maps, how it reads the map's sign). A new column is one registered
function; the scorecard iterates the registry.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.registry import Registry
from cxrlens.score.masks import dilate

if TYPE_CHECKING:
    from cxrlens.score.config import ScoreConfig

#: (model, images [B, C, H, W]) -> attribution maps [B, T, H, W]
Explainer = Callable[[nn.Module, torch.Tensor], torch.Tensor]
SANITY_THRESHOLD = 0.5  # a method fails the randomisation check at a mean Spearman >= this


# --- localisation --------------------------------------------------------------------------------


def _flat(maps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [..., H, W] and a mask broadcast to them, both flattened to [..., H*W]."""
    if maps.shape[-2:] != mask.shape[-2:]:
        raise CxrlensError(
            f"map size {tuple(maps.shape[-2:])} differs from mask size {tuple(mask.shape[-2:])}; "
            "load the masks at the model's input size"
        )
    if mask.dim() == maps.dim() - 1:
        mask = mask.unsqueeze(-3)  # one mask per image, shared by its T maps
    mask = mask.to(maps.device).bool().expand_as(maps)
    return maps.flatten(-2).double(), mask.flatten(-2)


def mask_share(mask: torch.Tensor) -> torch.Tensor:
    """Area share of each mask [..., H, W]: what a uniformly random map scores on :func:`mass_share`."""
    return mask.flatten(-2).double().mean(-1)


def mass_share(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the positive attribution inside ``mask`` (NaN for an empty mask or no positive mass)."""
    a, m = _flat(maps, mask)
    pos = a.clamp(min=0)
    total = pos.sum(-1)
    share = (pos * m).sum(-1) / total.where(total > 0, torch.ones_like(total))
    return share.masked_fill((total <= 0) | (m.sum(-1) == 0), float("nan"))


def relevance_rank_accuracy(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the top-K pixels (K = mask size) that lie in the mask; NaN for an empty mask."""
    a, m = _flat(maps, mask)
    order = torch.argsort(a, dim=-1, descending=True, stable=True)
    hits = torch.gather(m, -1, order).long().cumsum(-1)
    k = m.sum(-1)
    found = torch.gather(hits, -1, (k - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (found.double() / k.clamp(min=1)).masked_fill(k == 0, float("nan"))


def pointing_game(maps: torch.Tensor, mask: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """1.0 when any pixel at the map's maximum lies in ``mask`` dilated by ``tolerance`` px, else 0.0;
    NaN for an empty mask. (A constant map has every pixel at its maximum, so it hits, as in Quantus.)"""
    grown = dilate(mask, tolerance) if tolerance > 0 else mask.bool()
    a, m = _flat(maps, grown)
    at_max = a == a.amax(-1, keepdim=True)
    hit = (at_max & m).any(-1).double()
    _, original = _flat(maps, mask)
    return hit.masked_fill(original.sum(-1) == 0, float("nan"))


# --- similarity between maps ---------------------------------------------------------------------


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of 2-D maps [..., H, W], pairwise over the leading axes
    (``scipy.stats.spearmanr`` per pair; NaN where either map is constant)."""
    if a.shape != b.shape:
        raise CxrlensError(f"cannot compare maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    x = a.detach().flatten(-2).reshape(-1, a.shape[-2] * a.shape[-1]).double().cpu().numpy()
    y = b.detach().flatten(-2).reshape(-1, b.shape[-2] * b.shape[-1]).double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # a constant map has no ranking: NaN
        rho = [stats.spearmanr(u, v).statistic for u, v in zip(x, y, strict=True)]
    return torch.tensor(rho, dtype=torch.float64).reshape(a.shape[:-2])


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 7, data_range: torch.Tensor | float | None = None,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity of 2-D maps [..., H, W], as ``skimage.metrics.structural_similarity``
    (uniform ``win_size`` window, sample covariance, border of win_size // 2 left out). ``data_range``
    defaults to max - min over both maps of each pair (as Quantus does)."""
    shape = a.shape[:-2]
    h, w = a.shape[-2:]
    if min(h, w) < win_size:
        raise CxrlensError(f"ssim needs maps of at least {win_size}x{win_size} px, got {h}x{w}")
    x = a.reshape(-1, 1, h, w).double()
    y = b.reshape(-1, 1, h, w).double()
    if data_range is None:
        both = torch.cat([x.flatten(1), y.flatten(1)], 1)
        rng = (both.amax(1) - both.amin(1)).clamp(min=1e-12).view(-1, 1, 1, 1)
    else:
        rng = torch.as_tensor(data_range, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
    # 'valid' averaging gives exactly skimage's values away from the border it crops anyway
    ux, uy = F.avg_pool2d(x, win_size, 1), F.avg_pool2d(y, win_size, 1)
    uxx, uyy, uxy = F.avg_pool2d(x * x, win_size, 1), F.avg_pool2d(y * y, win_size, 1), F.avg_pool2d(x * y, win_size, 1)
    cov_norm = win_size**2 / (win_size**2 - 1)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).reshape(shape)


# --- faithfulness: deletion and insertion --------------------------------------------------------


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with reflect padding (kernel radius 3 sigma)."""
    radius = max(1, min(int(math.ceil(3 * sigma)), min(images.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baseline(images: torch.Tensor, baseline: str | float | torch.Tensor = "blur",
                  blur_sigma: float | None = None) -> torch.Tensor:
    """What removed pixels become: ``"blur"`` (Gaussian, sigma = side / 40 by default, as in RISE's
    blurred insertion), ``"mean"`` (each image's channel means), a number, or a tensor like ``images``."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(images).expand_as(images)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(images, float(baseline))
    if baseline == "blur":
        return gaussian_blur(images, blur_sigma or max(1.0, images.shape[-1] / 40))
    if baseline == "mean":
        return images.mean((-2, -1), keepdim=True).expand_as(images)
    raise CxrlensError(f"unknown baseline {baseline!r}; use 'blur', 'mean', a number or a tensor")


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel by relevance, 0 = most relevant: [B, T, H*W] (ties in pixel order)."""
    flat = maps.flatten(-2)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order))


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Sequence[int],
    *,
    mode: str = "deletion",
    steps: int = 20,
    baseline: str | float | torch.Tensor = "blur",
    output: str = "sigmoid",
    max_batch: int = 64,
) -> torch.Tensor:
    """Model output for each image and target as its most relevant pixels are removed (``deletion``:
    replaced by the baseline) or revealed (``insertion``: the image grows out of the baseline), in
    ``steps`` equal steps. Returns [B, T, steps + 1]; entry 0 is the intact (deletion) or the baseline
    (insertion) image.

    Batched: all (image, target, step) perturbations are built from the pixel ranks by one
    comparison and stacked ``max_batch`` at a time into one forward pass, not looped per image.
    """
    if mode not in ("deletion", "insertion"):
        raise CxrlensError(f"mode must be 'deletion' or 'insertion', not {mode!r}")
    if output not in ("sigmoid", "logit"):
        raise CxrlensError(f"output must be 'sigmoid' or 'logit', not {output!r}")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    b, c, h, w = images.shape
    t = maps.shape[1]
    if maps.shape[0] != b or maps.shape[-2:] != (h, w) or t != len(targets):
        raise CxrlensError(
            f"maps {list(maps.shape)} do not fit images {list(images.shape)} and {len(targets)} targets"
        )
    if not isinstance(steps, int) or steps < 1:
        raise CxrlensError(f"steps must be a positive int, got {steps!r}")
    device = _device(model, images.device)
    images = images.to(device)
    base = make_baseline(images, baseline)
    ranks = pixel_ranks(maps.to(device))  # [B, T, N]
    n = h * w
    counts = torch.div(torch.arange(steps + 1, device=device) * n, steps, rounding_mode="floor")
    target_idx = torch.as_tensor(list(targets), device=device)
    jobs = torch.arange(b * t * (steps + 1), device=device)
    scores = torch.empty(len(jobs), device=device)
    for chunk in jobs.split(max_batch):
        bi, ti, si = chunk // (t * (steps + 1)), (chunk // (steps + 1)) % t, chunk % (steps + 1)
        selected = (ranks[bi, ti] < counts[si, None]).view(-1, 1, h, w)
        if mode == "deletion":
            x = torch.where(selected, base[bi], images[bi])
        else:
            x = torch.where(selected, images[bi], base[bi])
        out = model(x).float()
        picked = out[torch.arange(len(chunk), device=device), target_idx[ti]]
        scores[chunk] = torch.sigmoid(picked) if output == "sigmoid" else picked
    return scores.view(b, t, steps + 1).cpu()


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves [..., steps + 1] sampled at fractions 0, 1/steps, ..., 1 (trapezoid rule)."""
    steps = curves.shape[-1] - 1
    return (curves[..., 1:] + curves[..., :-1]).double().sum(-1) / (2 * steps)


def random_maps(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform random maps with the shape of ``like``: a random pixel order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(like.shape, generator=generator).to(like.device)


def faithfulness(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Sequence[int],
    *,
    steps: int = 20,
    baseline: str | float | torch.Tensor = "blur",
    output: str = "sigmoid",
    max_batch: int = 64,
    random_auc: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUCs [B, T], and their gaps to a random pixel order:
    ``deletion_gap`` = random - deletion AUC and ``insertion_gap`` = insertion - random AUC (both
    positive for a faithful map). ``random_auc`` (from :func:`random_order_auc`, default: its seed 0)
    can be reused across methods, since the random order does not depend on the map."""
    kwargs = dict(steps=steps, baseline=baseline, output=output, max_batch=max_batch)
    deletion = perturbation_curves(model, images, maps, targets, mode="deletion", **kwargs)
    insertion = perturbation_curves(model, images, maps, targets, mode="insertion", **kwargs)
    if random_auc is None:
        random_auc = random_order_auc(model, images, targets, **kwargs)
    out = {"deletion_auc": auc(deletion), "insertion_auc": auc(insertion)}
    out["deletion_gap"] = random_auc["deletion"] - out["deletion_auc"]
    out["insertion_gap"] = out["insertion_auc"] - random_auc["insertion"]
    out["deletion_curve"], out["insertion_curve"] = deletion, insertion
    return out


def random_order_auc(model: nn.Module, images: torch.Tensor, targets: Sequence[int], *, seed: int = 0,
                     **kwargs: object) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUCs [B, T] of a random pixel order (the reference for the gaps)."""
    b, _, h, w = images.shape
    maps = random_maps(torch.empty(b, len(targets), h, w), seed)
    return {
        mode: auc(perturbation_curves(model, images, maps, targets, mode=mode, **kwargs))  # type: ignore[arg-type]
        for mode in ("deletion", "insertion")
    }


# --- sanity: cascading model-parameter randomisation ---------------------------------------------


def randomisable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with ``reset_parameters`` (convolutions, linear layers, norms), in registration order:
    the same rule Quantus's MPRT uses."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "reset_parameters")]


@dataclass
class RandomisationResult:
    """Similarity of maps of the trained model to maps of progressively randomised copies.

    layers: the module randomised last at each checkpoint (top layer first); n_randomised: how many
    modules were randomised then; spearman, ssim: [checkpoints, B, T]."""

    layers: list[str]
    n_randomised: list[int]
    spearman: torch.Tensor
    ssim: torch.Tensor

    def final(self) -> dict[str, torch.Tensor]:
        """Similarities [B, T] to the fully randomised model."""
        return {"spearman": self.spearman[-1], "ssim": self.ssim[-1]}

    def curve(self, similarity: str = "spearman", pick: np.ndarray | None = None) -> list[float]:
        """Mean similarity per checkpoint over the finite (image, target) entries ``pick`` [B, T] selects
        (default all); NaN where none is left."""
        values = self.spearman if similarity == "spearman" else self.ssim
        return [_picked_mean(step, pick) for step in values]

    def passes(self, threshold: float = SANITY_THRESHOLD, pick: np.ndarray | None = None) -> bool:
        """The method passes when its maps change: the mean Spearman correlation of its maps to the
        fully randomised model's (over ``pick``) is below ``threshold``."""
        return bool(self.curve("spearman", pick)[-1] < threshold)


def _picked_mean(values: torch.Tensor, pick: np.ndarray | None) -> float:
    """Mean of the picked, finite entries; NaN (without a warning) when there are none."""
    chosen = values.numpy() if pick is None else np.where(pick, values.numpy(), np.nan)
    return float(np.nanmean(chosen)) if np.isfinite(chosen).any() else float("nan")


def _normalise_abs(maps: torch.Tensor) -> torch.Tensor:
    a = maps.abs().double()
    top = a.flatten(-2).amax(-1)[..., None, None]
    return a / top.where(top > 0, torch.ones_like(top))


def cascading_randomisation(
    model: nn.Module,
    explain: Explainer,
    images: torch.Tensor,
    *,
    steps: int | None = None,
    seed: int = 42,
    ssim_window: int = 7,
) -> RandomisationResult:
    """Adebayo et al. (2018)'s cascading randomisation: re-initialise the model's modules from the
    top (classifier) down, cumulatively, and compare the maps of each copy with the trained model's.

    Maps are compared as absolute values (normalised by their maximum) by Spearman rank correlation
    and SSIM, as Quantus's ``MPRT`` (abs=True) does. Each module is re-initialised by its own
    ``reset_parameters`` after ``torch.manual_seed(seed + 1)``, like Quantus, so the two agree
    exactly; the caller's RNG state is left untouched. ``steps``: explain after every module (None)
    or at ``steps`` evenly spaced checkpoints from "head only" to "all modules" (cheaper). The model
    itself is not changed (a copy is randomised).
    """
    original = _normalise_abs(explain(model, images))
    randomised = copy.deepcopy(model)
    modules = randomisable_modules(randomised)[::-1]
    if not modules:
        raise CxrlensError("the model has no module with parameters to randomise")
    total = len(modules)
    if steps is None:
        checkpoints = set(range(1, total + 1))
    else:
        checkpoints = {int(round(v)) for v in np.linspace(1, total, max(1, min(steps, total)))}
    layers, counts, rho, structural = [], [], [], []
    for i, (name, module) in enumerate(modules, 1):
        devices = sorted({p.device.index for p in module.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + 1)
            module.reset_parameters()
        if i not in checkpoints:
            continue
        maps = _normalise_abs(explain(randomised, images))
        layers.append(name)
        counts.append(i)
        rho.append(spearman(original, maps))
        if min(maps.shape[-2:]) >= ssim_window:
            structural.append(ssim(original, maps, win_size=ssim_window))
        else:
            structural.append(torch.full(maps.shape[:-2], float("nan"), dtype=torch.float64))
    return RandomisationResult(layers, counts, torch.stack(rho).cpu(), torch.stack(structural).cpu())


# --- robustness ----------------------------------------------------------------------------------


def max_sensitivity(
    model: nn.Module,
    explain: Explainer,
    images: torch.Tensor,
    *,
    n_samples: int = 5,
    radius: float = 0.02,
    seed: int = 0,
    original: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max-sensitivity (Yeh et al. 2019): the largest relative change ||e(x + d) - e(x)|| / ||e(x)||
    (Frobenius norms) over ``n_samples`` noises d uniform in [-radius, radius]^n. Returns [B, T].
    All noisy copies go to ``explain`` as one stacked batch."""
    if original is None:
        original = explain(model, images)
    b = images.shape[0]
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand((n_samples * b, *images.shape[1:]), generator=generator) * 2 - 1) * radius
    noisy = images.repeat(n_samples, 1, 1, 1) + noise.to(images)
    maps = explain(model, noisy).view(n_samples, *original.shape).double()
    diff = (maps - original.double()).flatten(-2).norm(dim=-1)
    denom = original.double().flatten(-2).norm(dim=-1)
    return (diff / denom.where(denom > 0, torch.ones_like(denom))).amax(0).masked_fill(denom == 0, float("nan"))


# --- statistics ----------------------------------------------------------------------------------


def bootstrap_ci(values: np.ndarray | Sequence[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values: percentile bootstrap of the mean over images
    (``scipy.stats.bootstrap``)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if len(v) == 1 or n_boot < 1:
        return float(v.mean()), float(v.mean()), float(v.mean()), len(v)
    result = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                             rng=np.random.default_rng(seed), vectorized=True)
    interval = result.confidence_interval
    return float(v.mean()), float(interval.low), float(interval.high), len(v)


# --- the scorecard's metrics: a registry -----------------------------------------------------------


@dataclass
class MetricInputs:
    """What a scorecard metric may read, for one model x attribution method over a mask set.

    ``masks`` holds the mask set's bool [B, H, W] masks by name (see :mod:`cxrlens.score.masks`;
    ``lungs``, ``opacity``, ``devices`` and ``outside_body`` always, all False where the
    radiologists drew none); ``subsets`` the image indices the costly metrics
    run on (``sanity``, ``robustness``). Work that several metrics share (the deletion / insertion
    curves, the randomised copies) is done once through :meth:`once`."""

    model: nn.Module
    explain: Explainer
    images: torch.Tensor  # [B, C, H, W] on the model's device
    maps: torch.Tensor  # [B, T, H, W]: the method's maps of ``images``
    targets: list[int]  # class index of each of the T maps
    masks: dict[str, torch.Tensor]
    subsets: dict[str, np.ndarray]
    config: ScoreConfig
    shared: dict[str, Any] = field(default_factory=dict)  # results of this model x method
    model_shared: dict[str, Any] = field(default_factory=dict)  # results of this model, for every method
    draw_seed: int | None = None  # seed of the random draws (pixel order, noise) of these images; None: config.seed

    @property
    def seed(self) -> int:
        """The seed of this batch's random draws: the scorecard gives every block of images its own, so
        that results do not depend on how the blocks are shared between processes."""
        return self.config.seed if self.draw_seed is None else self.draw_seed

    def once(self, key: str, compute: Callable[[], Any], per_model: bool = False) -> Any:
        """``compute()``, run once per method (or once per model) however many metrics ask for it."""
        store = self.model_shared if per_model else self.shared
        if key not in store:
            store[key] = compute()
        return store[key]

    def on_subset(self, subset: str, values: torch.Tensor | None) -> np.ndarray:
        """[B, T] float64 holding ``values`` (one row per image of ``subsets[subset]``), NaN elsewhere."""
        full = np.full(self.maps.shape[:2], np.nan)
        if values is not None:
            full[self.subsets[subset]] = values.detach().cpu().numpy()
        return full


MAP_SIGNS = ("positive", "order", "absolute", "value")


@dataclass(frozen=True)
class ScorecardMetric:
    """A scorecard column and the facts the scorecard needs about it (as torchmetrics declares
    ``higher_is_better`` on the metric).

    needs_model: False when computed from the maps and masks alone; True when it runs the model or
    the explainer again (costly). map_sign: how it reads a map's sign: ``positive`` (only positive
    attribution counts), ``order`` (signed values ranked: negative is least relevant),
    ``absolute`` (magnitude only), ``value`` (the signed values themselves)."""

    name: str
    compute: Callable[[MetricInputs], torch.Tensor | np.ndarray]  # -> [B, T], NaN where undefined
    higher_is_better: bool
    needs_model: bool
    map_sign: str
    description: str = ""

    def __call__(self, inputs: MetricInputs) -> np.ndarray:
        values = self.compute(inputs)
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        values = np.asarray(values, dtype=np.float64)
        if values.shape != tuple(inputs.maps.shape[:2]):
            raise CxrlensError(
                f"scorecard metric '{self.name}' returned shape {values.shape}, not [images, targets] "
                f"{tuple(inputs.maps.shape[:2])}"
            )
        return values


#: name -> metric, in the order of the scorecard's columns
SCORECARD_METRICS: Registry[ScorecardMetric] = Registry("scorecard metric", "choose from")


def register_metric(name: str, *, higher_is_better: bool, needs_model: bool, map_sign: str,
                    replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(inputs: MetricInputs) -> [B, T]`` as the scorecard column ``name``.
    Its docstring's first line is the description. Registering from outside the package works
    the same way; the scorecard, its table, plots, rankings and JSON pick the metric up."""
    if map_sign not in MAP_SIGNS:
        raise CxrlensError(f"map_sign must be one of {', '.join(MAP_SIGNS)}, not {map_sign!r}")

    def decorate(fn: Callable[[MetricInputs], torch.Tensor | np.ndarray]) -> Callable:
        description = (fn.__doc__ or "").strip().split("\n")[0]
        SCORECARD_METRICS.add(name, ScorecardMetric(name, fn, higher_is_better, needs_model, map_sign, description),
                              replace)
        return fn

    return decorate


def get_metric(name: str) -> ScorecardMetric:
    return SCORECARD_METRICS.lookup(name)


@register_metric("lung_focus", higher_is_better=True, needs_model=False, map_sign="positive")
def _lung_focus(x: MetricInputs) -> torch.Tensor:
    """Share of the positive attribution inside the lungs."""
    return mass_share(x.maps, x.masks["lungs"])


@register_metric("relevance_mass_accuracy", higher_is_better=True, needs_model=False, map_sign="positive")
def _relevance_mass_accuracy(x: MetricInputs) -> torch.Tensor:
    """Share of the positive attribution inside the opacity mask (Arras et al. 2022)."""
    return mass_share(x.maps, x.masks["opacity"])


@register_metric("relevance_rank_accuracy", higher_is_better=True, needs_model=False, map_sign="order")
def _relevance_rank_accuracy(x: MetricInputs) -> torch.Tensor:
    """Share of the K highest-ranked pixels inside the opacity mask, K = its size (Arras et al. 2022)."""
    return relevance_rank_accuracy(x.maps, x.masks["opacity"])


@register_metric("pointing_game", higher_is_better=True, needs_model=False, map_sign="order")
def _pointing_game(x: MetricInputs) -> torch.Tensor:
    """1 when the map's maximum lies in the opacity mask grown by the tolerance (Zhang et al. 2018)."""
    return pointing_game(x.maps, x.masks["opacity"], x.config.pointing_tolerance)


@register_metric("device_share", higher_is_better=False, needs_model=False, map_sign="positive")
def _device_share(x: MetricInputs) -> torch.Tensor:
    """Share of the positive attribution on devices (tubes, lines, electrodes)."""
    return mass_share(x.maps, x.masks["devices"])


@register_metric("outside_body_share", higher_is_better=False, needs_model=False, map_sign="positive")
def _outside_body_share(x: MetricInputs) -> torch.Tensor:
    """Share of the positive attribution outside the thorax."""
    return mass_share(x.maps, x.masks["outside_body"])


@register_metric("padding_share", higher_is_better=False, needs_model=False, map_sign="positive")
def _padding_share(x: MetricInputs) -> torch.Tensor:
    """Share of the positive attribution inside the zero padding and any black bars of the file."""
    return mass_share(x.maps, x.masks["padding"])


@register_metric("outside_body_peak", higher_is_better=False, needs_model=False, map_sign="value")
def _outside_body_peak(x: MetricInputs) -> torch.Tensor:
    """1 when the map's maximum lies outside the thorax (undefined for a map without positive values)."""
    peak = pointing_game(x.maps, x.masks["outside_body"])
    return peak.masked_fill(x.maps.flatten(-2).amax(-1) <= 0, float("nan"))


@register_metric("outside_body_reliance", higher_is_better=False, needs_model=True, map_sign="value")
def _outside_body_reliance(x: MetricInputs) -> np.ndarray:
    """Drop of the class probability when everything outside the thorax is blurred (no attribution used)."""
    return x.once("outside_body_reliance", lambda: outside_body_reliance(
        x.model, x.images, x.masks["outside_body"], x.targets, x.config.max_batch), per_model=True)


def outside_body_reliance(model: nn.Module, images: torch.Tensor, outside: torch.Tensor, targets: list[int],
                          max_batch: int = 16) -> np.ndarray:
    """[B, T]: how much each target's probability drops when everything outside the thorax is blurred
    (Gaussian, sigma = side / 20). A model that reads markers, tags or borders there loses evidence; one
    that reads the lungs does not. Independent of any attribution method."""
    blurred = make_baseline(images, "blur", images.shape[-1] / 20)
    edited = torch.where(outside.to(images.device)[:, None], blurred, images)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(torch.cat([model(part).float() for part in x.split(max_batch)]))[:, targets]

    return (probabilities(images) - probabilities(edited)).cpu().numpy().astype(np.float64)


def deletion_insertion(x: MetricInputs) -> dict[str, torch.Tensor]:
    """:func:`faithfulness` of the inputs' maps, run once per method; the random-order reference once per model."""

    def reference() -> dict[str, torch.Tensor]:
        return random_order_auc(x.model, x.images, x.targets, seed=x.seed, steps=x.config.steps,
                                baseline=x.config.baseline, max_batch=x.config.max_batch * 4)

    return x.once("faithfulness", lambda: faithfulness(
        x.model, x.images, x.maps, x.targets, steps=x.config.steps, baseline=x.config.baseline,
        max_batch=x.config.max_batch * 4, random_auc=x.once("random_order_auc", reference, per_model=True),
    ))


@register_metric("deletion_auc", higher_is_better=False, needs_model=True, map_sign="order")
def _deletion_auc(x: MetricInputs) -> torch.Tensor:
    """Area under the model output as the most relevant pixels are blurred away (Petsiuk et al. 2018)."""
    return deletion_insertion(x)["deletion_auc"]


@register_metric("insertion_auc", higher_is_better=True, needs_model=True, map_sign="order")
def _insertion_auc(x: MetricInputs) -> torch.Tensor:
    """Area under the model output as the most relevant pixels are revealed on a blurred image."""
    return deletion_insertion(x)["insertion_auc"]


@register_metric("deletion_gap", higher_is_better=True, needs_model=True, map_sign="order")
def _deletion_gap(x: MetricInputs) -> torch.Tensor:
    """Deletion AUC of a random pixel order minus the map's."""
    return deletion_insertion(x)["deletion_gap"]


@register_metric("insertion_gap", higher_is_better=True, needs_model=True, map_sign="order")
def _insertion_gap(x: MetricInputs) -> torch.Tensor:
    """Insertion AUC of the map minus a random pixel order's."""
    return deletion_insertion(x)["insertion_gap"]


@register_metric("faithfulness", higher_is_better=True, needs_model=True, map_sign="order")
def _faithfulness(x: MetricInputs) -> torch.Tensor:
    """Deletion gap + insertion gap: how much better than a random order the map orders the pixels."""
    result = deletion_insertion(x)
    return result["deletion_gap"] + result["insertion_gap"]


def randomisation(x: MetricInputs) -> RandomisationResult | None:
    """:func:`cascading_randomisation` on the ``sanity`` images, run once per method (None without images)."""
    index = x.subsets["sanity"]
    if not len(index):
        return None
    return x.once("randomisation", lambda: cascading_randomisation(
        x.model, x.explain, x.images[index], steps=x.config.sanity_steps, seed=x.config.seed + 42,
    ))


@register_metric("sanity_spearman", higher_is_better=False, needs_model=True, map_sign="absolute")
def _sanity_spearman(x: MetricInputs) -> np.ndarray:
    """Spearman correlation of the maps of the trained and the fully randomised model (Adebayo et al. 2018)."""
    result = randomisation(x)
    return x.on_subset("sanity", result.final()["spearman"] if result else None)


@register_metric("sanity_ssim", higher_is_better=False, needs_model=True, map_sign="absolute")
def _sanity_ssim(x: MetricInputs) -> np.ndarray:
    """SSIM of the maps of the trained and the fully randomised model."""
    result = randomisation(x)
    return x.on_subset("sanity", result.final()["ssim"] if result else None)


@register_metric("max_sensitivity", higher_is_better=False, needs_model=True, map_sign="value")
def _max_sensitivity(x: MetricInputs) -> np.ndarray:
    """Largest relative change of the map under small uniform noise (Yeh et al. 2019)."""
    index = x.subsets["robustness"]
    if not len(index):
        return x.on_subset("robustness", None)
    return x.on_subset("robustness", max_sensitivity(
        x.model, x.explain, x.images[index], n_samples=x.config.robustness_samples, radius=x.config.noise,
        seed=x.seed, original=x.maps[index],
    ))
