"""Incremental occlusion: recompute only the part of the early layers that an occluded window reaches.

Occluding a window changes a CNN's early feature maps only near the window. We split the network at
a *cut* module C (e.g. ResNet's ``layer1``): the part before C (the prefix) runs on a crop around
the window, just large enough for its receptive field; its output is pasted into C's output for the
unoccluded image (computed once), and the rest of the network runs on that. Both happen in one
forward pass of the model on the batch of crops: a forward hook on C swaps the crops' small feature
maps for the patched full-size ones.

Everything is measured, nothing assumed about the architecture:

* the cost share of the prefix, by counting the multiply-adds of convolutions and linear layers;
* C's stride (input size / C's output size, which must divide exactly) and the prefix's receptive
  radius, by sending one NaN pixel through the network and seeing where C's output turns NaN;
* exactness: for three windows (first, centre, last) C's patched output must have the expected
  shape and equal C's output for the whole occluded image, or the plan is dropped. A network whose
  later layers also read the input some other way, or whose prefix has global operations
  (squeeze-excitation, attention), fails this test or gains nothing, and is occluded the plain way.

Every step is an explicit check: :func:`plan_occlusion` returns an :class:`OcclusionPlan` whose
``reason`` says which way the sweep runs and why ("incremental up to layer ..." or "brute force,
because ..."); errors raised while sweeping are real errors and reach the caller.

Crops start at multiples of the stride, so every strided layer samples the same grid as on the
whole image, and they reach the image border wherever the receptive field does, so zero padding
is the same too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

MIN_WINDOWS = 32  # planning costs a few forward passes; not worth it for short sweeps
MAX_COST = 0.85  # use a plan only when it saves at least 15 % of the work
TOLERANCE = 1e-4  # relative: float32 sums in a different order (crop vs whole image) differ by a few ulps

Run = Callable[[torch.Tensor], torch.Tensor]  # a batch -> explained outputs [N, T] (caller's dtype, layout)


@dataclass
class IncrementalPlan:
    layer: str
    module: nn.Module
    stride: int
    radius: int  # input pixels a prefix output depends on, on each side (with a safety margin)
    cost: float  # estimated work relative to full forward passes
    out_size: tuple[int, int]  # C's output height and width on the whole image


@dataclass
class OcclusionPlan:
    """How a sweep runs: ``cut`` is the verified incremental plan, or None for full forward passes;
    ``reason`` says why, for the method's metadata."""

    cut: IncrementalPlan | None
    reason: str

    @property
    def layer(self) -> str | None:
        return None if self.cut is None else self.cut.layer


@dataclass
class _Crop:
    rows: tuple[int, int]  # input crop [start, stop)
    cols: tuple[int, int]
    out_rows: tuple[int, int]  # C's output region to replace [start, stop)
    out_cols: tuple[int, int]


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window positions along one side: from 0 in steps of ``stride`` until the side is covered
    (the last window may stick out and is then cut off), as Captum does."""
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def occluded_copy(image: torch.Tensor, base: torch.Tensor, window: tuple[int, int], size: tuple[int, int],
                  rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """``image`` [C, H, W] (or its crop ``rows`` x ``cols``) with the window at ``window`` (top-left corner,
    image coordinates) of ``size`` replaced by ``base`` [C, H, W]; the window is clipped to the crop."""
    (y0, x0), (wh, ww) = window, size
    r0, r1 = rows if rows is not None else (0, image.shape[-2])
    c0, c1 = cols if cols is not None else (0, image.shape[-1])
    out = image[:, r0:r1, c0:c1].clone()
    top, bottom, left, right = max(y0, r0), min(y0 + wh, r1), max(x0, c0), min(x0 + ww, c1)
    if top < bottom and left < right:
        out[:, top - r0: bottom - r0, left - c0: right - c0] = base[:, top:bottom, left:right]
    return out


def _span(start: int, stop: int, size: int, out_size: int, stride: int, radius: int) -> tuple[int, int, int, int]:
    """Input crop and C-output region for a window covering [start, stop) of one image side."""
    out_start = max(0, math.floor((start - radius) / stride))
    out_stop = min(out_size, math.floor((stop - 1 + radius) / stride) + 1)
    crop_start = max(0, (out_start * stride - radius) // stride * stride)  # a multiple of the stride
    crop_stop = min(size, out_stop * stride + radius)
    return crop_start, crop_stop, out_start, out_stop


def crop_for(plan: IncrementalPlan, y0: int, x0: int, wh: int, ww: int, h: int, w: int) -> _Crop:
    r0, r1, o0, o1 = _span(y0, min(y0 + wh, h), h, plan.out_size[0], plan.stride, plan.radius)
    c0, c1, p0, p1 = _span(x0, min(x0 + ww, w), w, plan.out_size[1], plan.stride, plan.radius)
    return _Crop((r0, r1), (c0, c1), (o0, o1), (p0, p1))


@contextmanager
def _hooks(pairs: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Modules at most two levels deep: the stages a network is usually built from."""
    return {name: m for name, m in model.named_modules() if name and name.count(".") <= 1}


