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

Approximate mode (``approximate=threshold``, never the default) caps every box at that share of its
map's side (Krypton's projective-field thresholding) and measures its error against exact outputs on
:data:`ERROR_SAMPLES` windows spread over the image, reported with the maps.
"""

from __future__ import annotations

import math
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
APPROXIMATE_THRESHOLD = 0.5  # default box side share of approximate mode
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

    @property
    def layer(self) -> str | None:
        chosen = self.approximate or self.incremental
        return None if chosen is None else chosen.last_box


@dataclass
class ImageSweep:
    """One image's occluded outputs, and (approximate mode) their measured error."""

    scores: torch.Tensor  # [windows, T]
    error: dict[str, Any] | None = None


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
    if not incremental:
        return OcclusionPlan(None, "brute force, because incremental=False"), scores
    if len(windows) < MIN_WINDOWS and approximate is None:
        return OcclusionPlan(None, f"brute force, because {len(windows)} windows are too few to plan for "
                                   f"(at least {MIN_WINDOWS})"), scores
    exact, approx, problem = _traced(runner, images[:1], windows, size, approximate)
    if problem is not None:
        return OcclusionPlan(None, f"brute force, because {problem}"), scores
    assert exact is not None
    if approx is not None:  # the exact plan, where it pays and is exact, gives the reference outputs
        usable = exact.cost <= MAX_COST and _verify(runner, exact, images[:1], baseline[:1], windows, size) is None
        return OcclusionPlan(exact if usable else None, f"approximate: boxes at most {approximate:.0%} of each "
                                                        f"side, {_describe(approx)}", approx), scores
    if exact.cost > MAX_COST:
        return OcclusionPlan(None, f"brute force, because the best plan ({_describe(exact)}) saves too little "
                                   f"(at most {MAX_COST:.0%} of full passes)"), scores
    problem = _verify(runner, exact, images[:1], baseline[:1], windows, size)
    if problem is not None:
        return OcclusionPlan(None, f"brute force, because {problem}"), scores
    return OcclusionPlan(exact, _describe(exact)), scores


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


def occluded_scores(plan: OcclusionPlan, runner: Runner, image: torch.Tensor, base: torch.Tensor,
                    score: torch.Tensor, windows: list[tuple[int, int]], size: tuple[int, int],
                    max_batch: int) -> ImageSweep:
    """The outputs of ``image`` [C, H, W] with each window replaced by ``base`` [C, H, W], as the plan says;
    approximate sweeps also measure their error on :data:`ERROR_SAMPLES` windows against exact outputs
    (``score`` [T]: the unoccluded outputs, to express it relative to the largest output drop)."""
    chosen = plan.approximate or plan.incremental
    if chosen is None:
        return ImageSweep(full_scores(runner, image, base, windows, size, max_batch))
    plans = [p for p in (plan.approximate, plan.incremental) if p is not None]
    prepared = runner.prepare(image[None])
    stored, _ = inc.store(chosen.gm, prepared, _keep(plans), runner.context)
    scores = sweep_scores(runner, chosen, image[None], base[None], windows, size, max_batch, stored)
    if plan.approximate is None:
        return ImageSweep(scores)
    picked = sample_indices(len(windows), ERROR_SAMPLES)
    sample = [windows[i] for i in picked]
    if plan.incremental is not None:
        exact = sweep_scores(runner, plan.incremental, image[None], base[None], sample, size, max_batch, stored)
    else:
        exact = full_scores(runner, image, base, sample, size, max_batch)
    error = (scores[picked] - exact).abs().max(0).values  # [T]
    largest_drop = (score[None] - scores).abs().max(0).values.clamp(min=1e-30)
    return ImageSweep(scores, {"windows_checked": len(picked), "max_abs_error": error.tolist(),
                               "relative_to_largest_drop": (error / largest_drop).tolist()})
