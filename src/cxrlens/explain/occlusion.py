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
exact outputs on the :data:`CHECK_BLOCK` x :data:`CHECK_BLOCK` pixels at the centre of the image (every
window covering them computed exactly), reported with the maps.
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
import torch.nn.functional as F
from torch import nn

from cxrlens.explain import incremental as inc

MIN_WINDOWS = 32  # planning costs a few forward passes; not worth it for short sweeps
MAX_COST = 0.85  # use a plan only when it saves at least 15 % of the work
TOLERANCE = 1e-4  # relative: float32 sums in a different order (crop vs whole image) differ by a few ulps
BF16_TOLERANCE = 4 * 2.0**-8  # under bfloat16 autocast: a few roundings of its 8-bit mantissa
APPROXIMATE_THRESHOLD = 0.5  # default box side share of projective approximate mode
CHECK_BLOCK = 8  # approximate mode is checked against exact outputs on this many pixels per side


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
    cpu_seconds: float = 0.0  # the same in CPU time of this process

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
    started, started_cpu = time.perf_counter(), time.process_time()
    plan = _decide(runner, images, baseline, windows, size, incremental, approximate)
    plan.seconds, plan.cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
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
    """An occlusion sweep over a grid of window positions: ``plan`` (how it ran), ``scores`` [B, T] of the
    unoccluded images, ``drops`` [B, T, rows, cols] (output drop per window), ``maps`` [B, T, H, W]
    (each pixel's mean drop over the windows covering it) and, in approximate mode, per image its
    error measured against exact outputs."""

    plan: OcclusionPlan
    scores: torch.Tensor
    drops: torch.Tensor
    maps: torch.Tensor
    errors: list[dict[str, Any]] | None = None
    check_cpu_seconds: float = 0.0  # CPU time spent measuring approximate mode's error


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


def average_map(drops: torch.Tensor, ys: list[int], xs: list[int], size: tuple[int, int],
                hw: tuple[int, int]) -> torch.Tensor:
    """Maps [T, H, W]: each pixel's mean output drop over the windows of ``size`` (regularly spaced at ``ys`` x
    ``xs``) that cover it, from ``drops`` [T, len(ys), len(xs)]; by transposed convolutions of the grid of
    drops and of ones with a window of ones."""
    (wh, ww), n_targets = size, drops.shape[0]
    stride = (ys[1] - ys[0] if len(ys) > 1 else 1, xs[1] - xs[0] if len(xs) > 1 else 1)
    ones = torch.ones(n_targets, 1, wh, ww, dtype=drops.dtype, device=drops.device)
    summed = F.conv_transpose2d(drops[None], ones, stride=stride, groups=n_targets)[0]
    counts = F.conv_transpose2d(torch.ones_like(drops[:1])[None], ones[:1], stride=stride)[0]
    out = drops.new_zeros(n_targets, *hw)
    region = out[:, ys[0]:, xs[0]:]
    h, w = min(region.shape[1], summed.shape[1]), min(region.shape[2], summed.shape[2])
    region[:, :h, :w] = summed[:, :h, :w] / counts[:, :h, :w].clamp(min=1)
    return out


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


