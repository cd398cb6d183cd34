"""Explain a batch of images with several models and methods and write everything to a folder.

The CLI calls::

    explain_images(
        models: dict[str, nn.Module],         # name -> model; registry names pick the Grad-CAM layer
        images: Tensor,                        # [B, 3, H, W] in [0, 1], preprocessed as for training
        class_names: Sequence[str],            # one per model output
        methods: Sequence[str] | dict[str, dict],  # names, or name -> parameters (see METHODS)
        targets: Sequence[int | str] | None,   # classes to explain for every image (None: all)
        out_dir: str | Path,
        *,
        image_ids: Sequence[str] | None = None,  # file stems; default image0, image1, ...
        output: str = "sigmoid",
        max_batch: int = 16,
        channels_last: bool = False,
        autocast_bf16: bool = False,
        clip_percentile: float = 99.0,
        alpha: float = 0.5,
        figures: bool = True,
    ) -> dict                                  # the summary also written to summary.json

and it writes (every file atomically: temporary file, then rename)::

    out_dir/maps/<image>/<model>/<method>.npy        float32 [T, H, W], channel-summed maps
    out_dir/overlays/<image>/<model>/<method>__<class>.png
    out_dir/grids/<image>__<class>__models_x_methods.png
    out_dir/grids/<image>__<model>__methods_x_classes.png
    out_dir/summary.json   predictions (sigmoid per class), method parameters, signed convergence
                           deltas (IG, DeepLIFT), timings, and per-method errors (e.g. a user model
                           that cannot be rewritten for DeepLIFT) instead of aborting the run
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cxrlens.errors import CxrlensError
from cxrlens.explain.figures import atomic_write_bytes, grid_figure, overlay, save_png
from cxrlens.explain.methods import METHODS, _pair, attribute, get_method
from cxrlens.explain.rewrite import make_explainable
from cxrlens.io import write_json


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


def _method_params(methods: Sequence[str] | dict[str, dict]) -> dict[str, dict[str, Any]]:
    items = methods.items() if isinstance(methods, dict) else ((m, {}) for m in methods)
    out = {}
    for name, params in items:
        get_method(name).resolve(dict(params or {}))  # unknown methods/parameters fail up front
        out[name] = dict(params or {})
    if not out:
        raise CxrlensError(f"no attribution methods given; choose from: {', '.join(METHODS)}")
    return out


def _save_npy(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())


def explain_images(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    class_names: Sequence[str],
    methods: Sequence[str] | dict[str, dict],
    targets: Sequence[int | str] | None,
    out_dir: str | Path,
    *,
    image_ids: Sequence[str] | None = None,
    output: str = "sigmoid",
    max_batch: int = 16,
    channels_last: bool = False,
    autocast_bf16: bool = False,
    clip_percentile: float = 99.0,
    alpha: float = 0.5,
    figures: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Attribution maps of ``images`` for every model x method x target; see the module docstring."""
    if not models:
        raise CxrlensError("no models to explain")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise CxrlensError("images must be a tensor [batch, 3, height, width]")
    n_images = images.shape[0]
    ids = [f"image{i}" for i in range(n_images)] if image_ids is None else [_safe(i) for i in image_ids]
    if len(ids) != n_images or len(set(ids)) != n_images:
        raise CxrlensError(f"image_ids must be {n_images} distinct names, got {list(image_ids or [])}")
    target_idx = _resolve_targets(targets, class_names)
    target_names = [class_names[t] for t in target_idx]
    params = _method_params(methods)
    for name, method_params in params.items():  # fail before anything is written, not half-way
        window = get_method(name).resolve(dict(method_params)).get("window")
        if window is not None:
            wh, ww = _pair(window, "window")
            if wh > images.shape[-2] or ww > images.shape[-1]:
                raise CxrlensError(
                    f"{name} window {wh}x{ww} is larger than the {images.shape[-2]}x{images.shape[-1]} image; "
                    "give a smaller window"
                )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grey = images.detach().float().mean(1).clamp(0, 1).cpu().numpy()  # the X-ray, for overlays

    summary: dict[str, Any] = {
        "output": output,
        "classes": list(class_names),
        "targets": target_names,
        "images": ids,
        "image_size": list(images.shape[-2:]),
        "models": {},
    }
    # overlays[image][model][method] = list of RGB arrays, one per target
    overlays: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {i: {} for i in ids}
    bar = tqdm(total=len(models) * len(params) * n_images, desc="explain", unit="map", disable=not progress)
    for model_name, model in models.items():
        entry: dict[str, Any] = {"methods": {}}
        summary["models"][model_name] = entry
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                probs = torch.sigmoid(model(images).float()).cpu()
        finally:
            model.train(was_training)
        entry["predictions"] = {
            ids[b]: {name: round(float(probs[b, k]), 6) for k, name in enumerate(class_names)}
            for b in range(n_images)
        }
        explainable: nn.Module | None = None
        rewrite_error: str | None = None
        if any(get_method(m).needs_rewrite or (m == "smoothgrad" and get_method(
                p.get("base", "saliency")).needs_rewrite) for m, p in params.items()):
            started = time.perf_counter()
            try:
                explainable = make_explainable(model, images[:1])
            except CxrlensError as exc:
                rewrite_error = str(exc)
            entry["rewrite_seconds"] = round(time.perf_counter() - started, 4)
        for method, method_params in params.items():
            bar.set_postfix_str(f"{model_name} / {method}")
            try:
                spec = get_method(method)
                needs = spec.needs_rewrite or (method == "smoothgrad" and get_method(
                    method_params.get("base", "saliency")).needs_rewrite)
                if needs and explainable is None:
                    entry["methods"][method] = {"error": rewrite_error}
                    continue
                try:
                    result = attribute(
                        explainable if explainable is not None else model,
                        images, target_idx, method=method, output=output, max_batch=max_batch,
                        channels_last=channels_last, autocast_bf16=autocast_bf16, model_name=model_name,
                        **method_params,
                    )
                except CxrlensError as exc:
                    entry["methods"][method] = {"error": str(exc)}
                    continue
                record: dict[str, Any] = {
                    "params": result.meta["params"],
                    "signed": result.meta["signed"],
                    "seconds": round(result.meta["seconds"], 4),
                }
                if "layer" in result.meta:
                    record["layer"] = result.meta["layer"]
                if result.delta is not None:
                    record["delta"] = {
                        ids[b]: {name: float(result.delta[b, i]) for i, name in enumerate(target_names)}
                        for b in range(n_images)
                    }
                entry["methods"][method] = record
                maps = result.maps.cpu().numpy()
                for b, image_id in enumerate(ids):
                    _save_npy(maps[b], out / "maps" / image_id / _safe(model_name) / f"{_safe(method)}.npy")
                    if not figures:
                        continue
                    rgbs = [overlay(grey[b], maps[b, i], result.meta["signed"], clip_percentile, alpha)
                            for i in range(len(target_idx))]
                    overlays[image_id].setdefault(model_name, {})[method] = rgbs
                    for name, rgb in zip(target_names, rgbs, strict=True):
                        save_png(rgb, out / "overlays" / image_id / _safe(model_name)
                                 / f"{_safe(method)}__{_safe(name)}.png")
            finally:
                bar.update(n_images)

    bar.close()
    if figures:
        summary["grids"] = _write_grids(out, ids, list(models), list(params), target_names, grey, overlays)
    write_json(out / "summary.json", summary)  # strict JSON: NaN as null
    return summary


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
