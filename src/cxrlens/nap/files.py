"""NAP files: ``nap_<model>.npz`` (arrays), ``nap_stats.json`` (the summary), the PNG figures and
``config.json``, each written atomically."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrlens.io import save_figure, to_jsonable, write_json
from cxrlens.nap.config import NapConfig
from cxrlens.nap.figures import plot_dead_shares, plot_inputs, plot_layer_grid
from cxrlens.nap.profile import NapResult
from cxrlens.runs import atomic_write_bytes


def _unbounded(score: float) -> float | str:
    """A separation score; an infinite one (equal maps within each group, different between them)
    kept as the string "inf", where strict JSON would lose it."""
    return str(float(score)) if np.isinf(score) else score


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def result_stats(result: NapResult, top: int = 20) -> dict:
    """The JSON summary of one model: group sizes, dead maps, top maps, distances, separation."""
    layers = {}
    for name, nap in result.layers.items():
        entry = {
            "shape": list(nap.nap.shape[1:]),
            "dead_maps": int(nap.dead.sum()),
            "dead_share": nap.dead_share,
            "dead_indices": np.flatnonzero(nap.dead),
            "top_maps": [{"map": int(m), "mean_abs_contrastive": nap.map_score[m]} for m in nap.top_maps],
            "distances": {"groups": result.groups, **nap.distances},
        }
        if nap.separation is not None and result.separated is not None:
            a, b = (result.groups.index(n) for n in result.separated)
            entry["separation"] = {
                "groups": list(result.separated),
                "score": "|mean_a - mean_b| / pooled std of the spatially averaged map",
                "top": [
                    {
                        "map": int(m), "score": _unbounded(nap.separation[m]),
                        "mean_a": nap.map_mean[a, m], "mean_b": nap.map_mean[b, m],
                        "std_a": nap.map_std[a, m], "std_b": nap.map_std[b, m],
                    }
                    for m in nap.separation_order[:top] if not np.isnan(nap.separation[m])
                ],
            }
        layers[name] = entry
    return to_jsonable({
        "architecture": result.architecture,
        "image_size": result.image_size,
        "images": result.images,
        "groups": [
            {"name": n, "expression": e, "images": int(c)}
            for n, e, c in zip(result.groups, result.expressions, result.counts, strict=True)
        ],
        "empty_groups": [n for n, c in zip(result.groups, result.counts, strict=True) if c == 0],
        "gradient_weighted_by": result.gradient_class,
        "contrast": "weighted by group size" if result.contrast_weighted else "unweighted mean of group NAPs",
        "layers": layers,
    })


def result_arrays(result: NapResult) -> dict[str, np.ndarray]:
    """The arrays of ``nap_<model>.npz``; per-layer keys are '<layer>/<what>' (NAPs stored as float32)."""
    arrays: dict[str, np.ndarray] = {
        "groups": np.array(result.groups),
        "expressions": np.array(result.expressions),
        "counts": result.counts,
        "layers": np.array(list(result.layers)),
        "input_mean": result.input_mean.astype(np.float32),
        "input_contrast": result.input_contrast.astype(np.float32),
    }
    for name, nap in result.layers.items():
        arrays[f"{name}/nap"] = nap.nap.astype(np.float32)
        arrays[f"{name}/contrastive"] = nap.contrastive.astype(np.float32)
        arrays[f"{name}/dead"] = nap.dead
        arrays[f"{name}/min"] = nap.act_min
        arrays[f"{name}/max"] = nap.act_max
        arrays[f"{name}/map_mean"] = nap.map_mean
        arrays[f"{name}/map_std"] = nap.map_std
        arrays[f"{name}/map_score"] = nap.map_score
        arrays[f"{name}/top_maps"] = nap.top_maps
        for metric, matrix in nap.distances.items():
            arrays[f"{name}/distance_{metric}"] = matrix
        if nap.separation is not None:
            arrays[f"{name}/separation"] = nap.separation
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_outputs(out: Path, results: Mapping[str, NapResult], classes: list[str], config: NapConfig,
                  settings: dict[str, Any]) -> dict:
    """Every file of a NAP run in ``out``; returns the ``nap_stats.json`` dict (its ``files`` listed)."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    stats = {"models": {}, "classes": list(classes), "files": files}
    for name, result in results.items():
        safe = _safe_name(name)
        path = out / f"nap_{safe}.npz"
        _write_npz(path, result_arrays(result))
        files.append(str(path))
        stats["models"][name] = result_stats(result)
        if config.figures:
            for layer in result.layers:
                path = out / f"nap_{safe}_{_safe_name(layer)}.png"
                files.append(str(save_figure(plot_layer_grid(result, layer), path)))
            files.append(str(save_figure(plot_inputs(result), out / f"nap_{safe}_inputs.png")))
    if config.figures:
        files.append(str(save_figure(plot_dead_shares(results), out / "nap_dead_maps.png")))
    files.append(str(write_json(out / "config.json", {**settings, **config.to_dict()})))
    stats_path = out / "nap_stats.json"
    files.append(str(stats_path))
    write_json(stats_path, stats, indent=1)
    return stats


def dead_share_lines(stats: dict) -> list[str]:
    """One line per model of a ``nap_stats.json`` dict: its share of dead feature maps per layer."""
    return [
        f"{name}: dead feature maps per layer: "
        + ", ".join(f"{layer} {entry['dead_share']:.0%}" for layer, entry in model["layers"].items())
        for name, model in stats["models"].items()
    ]