def check_region(ys: list[int], xs: list[int], size: tuple[int, int],
                 hw: tuple[int, int]) -> tuple[tuple[int, int, int, int], list[tuple[int, int]]]:
    """The :data:`CHECK_BLOCK` x :data:`CHECK_BLOCK` pixels [top, bottom, left, right) at the centre of the swept
    area, and the grid indices (row, column) of every window that covers one of them."""
    box = []
    for starts, extent, side in ((ys, size[0], hw[0]), (xs, size[1], hw[1])):
        low, high = starts[0], min(starts[-1] + extent, side)
        centre = (low + high) // 2
        box += [max(low, centre - CHECK_BLOCK // 2), min(high, centre + CHECK_BLOCK // 2)]
    top, bottom, left, right = box
    rows = [i for i, y0 in enumerate(ys) if y0 < bottom and y0 + size[0] > top]
    cols = [j for j, x0 in enumerate(xs) if x0 < right and x0 + size[1] > left]
    return (top, bottom, left, right), [(i, j) for i in rows for j in cols]


def _measure_error(approximate: torch.Tensor, exact_at: Callable[[list[tuple[int, int]]], torch.Tensor],
                   swept: set[tuple[int, int]], ys: list[int], xs: list[int], size: tuple[int, int],
                   hw: tuple[int, int]) -> dict[str, Any]:
    """Approximate mode against exact outputs on the pixels of :func:`check_region`: ``approximate`` drops
    [T, len(ys), len(xs)], ``exact_at(windows)`` their exact drops [len(windows), T]; windows in ``swept``
    were computed exactly already."""
    (top, bottom, left, right), covering = check_region(ys, xs, size, hw)
    todo = [(i, j) for i, j in covering if (ys[i], xs[j]) not in swept]
    exact = approximate.clone()
    if todo:
        values = exact_at([(ys[i], xs[j]) for i, j in todo]).T  # [T, len(todo)]
        exact[:, [i for i, _ in todo], [j for _, j in todo]] = values.to(exact.dtype)
    window_error = (approximate - exact).abs().flatten(1).max(1).values
    approximate_map = average_map(approximate, ys, xs, size, hw)
    error_map = (approximate_map - average_map(exact, ys, xs, size, hw))[:, top:bottom, left:right]
    map_error = error_map.abs().flatten(1).max(1).values
    largest = approximate_map.abs().flatten(1).max(1).values.clamp(min=1e-30)
    return {"checked_pixels": [top, bottom, left, right], "windows_checked": len(todo),
            "window_error": window_error.tolist(), "map_error": map_error.tolist(),
            "map_error_relative": (map_error / largest).tolist()}


def sweep_grid(runner: Runner, images: torch.Tensor, baseline: torch.Tensor, ys: list[int], xs: list[int],
               size: tuple[int, int], max_batch: int, incremental: bool = True,
               approximation: Approximation | None = None) -> GridSweep:
    """Occlusion of ``images`` [B, C, H, W] by windows of ``size`` at every (y, x) of ``ys`` x ``xs`` (regularly
    spaced), replaced by ``baseline`` [1 or B, C, H, W]. Approximate mode measures its error against exact
    outputs on the :data:`CHECK_BLOCK` x :data:`CHECK_BLOCK` pixels at the centre (all windows covering them)."""
    grid = approximation is not None and approximation.kind == "grid"
    swept_ys, swept_xs = (coarse(ys, approximation.factor), coarse(xs, approximation.factor)) if grid else (ys, xs)
    windows = [(y0, x0) for y0 in swept_ys for x0 in swept_xs]
    threshold = approximation.threshold if approximation is not None and not grid else None
    plan, scores = plan_occlusion(runner, images, baseline, windows, size, max_batch, incremental, threshold)
    if approximation is not None:
        plan.reason = f"{approximation.describe(len(windows), len(ys) * len(xs))}; {plan.reason}"
    rows, cols = interpolation(ys, swept_ys, scores.dtype), interpolation(xs, swept_xs, scores.dtype)
    hw = (images.shape[-2], images.shape[-1])
    drops, maps, errors, check_seconds = [], [], [], 0.0
    for i in range(images.shape[0]):
        base = baseline[i if baseline.shape[0] > 1 else 0]
        occluded, stored = _image_scores(plan, runner, images[i], base, windows, size, max_batch)
        image_drops = (scores[i] - occluded).T.reshape(-1, len(swept_ys), len(swept_xs))
        if grid:
            image_drops = rows @ image_drops @ cols.T
        drops.append(image_drops)
        maps.append(average_map(image_drops, ys, xs, size, hw))
        if approximation is not None:
            def exact_at(chosen: list[tuple[int, int]], i: int = i, base: torch.Tensor = base,
                         stored: dict | None = stored) -> torch.Tensor:
                return scores[i] - _exact_scores(plan, runner, images[i], base, chosen, size, max_batch, stored)

            started = time.process_time()
            errors.append(_measure_error(image_drops, exact_at, set(windows) if grid else set(), ys, xs, size, hw))
            check_seconds += time.process_time() - started
    return GridSweep(plan, scores, torch.stack(drops), torch.stack(maps), errors if approximation is not None else None,
                     check_seconds)
