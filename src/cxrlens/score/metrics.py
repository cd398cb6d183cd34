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
maps. Robustness: :func:`max_sensitivity` (Yeh et al. 2019).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.score.masks import dilate

#: (model, images [B, C, H, W]) -> attribution maps [B, T, H, W]
Explainer = Callable[[nn.Module, torch.Tensor], torch.Tensor]


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


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) along the last axis, ties given their average rank (as ``scipy.stats.rankdata``)."""
    values, order = x.sort(dim=-1, stable=True)
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[..., 1:] = values[..., 1:] != values[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), -1).values
    last = torch.cummin(torch.where(ends, pos, torch.full_like(pos, n)).flip(-1), -1).values.flip(-1)
    sorted_ranks = (first + last).double() / 2 + 1
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last axis (NaN where either side is constant)."""
    a, b = a.double(), b.double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return ((a * b).sum(-1) / denom.where(denom > 0, torch.ones_like(denom))).masked_fill(denom == 0, float("nan"))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of 2-D maps [..., H, W], pairwise over the leading axes."""
    if a.shape != b.shape:
        raise CxrlensError(f"cannot compare maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return pearson(rankdata(a.flatten(-2).double()), rankdata(b.flatten(-2).double()))


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
    blur_sigma: float | None = None,
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
    base = make_baseline(images, baseline, blur_sigma)
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
    seed: int = 0,
    random_auc: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUCs [B, T], and their gaps to a random pixel order:
    ``deletion_gap`` = random - deletion AUC and ``insertion_gap`` = insertion - random AUC (both
    positive for a faithful map). ``random_auc`` (from :func:`random_order_auc`) can be reused across
    methods, since the random order does not depend on the map."""
    kwargs = dict(steps=steps, baseline=baseline, output=output, max_batch=max_batch)
    deletion = perturbation_curves(model, images, maps, targets, mode="deletion", **kwargs)
    insertion = perturbation_curves(model, images, maps, targets, mode="insertion", **kwargs)
    if random_auc is None:
        random_auc = random_order_auc(model, images, targets, seed=seed, **kwargs)
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

    def passes(self, threshold: float = 0.5) -> bool:
        """The method passes when its maps change: mean Spearman to the fully randomised model < threshold."""
        return bool(torch.nanmean(self.spearman[-1]).item() < threshold)


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
    """(mean, low, high, n) of the finite values: percentile bootstrap of the mean over images."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if len(v) == 1 or n_boot < 1:
        return float(v.mean()), float(v.mean()), float(v.mean()), len(v)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(v.mean()), float(low), float(high), len(v)
