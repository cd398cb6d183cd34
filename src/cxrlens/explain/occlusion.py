"""Occlusion sweeps: full passes, or incremental ones where they are exact and pay (an explicit plan).

:func:`plan_occlusion` decides how a sweep runs and says why, in :attr:`OcclusionPlan.reason`
("incremental up to layer ..." or "brute force, because ..."). Every step is an explicit check:

* enough windows to be worth planning (:data:`MIN_WINDOWS`);
* the model can be traced (:func:`cxrlens.explain.incremental.trace`), and its first operation on the
  image is local (a convolution or pooling, not a fixed-size patch embedding or a global operation);
* the cheapest plan (see :mod:`cxrlens.explain.incremental`) saves at least 1 - :data:`MAX_COST` of the
  work of full passes, by its cost model;
* exactness: on three probe windows (first, centre, last) the incremental sweep's outputs equal full
  passes' to :data:`TOLERANCE` relative, or the sweep runs full passes.

Errors raised while sweeping are real errors and reach the caller.

Approximate mode (:class:`Approximation`, never the default) sweeps every second window position per
axis and interpolates the others (``grid``, 4x fewer windows), or caps every box at a share of its
map's side (``projective``: Krypton's projective-field thresholding); it measures its error against
exact outputs on :data:`ERROR_SAMPLES` windows spread over the image, reported with the maps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlens.explain import incremental as inc

MIN_WINDOWS = 32  # planning costs a few forward passes; not worth it for short sweeps
MAX_COST = 0.85  # use a plan only when it saves at least 15 % of the work
TOLERANCE = 1e-4  # relative: float32 sums in a different order (crop vs whole image) differ by a few ulps
BF16_TOLERANCE = 4 * 2.0**-8  # under bfloat16 autocast: a few roundings of its 8-bit mantissa
APPROXIMATE_THRESHOLD = 0.5  # default box side share of projective approximate mode
ERROR_SAMPLES = 16  # windows on which approximate mode is compared with exact outputs


@dataclass
class Runner:
    """How the explained outputs of a batch are computed: ``prepare`` (memory format), ``context``
    (autocast or nothing), the ``model`` and ``head`` (model output -> explained outputs [N, T])."""

    model: nn.Module
    head: Callable[[Any], torch.Tensor]
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    context: Callable[[], AbstractContextManager] = nullcontext
    tolerance: float = TOLERANCE

    def full(self, batch: torch.Tensor) -> torch.Tensor:
        with self.context():
            out = self.model(self.prepare(batch))
        return self.head(out)


@dataclass
class OcclusionPlan:
    """How a sweep runs: ``incremental`` is the verified plan, or None for full passes; ``reason`` says why,
    for the method's metadata. With ``approximate``, that plan runs and ``incremental`` (if any) is the
    exact one its error is measured against."""

    incremental: inc.Plan | None
    reason: str
    approximate: inc.Plan | None = None
    seconds: float = 0.0  # spent planning (tracing, one pass for shapes, checking the probe windows)

    @property
    def layer(self) -> str | None:
        chosen = self.approximate or self.incremental
        return None if chosen is None else chosen.last_box


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window positions along one side: from 0 in steps of ``stride`` until the side is covered
    (the last window may stick out and is then cut off), as Captum does."""
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def occluded_copy(image: torch.Tensor, base: torch.Tensor, window: tuple[int, int],
                  size: tuple[int, int]) -> torch.Tensor:
    """``image`` [C, H, W] with the window at ``window`` (top-left corner) of ``size`` replaced by ``base``."""
    (y0, x0), (wh, ww) = window, size
    out = image.clone()
    out[:, y0: y0 + wh, x0: x0 + ww] = base[:, y0: y0 + wh, x0: x0 + ww]
    return out


def probe_windows(windows: list[tuple[int, int]], h: int, w: int) -> list[tuple[int, int]]:
    """The first, the last and the most central window: the boxes at both corners and in the middle."""
    centre = min(windows, key=lambda win: abs(2 * win[0] - h) + abs(2 * win[1] - w))
    return list(dict.fromkeys([windows[0], centre, windows[-1]]))


