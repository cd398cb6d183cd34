"""Explain a batch of images with several models and methods and write everything to a folder.

The CLI (through ``explain_runs``) calls::

    explain_images(
        models: dict[str, nn.Module],         # name -> model; registry names pick the Grad-CAM layer
        images: Tensor,                        # [B, 3, H, W] in [0, 1], preprocessed as for training
        class_names: Sequence[str],            # one per model output
        methods: Sequence[str] | dict[str, dict],  # names, or name -> parameters (see METHODS)
        targets: Sequence[int | str] | None,   # classes to explain for every image (None: all)
        out_dir: str | Path,
        *,
        image_ids: Sequence[str] | None = None,  # file stems; default image0, image1, ...
        settings: ExplainSettings | None = None, # output, max_batch, channels_last, autocast_bf16,
                                                 # clip_percentile, alpha, figures
        progress: bool = True,
    ) -> dict                                  # the summary also written to summary.json

and it writes (every file atomically: temporary file, then rename)::

    out_dir/maps/<image>/<model>/<method>.npy        float32 [T, H, W], channel-summed maps
    out_dir/overlays/<image>/<model>/<method>__<class>.png
    out_dir/grids/<image>__<class>__models_x_methods.png
    out_dir/grids/<image>__<model>__methods_x_classes.png
    out_dir/summary.json   predictions (sigmoid per class), method parameters, signed convergence
                           deltas (IG, DeepLIFT), what each method reports about itself (Grad-CAM
                           layer, occlusion plan), timings, and per-method errors (e.g. a user model
                           that cannot be rewritten for DeepLIFT) instead of aborting the run

The pipeline: check everything (:func:`_plan`), then per model its predictions, one explainable copy
if any method needs it, and per method the maps, overlays and a summary record; grids last.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.explain.config import ExplainSettings, parse_methods
from cxrlens.explain.figures import atomic_write_bytes, grid_figure, overlay, save_png
from cxrlens.explain.methods import Attribution, attribute, get_method
from cxrlens.explain.rewrite import make_explainable
from cxrlens.io import progress_bar, write_json

# Metadata every attribution carries; anything else a method reports (layer, occlusion plan) goes into the summary.
_COMMON_META = {"method", "params", "output", "targets", "signed", "seconds", "channels_last", "autocast_bf16"}


def _safe(name: str) -> str:
    """A file-name-safe version of a class, model or image name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "unnamed"


def _resolve_targets(targets: Sequence[int | str] | None, class_names: Sequence[str]) -> list[int]:
    if targets is None:
        return list(range(len(class_names)))
    resolved = []
    for target in targets:
        if isinstance(target, str):
            if target not in class_names:
                raise CxrlensError(f"unknown class '{target}'; choose from: {', '.join(class_names)}")
            resolved.append(list(class_names).index(target))
        elif isinstance(target, int) and 0 <= target < len(class_names):
            resolved.append(target)
        else:
            raise CxrlensError(f"target {target!r} is not a class index 0-{len(class_names) - 1} or name")
    if not resolved:
        raise CxrlensError("no target classes to explain")
    return resolved


