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
* exactness: for three windows (first, centre, last) C's patched output must equal C's output for
  the whole occluded image, or the plan is dropped. A network whose later layers also read the
  input some other way, or whose prefix has global operations (squeeze-excitation, attention),
  fails this test or gains nothing, and is occluded the plain way.

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


@dataclass
class IncrementalPlan:
    layer: str
    module: nn.Module
    stride: int
    radius: int  # input pixels a prefix output depends on, on each side (with a safety margin)
    cost: float  # estimated work relative to full forward passes
    out_size: tuple[int, int]  # C's output height and width on the whole image


@dataclass
class _Crop:
    rows: tuple[int, int]  # input crop [start, stop)
    cols: tuple[int, int]
    out_rows: tuple[int, int]  # C's output region to replace [start, stop)
    out_cols: tuple[int, int]


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
def _hook(module: nn.Module, fn: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Modules at most two levels deep: the stages a network is usually built from."""
    return {name: m for name, m in model.named_modules() if name and name.count(".") <= 1}


def plan_incremental(model: nn.Module, image: torch.Tensor, window: tuple[int, int],
                     run: Callable[[torch.Tensor], torch.Tensor]) -> IncrementalPlan | None:
    """Find the cut that saves most work for windows of size ``window`` on ``image`` [1, C, H, W];
    ``run`` evaluates the model on a batch (inference mode, the caller's dtype and layout)."""
    h, w = image.shape[-2:]
    candidates = _candidates(model)
    # 1. Work done when each candidate finishes, and its output shape.
    macs = [0]
    finished: dict[str, tuple[int, torch.Size]] = {}

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d) and isinstance(out, torch.Tensor):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs[0] += out.numel() * k
        elif isinstance(module, nn.Linear) and isinstance(out, torch.Tensor):
            macs[0] += out.numel() * module.in_features

    def finish(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in finished:
                finished[name] = (macs[0], out.shape)
        return hook

    # 2. Where a NaN in the centre pixel reaches in each candidate's output.
    nan_rows: dict[str, tuple[int, int, int, int]] = {}

    def probe(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in nan_rows:
                bad = out[0].isnan().any(0)
                rows, cols = bad.any(1).nonzero().flatten(), bad.any(0).nonzero().flatten()
                if len(rows):
                    nan_rows[name] = (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))
        return hook

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles += [m.register_forward_hook(finish(name)) for name, m in candidates.items()]
    try:
        run(image)
    finally:
        for handle in handles:
            handle.remove()
    total = macs[0]
    probe_image = image.clone()
    probe_image[..., h // 2, w // 2] = float("nan")
    handles = [m.register_forward_hook(probe(name)) for name, m in candidates.items()]
    try:
        run(probe_image)
    finally:
        for handle in handles:
            handle.remove()
    if total == 0:
        return None

    best: IncrementalPlan | None = None
    for name, (done, shape) in finished.items():
        out_h, out_w = shape[-2:]
        if name not in nan_rows or out_h < 2 or h % out_h or w % out_w or h // out_h != w // out_w:
            continue
        stride = h // out_h
        r0, r1, c0, c1 = nan_rows[name]
        reach = max(h // 2 - r0 * stride, (r1 + 1) * stride - 1 - h // 2,
                    w // 2 - c0 * stride, (c1 + 1) * stride - 1 - w // 2)
        plan = IncrementalPlan(name, candidates[name], stride, reach + stride, 1.0, (out_h, out_w))
        crop = crop_for(plan, (h - window[0]) // 2, (w - window[1]) // 2, window[0], window[1], h, w)
        area = (crop.rows[1] - crop.rows[0]) * (crop.cols[1] - crop.cols[0]) / (h * w)
        share = done / total
        plan.cost = share * area + (1 - share)
        if best is None or plan.cost < best.cost:
            best = plan
    return best if best is not None and best.cost <= MAX_COST else None


def occluded_scores(plan: IncrementalPlan, image: torch.Tensor, base: torch.Tensor, cached: torch.Tensor,
                    windows: list[tuple[int, int]], wh: int, ww: int,
                    run: Callable[[torch.Tensor], torch.Tensor], max_batch: int,
                    check: bool = False) -> torch.Tensor:
    """Scores [len(windows), T] of ``image`` [C, H, W] with each window replaced by ``base``.

    ``cached`` is C's output for the unoccluded image [1, C', h', w']. With ``check`` the patched
    feature maps are compared with a full forward pass (raises AssertionError when they differ).
    """
    h, w = image.shape[-2:]
    crops = [crop_for(plan, y0, x0, wh, ww, h, w) for y0, x0 in windows]
    # Windows whose crops have the same size share batches.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(crops):
        groups.setdefault((c.rows[1] - c.rows[0], c.cols[1] - c.cols[0]), []).append(i)
    scores: list[torch.Tensor | None] = [None] * len(windows)
    for indices in groups.values():
        for start in range(0, len(indices), max_batch):
            chunk = indices[start: start + max_batch]
            batch = []
            for i in chunk:
                (r0, r1), (c0, c1), (y0, x0) = crops[i].rows, crops[i].cols, windows[i]
                crop = image[:, r0:r1, c0:c1].clone()
                crop[:, max(y0 - r0, 0): y0 + wh - r0, max(x0 - c0, 0): x0 + ww - c0] = \
                    base[:, max(y0, r0): min(y0 + wh, r1), max(x0, c0): min(x0 + ww, c1)]
                batch.append(crop)

            def patch(module: nn.Module, args: tuple, out: torch.Tensor, chunk: list[int] = chunk) -> torch.Tensor:
                patched = cached.expand(len(chunk), *cached.shape[1:]).clone()
                for j, i in enumerate(chunk):
                    c = crops[i]
                    oy, ox = c.rows[0] // plan.stride, c.cols[0] // plan.stride
                    (a, b), (d, e) = c.out_rows, c.out_cols
                    patched[j, :, a:b, d:e] = out[j, :, a - oy: b - oy, d - ox: e - ox]
                return patched

            with _hook(plan.module, patch):
                result = run(torch.stack(batch))
            for j, i in enumerate(chunk):
                scores[i] = result[j]
            if check:
                _check(plan, image, base, windows, chunk, crops, wh, ww, run, patch, torch.stack(batch))
    return torch.stack(scores)  # type: ignore[arg-type]


def _check(plan: IncrementalPlan, image: torch.Tensor, base: torch.Tensor, windows: list[tuple[int, int]],
           chunk: list[int], crops: list[_Crop], wh: int, ww: int, run: Callable, patch: Callable,
           batch: torch.Tensor) -> None:
    """C's patched output for ``chunk`` must equal C's output on the whole occluded images."""
    captured: dict[str, torch.Tensor] = {}

    def keep(key: str, fn: Callable | None = None) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            out = fn(module, args, out) if fn is not None else out
            captured[key] = out
            return out
        return hook

    full = image.unsqueeze(0).repeat(len(chunk), 1, 1, 1)
    for j, i in enumerate(chunk):
        y0, x0 = windows[i]
        full[j, :, y0: y0 + wh, x0: x0 + ww] = base[:, y0: y0 + wh, x0: x0 + ww]
    with _hook(plan.module, keep("full")):
        run(full)
    with _hook(plan.module, keep("patched", patch)):
        run(batch)
    expected, actual = captured["full"].float(), captured["patched"].float()
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    if not error <= 1e-4 * scale + 1e-6:
        raise AssertionError(f"incremental occlusion at '{plan.layer}' is off by {error:.3g} (scale {scale:.3g})")