@dataclass
class _Profile:
    """One forward pass, measured: the work done when each candidate finishes, its output shape, how
    often it ran, and (on a second pass) where a NaN in the centre pixel reaches in its output."""

    total: int
    finished: dict[str, tuple[int, torch.Size]]
    calls: dict[str, int]
    nan_box: dict[str, tuple[int, int, int, int]]


def _profile(model: nn.Module, image: torch.Tensor, run: Run) -> _Profile:
    candidates = _candidates(model)
    macs = [0]
    finished: dict[str, tuple[int, torch.Size]] = {}
    calls: dict[str, int] = {}
    nan_box: dict[str, tuple[int, int, int, int]] = {}

    def count(module: nn.Module, args: tuple, out: object) -> None:
        if isinstance(module, nn.Conv2d) and isinstance(out, torch.Tensor):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs[0] += out.numel() * k
        elif isinstance(module, nn.Linear) and isinstance(out, torch.Tensor):
            macs[0] += out.numel() * module.in_features

    def finish(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in finished:
                finished[name] = (macs[0], out.shape)
        return hook

    def probe(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in nan_box:
                bad = out[0].isnan().any(0)
                rows, cols = bad.any(1).nonzero().flatten(), bad.any(0).nonzero().flatten()
                if len(rows):
                    nan_box[name] = (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))
        return hook

    counted = [(m, count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with _hooks(counted + [(m, finish(name)) for name, m in candidates.items()]):
        run(image)
    h, w = image.shape[-2:]
    probe_image = image.clone()
    probe_image[..., h // 2, w // 2] = float("nan")
    with _hooks([(m, probe(name)) for name, m in candidates.items()]):
        run(probe_image)
    return _Profile(macs[0], finished, calls, nan_box)


def best_cut(model: nn.Module, image: torch.Tensor, window: tuple[int, int], run: Run) -> OcclusionPlan:
    """The cut that saves most work for windows of size ``window`` on ``image`` [1, C, H, W] (not yet
    verified), or no cut with the reason."""
    h, w = image.shape[-2:]
    profile = _profile(model, image, run)
    if profile.total == 0:
        return OcclusionPlan(None, "brute force, because the model has no convolutional or linear layers")
    modules = _candidates(model)
    best: IncrementalPlan | None = None
    for name, (done, shape) in profile.finished.items():
        out_h, out_w = shape[-2:]
        # A cut must run once per pass, be reached by the centre pixel, and sample the image on a square grid.
        if profile.calls.get(name) != 1 or name not in profile.nan_box:
            continue
        if out_h < 2 or h % out_h or w % out_w or h // out_h != w // out_w:
            continue
        stride = h // out_h
        r0, r1, c0, c1 = profile.nan_box[name]
        reach = max(h // 2 - r0 * stride, (r1 + 1) * stride - 1 - h // 2,
                    w // 2 - c0 * stride, (c1 + 1) * stride - 1 - w // 2)
        plan = IncrementalPlan(name, modules[name], stride, reach + stride, 1.0, (out_h, out_w))
        crop = crop_for(plan, (h - window[0]) // 2, (w - window[1]) // 2, window[0], window[1], h, w)
        area = (crop.rows[1] - crop.rows[0]) * (crop.cols[1] - crop.cols[0]) / (h * w)
        share = done / profile.total
        plan.cost = share * area + (1 - share)
        if best is None or plan.cost < best.cost:
            best = plan
    if best is None:
        return OcclusionPlan(None, "brute force, because no stage's output grid divides the image evenly")
    if best.cost > MAX_COST:
        return OcclusionPlan(None, f"brute force, because the best cut ({best.layer}) would still cost "
                                   f"{best.cost:.0%} of full passes")
    return OcclusionPlan(best, f"incremental up to layer {best.layer} (about {best.cost:.0%} of full passes)")


def _region_mismatch(out: torch.Tensor, crops: list[_Crop], stride: int) -> str | None:
    """Why C's output ``out`` on a batch of ``crops`` cannot be pasted, or None when every region fits."""
    for c in crops:
        oy, ox = c.rows[0] // stride, c.cols[0] // stride
        need = (c.out_rows[1] - oy, c.out_cols[1] - ox)
        if out.dim() != 4 or out.shape[-2] < need[0] or out.shape[-1] < need[1]:
            return (f"its output on a {c.rows[1] - c.rows[0]}x{c.cols[1] - c.cols[0]} crop is "
                    f"{list(out.shape[-2:])}, smaller than the {list(need)} needed")
    return None


def _patcher(plan: IncrementalPlan, cached: torch.Tensor, crops: list[_Crop]) -> Callable:
    """A forward hook on C that swaps the crops' small feature maps for the patched full-size ones."""
    def patch(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        problem = _region_mismatch(out, crops, plan.stride)
        if problem is not None:  # verified for this geometry before the sweep: a broken invariant, a bug
            raise RuntimeError(f"incremental occlusion at '{plan.layer}': {problem}")
        patched = cached.expand(len(crops), *cached.shape[1:]).clone()
        for j, c in enumerate(crops):
            oy, ox = c.rows[0] // plan.stride, c.cols[0] // plan.stride
            (a, b), (d, e) = c.out_rows, c.out_cols
            patched[j, :, a:b, d:e] = out[j, :, a - oy: b - oy, d - ox: e - ox]
        return patched
    return patch


def _crop_batch(image: torch.Tensor, base: torch.Tensor, windows: list[tuple[int, int]], crops: list[_Crop],
                size: tuple[int, int]) -> torch.Tensor:
    return torch.stack([occluded_copy(image, base, win, size, c.rows, c.cols) for win, c in zip(windows, crops,
                                                                                                  strict=True)])


def _crop_trial(cut: IncrementalPlan, cached: torch.Tensor, crop_image: torch.Tensor, crop: _Crop,
                run: Run) -> tuple[torch.Tensor | None, str | None]:
    """C's raw output on one crop [1, C, h, w], or why the layers before C cannot take crops.

    The rest of the pass runs on C's patched (full-size) map, as in the sweep. Only a failure *before* C
    (a prefix that accepts one input size only) means "no cut"; any later error is real and propagates."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        seen.append(out)
        if _region_mismatch(out, [crop], cut.stride) is not None:  # reported by the caller
            return cached.clone()
        return _patcher(cut, cached, [crop])(module, args, out)

    with _hooks([(cut.module, hook)]):
        try:
            run(crop_image)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it happened before C ran
            if seen:
                raise
            return None, f"the layers before {cut.layer} do not accept a crop ({type(exc).__name__}: {exc})"
    return seen[0], None


def verify(plan: OcclusionPlan, image: torch.Tensor, base: torch.Tensor, cached: torch.Tensor,
           windows: list[tuple[int, int]], size: tuple[int, int], run: Run) -> OcclusionPlan:
    """Check the cut on ``windows`` of ``image`` [C, H, W]: C's patched output must fit and equal C's output
    on the whole occluded image. Returns the plan, or a brute-force plan that says why not."""
    cut = plan.cut
    if cut is None:
        return plan
    h, w = image.shape[-2:]
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["out"] = out

    for window in windows:  # one at a time: their crops differ in size
        crop = crop_for(cut, window[0], window[1], size[0], size[1], h, w)
        with _hooks([(cut.module, keep)]):
            run(occluded_copy(image, base, window, size)[None])
        expected = seen["out"].float()
        out, problem = _crop_trial(cut, cached, _crop_batch(image, base, [window], [crop], size), crop, run)
        if out is not None:
            problem = _region_mismatch(out, [crop], cut.stride)
        if problem is not None:
            return OcclusionPlan(None, f"brute force, because layer {cut.layer} cannot be cut: {problem}")
        actual = _patcher(cut, cached, [crop])(cut.module, (), out).float()
        scale = expected.abs().max().item()
        error = (actual - expected).abs().max().item()
        if not error <= TOLERANCE * scale + 1e-6:
            return OcclusionPlan(None, f"brute force, because cutting at layer {cut.layer} is off by {error:.3g} "
                                       f"(scale {scale:.3g}) for the window at {window}")
    return plan


def probe_windows(windows: list[tuple[int, int]], h: int, w: int) -> list[tuple[int, int]]:
    """The first, the last and the most central window: the crops at both corners and in the middle."""
    centre = min(windows, key=lambda win: abs(2 * win[0] - h) + abs(2 * win[1] - w))
    return list(dict.fromkeys([windows[0], centre, windows[-1]]))


def occluded_scores(plan: OcclusionPlan, image: torch.Tensor, base: torch.Tensor, cached: torch.Tensor | None,
                    windows: list[tuple[int, int]], size: tuple[int, int], run: Run,
                    max_batch: int) -> torch.Tensor:
    """Scores [len(windows), T] of ``image`` [C, H, W] with each window replaced by ``base``: full passes,
    or (with a cut) passes on crops whose C output is pasted into ``cached``, C's output on the unoccluded
    image [1, C', h', w']."""
    cut = plan.cut
    if cut is None:
        return torch.cat([run(torch.stack([occluded_copy(image, base, win, size) for win in windows[i: i + max_batch]]))
                          for i in range(0, len(windows), max_batch)])
    h, w = image.shape[-2:]
    crops = [crop_for(cut, y0, x0, size[0], size[1], h, w) for y0, x0 in windows]
    # Windows whose crops have the same size share batches.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(crops):
        groups.setdefault((c.rows[1] - c.rows[0], c.cols[1] - c.cols[0]), []).append(i)
    scores: list[torch.Tensor | None] = [None] * len(windows)
    for indices in groups.values():
        for start in range(0, len(indices), max_batch):
            chunk = indices[start: start + max_batch]
            chunk_crops = [crops[i] for i in chunk]
            with _hooks([(cut.module, _patcher(cut, cached, chunk_crops))]):
                result = run(_crop_batch(image, base, [windows[i] for i in chunk], chunk_crops, size))
            for j, i in enumerate(chunk):
                scores[i] = result[j]
    return torch.stack(scores)  # type: ignore[arg-type]


def plan_occlusion(model: nn.Module, images: torch.Tensor, baseline: torch.Tensor,
                   windows: list[tuple[int, int]], size: tuple[int, int], run: Run, max_batch: int,
                   incremental: bool = True) -> tuple[OcclusionPlan, torch.Tensor, torch.Tensor | None]:
    """Decide how to sweep ``images`` [B, C, H, W] (explicit checks, each with its reason) and score the
    unoccluded images. Returns the plan, the scores [B, T] and, with a cut, C's outputs [B, C', h', w']."""
    if not incremental:
        plan = OcclusionPlan(None, "brute force, because incremental=False")
    elif len(windows) < MIN_WINDOWS:
        plan = OcclusionPlan(None, f"brute force, because {len(windows)} windows are too few to plan for "
                                   f"(at least {MIN_WINDOWS})")
    else:
        plan = best_cut(model, images[:1], size, run)
    if plan.cut is None:
        return plan, torch.cat([run(chunk) for chunk in images.split(max_batch)]), None
    kept: list[torch.Tensor] = []
    with _hooks([(plan.cut.module, lambda m, a, out: kept.append(out))]):
        scores = torch.cat([run(chunk) for chunk in images.split(max_batch)])
    features = torch.cat(kept)
    h, w = images.shape[-2:]
    plan = verify(plan, images[0], baseline[0], features[:1], probe_windows(windows, h, w), size, run)
    return plan, scores, features if plan.cut is not None else None