def full_scores(runner: Runner, image: torch.Tensor, base: torch.Tensor, windows: list[tuple[int, int]],
                size: tuple[int, int], max_batch: int) -> torch.Tensor:
    """Scores [len(windows), T] of ``image`` [C, H, W] with each window replaced by ``base``, by full passes."""
    batches = [windows[i: i + max_batch] for i in range(0, len(windows), max_batch)]
    return torch.cat([runner.full(torch.stack([occluded_copy(image, base, win, size) for win in batch]))
                      for batch in batches])


def _describe(p: inc.Plan) -> str:
    return (f"incremental up to layer {p.last_box} (about {p.cost:.0%} of full passes; "
            f"{p.box_convs} of {p.convs} convolutions on boxes)")


def _traced(runner: Runner, image: torch.Tensor, windows: list[tuple[int, int]], size: tuple[int, int],
            threshold: float | None) -> tuple[inc.Plan | None, inc.Plan | None, str | None]:
    """The exact plan and (with ``threshold``) the approximate one, or why there is none."""
    try:
        gm, opaque = inc.trace(runner.model)
    except Exception as exc:  # noqa: BLE001 - untraceable root code: full passes, with the reason
        return None, None, f"the model cannot be traced ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    shapes = inc.shapes_of(gm, runner.prepare(image), runner.context)
    boxes = inc.input_boxes(windows, size, tuple(image.shape[-2:]), per_axis=True)
    exact = inc.plan(gm, shapes, boxes)
    approximate = None if threshold is None else inc.plan(gm, shapes, boxes, threshold)
    first = next((s for s in exact.steps if s.kind != "input" and s.mode != inc.CONST), None)
    if exact.last_box is None:
        name = None if first is None else inc.module_name(first.node)
        if name in opaque:
            return None, None, f"layer {name}, the first on the image, cannot be traced ({opaque[name]})"
        return None, None, f"the first operation on the image (layer {name}) is not a known local one"
    return exact, approximate, None


def _verify(runner: Runner, p: inc.Plan, image: torch.Tensor, base: torch.Tensor, windows: list[tuple[int, int]],
            size: tuple[int, int]) -> str | None:
    """Why the incremental sweep is not exact on the probe windows, or None."""
    h, w = image.shape[-2:]
    probes = probe_windows(windows, h, w)
    expected = full_scores(runner, image[0], base[0], probes, size, len(probes))
    actual = sweep_scores(runner, p, image, base, probes, size, len(probes))
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    if not error <= runner.tolerance * scale + 1e-6:
        return (f"the incremental sweep ({_describe(p)}) is off by {error:.3g} (scale {scale:.3g}) on the probe "
                f"windows {probes}")
    return None


def plan_occlusion(runner: Runner, images: torch.Tensor, baseline: torch.Tensor, windows: list[tuple[int, int]],
                   size: tuple[int, int], max_batch: int, incremental: bool = True,
                   approximate: float | None = None) -> tuple[OcclusionPlan, torch.Tensor]:
    """Decide how to sweep ``images`` [B, C, H, W] (explicit checks, each with its reason) and score the
    unoccluded images: returns the plan and the scores [B, T]."""
    scores = torch.cat([runner.full(chunk) for chunk in images.split(max_batch)])
    started = time.perf_counter()
    plan = _decide(runner, images, baseline, windows, size, incremental, approximate)
    plan.seconds = time.perf_counter() - started
    return plan, scores