def _save_npy(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class _Job:
    """Everything one explain_images call needs, checked before anything is written."""

    images: torch.Tensor
    ids: list[str]
    classes: list[str]
    targets: list[int]
    methods: dict[str, dict[str, Any]]
    settings: ExplainSettings
    out: Path
    grey: np.ndarray  # the X-rays [B, H, W] in [0, 1], for overlays
    # overlays[image][model][method] = RGB arrays, one per target, for the grids
    overlays: dict[str, dict[str, dict[str, list[np.ndarray]]]] = field(default_factory=dict)
    architectures: dict[str, str] = field(default_factory=dict)  # model name -> registry name

    @property
    def target_names(self) -> list[str]:
        return [self.classes[t] for t in self.targets]


def _plan(models: dict[str, nn.Module], images: torch.Tensor, class_names: Sequence[str],
          methods: Sequence[str] | dict[str, dict], targets: Sequence[int | str] | None, out_dir: str | Path,
          image_ids: Sequence[str] | None, settings: ExplainSettings) -> _Job:
    if not models:
        raise CxrlensError("no models to explain")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise CxrlensError("images must be a tensor [batch, 3, height, width]")
    n_images = images.shape[0]
    ids = [f"image{i}" for i in range(n_images)] if image_ids is None else [_safe(i) for i in image_ids]
    if len(ids) != n_images or len(set(ids)) != n_images:
        raise CxrlensError(f"image_ids must be {n_images} distinct names, got {list(image_ids or [])}")
    target_idx = _resolve_targets(targets, class_names)
    params = parse_methods(methods if isinstance(methods, (dict, str)) else list(methods))
    for name, method_params in params.items():  # fail before anything is written, not half-way
        get_method(name).check_params(method_params, (images.shape[-2], images.shape[-1]))
    grey = images.detach().float().mean(1).clamp(0, 1).cpu().numpy()
    return _Job(images, ids, list(class_names), target_idx, params, settings, Path(out_dir), grey, {i: {} for i in ids})


def explain_images(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    class_names: Sequence[str],
    methods: Sequence[str] | dict[str, dict],
    targets: Sequence[int | str] | None,
    out_dir: str | Path,
    *,
    image_ids: Sequence[str] | None = None,
    settings: ExplainSettings | None = None,
    progress: bool = True,
    architectures: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Attribution maps of ``images`` for every model x method x target; see the module docstring.
    ``architectures``: each model's registry name, for its facts such as the Grad-CAM layer (default:
    the model's key, when that is a registry name)."""
    job = _plan(models, images, class_names, methods, targets, out_dir, image_ids, settings or ExplainSettings())
    job.architectures = dict(architectures or {})
    job.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "output": job.settings.output,
        "classes": job.classes,
        "targets": job.target_names,
        "images": job.ids,
        "image_size": list(images.shape[-2:]),
        "models": {},
    }
    total = len(models) * len(job.methods) * len(job.ids)
    with progress_bar(total=total, desc="explain", unit="map", enabled=progress) as bar:
        for model_name, model in models.items():
            summary["models"][model_name] = _explain_model(job, model_name, model, bar)
    if job.settings.figures:
        summary["grids"] = _write_grids(job.out, job.ids, list(models), list(job.methods), job.target_names,
                                        job.grey, job.overlays)
    write_json(job.out / "summary.json", summary)  # strict JSON: NaN as null
    return summary


def _predictions(job: _Job, model: nn.Module) -> dict[str, dict[str, float]]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probs = torch.sigmoid(model(job.images).float()).cpu()
    finally:
        model.train(was_training)
    return {image_id: {name: round(float(probs[b, k]), 6) for k, name in enumerate(job.classes)}
            for b, image_id in enumerate(job.ids)}


def _explain_model(job: _Job, model_name: str, model: nn.Module, bar: Any) -> dict[str, Any]:
    """Predictions and every method's record for one model (maps and overlays written on the way)."""
    entry: dict[str, Any] = {"methods": {}, "predictions": _predictions(job, model)}
    explainable: nn.Module | None = None
    rewrite_error: str | None = None
    if any(get_method(m).needs_rewrite(p) for m, p in job.methods.items()):  # one rewrite for all of them
        started = time.perf_counter()
        try:
            explainable = make_explainable(model, job.images[:1])
        except CxrlensError as exc:
            rewrite_error = str(exc)
        entry["rewrite_seconds"] = round(time.perf_counter() - started, 4)
    for method, params in job.methods.items():
        bar.set_postfix_str(f"{model_name} / {method}")
        if get_method(method).needs_rewrite(params) and explainable is None:
            entry["methods"][method] = {"error": rewrite_error}
        else:
            entry["methods"][method] = _explain_method(job, model_name, explainable or model, method, params)
        bar.update(len(job.ids))
    return entry


def _explain_method(job: _Job, model_name: str, model: nn.Module, method: str,
                    params: dict[str, Any]) -> dict[str, Any]:
    """One method on one model: maps (and overlays) written, the summary record returned."""
    s = job.settings
    try:
        result = attribute(model, job.images, job.targets, method=method, output=s.output, max_batch=s.max_batch,
                           channels_last=s.channels_last, autocast_bf16=s.autocast_bf16,
                           model_name=job.architectures.get(model_name, model_name),
                           **params)
    except CxrlensError as exc:  # e.g. a layer this model lacks: recorded, the other methods still run
        return {"error": str(exc)}
    _write_maps(job, model_name, method, result)
    record: dict[str, Any] = {
        "params": result.meta["params"],
        "signed": result.meta["signed"],
        "seconds": round(result.meta["seconds"], 4),
        **{k: v for k, v in result.meta.items() if k not in _COMMON_META},
    }
    if result.delta is not None:
        record["delta"] = {
            image_id: {name: float(result.delta[b, i]) for i, name in enumerate(job.target_names)}
            for b, image_id in enumerate(job.ids)
        }
    return record


def _write_maps(job: _Job, model_name: str, method: str, result: Attribution) -> None:
    maps, grey, s = result.maps.cpu().numpy(), job.grey, job.settings
    for b, image_id in enumerate(job.ids):
        _save_npy(maps[b], job.out / "maps" / image_id / _safe(model_name) / f"{_safe(method)}.npy")
        if not s.figures:
            continue
        rgbs = [overlay(grey[b], maps[b, i], result.meta["signed"], s.clip_percentile, s.alpha)
                for i in range(len(job.targets))]
        job.overlays[image_id].setdefault(model_name, {})[method] = rgbs
        for name, rgb in zip(job.target_names, rgbs, strict=True):
            save_png(rgb, job.out / "overlays" / image_id / _safe(model_name) / f"{_safe(method)}__{_safe(name)}.png")


def _write_grids(out: Path, ids: list[str], model_names: list[str], method_names: list[str],
                 target_names: list[str], grey: np.ndarray,
                 overlays: dict[str, dict[str, dict[str, list[np.ndarray]]]]) -> list[str]:
    """models x methods per image and class; methods x classes per image and model."""
    written = []
    for b, image_id in enumerate(ids):
        xray = (np.repeat(grey[b][..., None], 3, axis=2) * 255).astype(np.uint8)
        per_model = overlays[image_id]
        for i, name in enumerate(target_names):
            cells = [[xray] + [per_model.get(m, {}).get(meth, [None] * len(target_names))[i]
                               for meth in method_names] for m in model_names]
            path = out / "grids" / f"{image_id}__{_safe(name)}__models_x_methods.png"
            grid_figure(cells, model_names, ["image", *method_names], path, title=f"{image_id}: {name}")
            written.append(str(path.relative_to(out)))
        for m in model_names:
            methods_done = [meth for meth in method_names if meth in per_model.get(m, {})]
            if not methods_done:
                continue
            cells = [[xray, *per_model[m][meth]] for meth in methods_done]
            path = out / "grids" / f"{image_id}__{_safe(m)}__methods_x_classes.png"
            grid_figure(cells, methods_done, ["image", *target_names], path, title=f"{image_id}: {m}")
            written.append(str(path.relative_to(out)))
    return written


def explain_failures(summary: dict[str, Any]) -> list[str]:
    """'model / method: reason' for every method that failed on a model (recorded in the summary while
    the others ran on), so that a caller can report the run as failed."""
    return [f"{model} / {method}: {record['error']}"
            for model, entry in summary.get("models", {}).items()
            for method, record in entry.get("methods", {}).items() if "error" in record]