def _decide(runner: Runner, images: torch.Tensor, baseline: torch.Tensor, windows: list[tuple[int, int]],
            size: tuple[int, int], incremental: bool, approximate: float | None) -> OcclusionPlan:
    if not incremental:
        return OcclusionPlan(None, "brute force, because incremental=False")
    if len(windows) < MIN_WINDOWS:
        return OcclusionPlan(None, f"brute force, because {len(windows)} windows are too few to plan for "
                                   f"(at least {MIN_WINDOWS})")
    exact, approx, problem = _traced(runner, images[:1], windows, size, approximate)
    if problem is not None:
        return OcclusionPlan(None, f"brute force, because {problem}")
    assert exact is not None
    if approx is not None:  # the exact plan, where it pays and is exact, gives the reference outputs
        usable = exact.cost <= MAX_COST and _verify(runner, exact, images[:1], baseline[:1], windows, size) is None
        return OcclusionPlan(exact if usable else None, _describe(approx), approx)
    if exact.cost > MAX_COST:
        return OcclusionPlan(None, f"brute force, because the best plan ({_describe(exact)}) saves too little "
                                   f"(at most {MAX_COST:.0%} of full passes)")
    problem = _verify(runner, exact, images[:1], baseline[:1], windows, size)
    if problem is not None:
        return OcclusionPlan(None, f"brute force, because {problem}")
    return OcclusionPlan(exact, _describe(exact))


def _keep(plans: list[inc.Plan]) -> Callable[[Any], bool]:
    needed: set = set()
    for p in plans:
        needed |= p.stored | {s.node for s in p.steps if s.mode == inc.CONST}
    return needed.__contains__


def sweep_scores(runner: Runner, p: inc.Plan, image: torch.Tensor, base: torch.Tensor,
                 windows: list[tuple[int, int]], size: tuple[int, int], max_batch: int,
                 stored: dict | None = None) -> torch.Tensor:
    """Scores [len(windows), T] of ``image`` [1, C, H, W] occluded by ``base`` [1, C, H, W] at each
    window, by the incremental plan ``p``."""
    prepared = runner.prepare(image)
    if stored is None:
        stored, _ = inc.store(p.gm, prepared, _keep([p]), runner.context)
    sweep = inc.Sweep(p, stored, prepared, runner.prepare(base), size, runner.context)
    return torch.cat([runner.head(sweep.run(windows[i: i + max_batch])) for i in range(0, len(windows), max_batch)])


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over range(n) (all of them when n <= k)."""
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))


@dataclass(frozen=True)
class Approximation:
    """Approximate mode. ``grid``: sweep every ``factor``-th window position along each axis (and the last)
    and interpolate the output drops of the others linearly; ``projective``: every box at most
    ``threshold`` of its map's side (Krypton's projective-field thresholding)."""

    kind: str = "grid"
    factor: int = 2
    threshold: float = APPROXIMATE_THRESHOLD

    def describe(self, swept: int, total: int) -> str:
        if self.kind == "grid":
            return (f"approximate: one window position in {self.factor} per axis swept ({swept} of {total} "
                    "windows), the others interpolated")
        return f"approximate: boxes at most {self.threshold:.0%} of each side"


@dataclass
class GridSweep:
    """Output drops on a grid of window positions: ``plan`` (how it ran), ``scores`` [B, T] of the
    unoccluded images, ``drops`` [B, T, rows, cols], and per image the measured error of approximate mode."""

    plan: OcclusionPlan
    scores: torch.Tensor
    drops: torch.Tensor
    errors: list[dict[str, Any]] | None = None


def coarse(starts: list[int], factor: int) -> list[int]:
    """Every ``factor``-th position and the last one."""
    return sorted(set(starts[::factor]) | {starts[-1]})


def interpolation(fine: list[int], swept: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Weights [len(fine), len(swept)] of linear interpolation between swept positions (pixels)."""
    weights = torch.zeros(len(fine), len(swept), dtype=dtype)
    for i, position in enumerate(fine):
        j = min(int(np.searchsorted(swept, position, side="right")) - 1, len(swept) - 1)
        if swept[j] == position or j == len(swept) - 1:
            weights[i, j] = 1.0
        else:
            t = (position - swept[j]) / (swept[j + 1] - swept[j])
            weights[i, j], weights[i, j + 1] = 1 - t, t
    return weights


def _image_scores(plan: OcclusionPlan, runner: Runner, image: torch.Tensor, base: torch.Tensor,
                  windows: list[tuple[int, int]], size: tuple[int, int],
                  max_batch: int) -> tuple[torch.Tensor, dict | None]:
    """Scores [len(windows), T] of ``image`` [C, H, W] occluded by ``base`` [C, H, W] as the plan says, and the
    stored maps an exact incremental sweep of the same image can reuse."""
    chosen = plan.approximate or plan.incremental
    if chosen is None:
        return full_scores(runner, image, base, windows, size, max_batch), None
    plans = [p for p in (plan.approximate, plan.incremental) if p is not None]
    stored, _ = inc.store(chosen.gm, runner.prepare(image[None]), _keep(plans), runner.context)
    return sweep_scores(runner, chosen, image[None], base[None], windows, size, max_batch, stored), stored


def _exact_scores(plan: OcclusionPlan, runner: Runner, image: torch.Tensor, base: torch.Tensor,
                  windows: list[tuple[int, int]], size: tuple[int, int], max_batch: int,
                  stored: dict | None) -> torch.Tensor:
    if plan.incremental is not None and stored is not None:
        return sweep_scores(runner, plan.incremental, image[None], base[None], windows, size, max_batch, stored)
    return full_scores(runner, image, base, windows, size, max_batch)


def sweep_grid(runner: Runner, images: torch.Tensor, baseline: torch.Tensor, ys: list[int], xs: list[int],
               size: tuple[int, int], max_batch: int, incremental: bool = True,
               approximation: Approximation | None = None) -> GridSweep:
    """Output drops of ``images`` [B, C, H, W] for windows of ``size`` at every (y, x) of ``ys`` x ``xs``,
    replaced by ``baseline`` [1 or B, C, H, W]; approximate mode measures its error on :data:`ERROR_SAMPLES`
    windows (ones it did not sweep, in grid mode) against exact outputs."""
    grid = approximation is not None and approximation.kind == "grid"
    swept_ys, swept_xs = (coarse(ys, approximation.factor), coarse(xs, approximation.factor)) if grid else (ys, xs)
    windows = [(y0, x0) for y0 in swept_ys for x0 in swept_xs]
    threshold = approximation.threshold if approximation is not None and not grid else None
    plan, scores = plan_occlusion(runner, images, baseline, windows, size, max_batch, incremental, threshold)
    if approximation is not None:
        plan.reason = f"{approximation.describe(len(windows), len(ys) * len(xs))}; {plan.reason}"
    rows, cols = interpolation(ys, swept_ys, scores.dtype), interpolation(xs, swept_xs, scores.dtype)
    all_windows = [(y0, x0) for y0 in ys for x0 in xs]
    unswept = [i for i, w in enumerate(all_windows) if w not in set(windows)] if grid else list(range(len(windows)))
    drops, errors = [], []
    for i in range(images.shape[0]):
        base = baseline[i if baseline.shape[0] > 1 else 0]
        occluded, stored = _image_scores(plan, runner, images[i], base, windows, size, max_batch)
        image_drops = (scores[i] - occluded).T.reshape(-1, len(swept_ys), len(swept_xs))
        if grid:
            image_drops = rows @ image_drops @ cols.T
        drops.append(image_drops)
        if approximation is not None:
            picked = [unswept[j] for j in sample_indices(len(unswept), ERROR_SAMPLES)] if unswept else []
            exact = scores[i] - _exact_scores(plan, runner, images[i], base, [all_windows[j] for j in picked], size,
                                              max_batch, stored)
            approximate = image_drops.flatten(1)[:, picked].T
            error = (approximate - exact).abs().max(0).values if picked else torch.zeros(len(scores[i]))
            largest = image_drops.flatten(1).abs().max(1).values.clamp(min=1e-30)
            errors.append({"windows_checked": len(picked), "max_abs_error": error.tolist(),
                           "relative_to_largest_drop": (error / largest).tolist()})
    return GridSweep(plan, scores, torch.stack(drops), errors if approximation is not None else None)
