"""The scorecard: every metric for every model x attribution method x class, with bootstrap CIs.

Entry point :func:`run_scorecard` (what ``cxrlens score`` calls). For each run it explains the
images of a mask folder (default ``data/lungmasks``) at the run's input size, scores the maps
against the radiologists' masks, runs deletion/insertion, the randomisation check and the noise
check, and runs the shortcut detector on a classification split (default: the run's own data,
``test`` split). It writes to ``out_dir``, each file atomically:

* ``scorecard.csv`` / ``scorecard.md``: one row per model x method x class, each metric as mean and
  95 % bootstrap CI over images (markdown adds rankings and verdicts);
* ``scorecard.png``: heat map of that table (colour: rank within each column, green = better);
* ``images.csv``: the per-image values behind the table, worst lung focus first;
* ``worst_offenders.png``: per model the image/method/class pairs with the least evidence in the lungs;
* ``verdicts.json``: per model a plain-language verdict built from the numbers, with its flags;
* ``shortcut.json``: performance per source and the source-prediction probe, per model;
* ``scorecard.json``: the table, rankings, randomisation curves and the settings used.

Metrics (see :mod:`cxrlens.score.metrics`): ``lung_focus`` (positive attribution share inside the
lungs), ``relevance_mass_accuracy`` / ``relevance_rank_accuracy`` / ``pointing_game`` (against the
opacity mask), ``device_share``, ``outside_body_share`` and ``padding_share`` (inside the zero padding
and any black bars, :func:`~cxrlens.score.masks.empty_border`), ``outside_body_peak`` (1 when the map's
maximum lies outside the thorax), ``outside_body_reliance`` (the drop of the class probability when
everything outside the thorax is blurred: no attribution involved), ``deletion_auc``, ``insertion_auc``, the
gaps to a random order and their sum ``faithfulness``, ``sanity_spearman`` / ``sanity_ssim`` (maps of the
trained vs the fully randomised model; low is good) and ``max_sensitivity``.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.runs import LoadedRun, atomic_write_bytes, atomic_write_text, load_run
from cxrlens.score import metrics as M
from cxrlens.score import shortcut as S
from cxrlens.score.masks import MaskSet, empty_border, load_mask_set

DEFAULT_MASKS = Path(__file__).resolve().parents[3] / "data" / "lungmasks"
DEFAULT_METHODS = ("saliency", "integrated_gradients", "grad_cam")

# metric -> True when higher is better (for the heat map and the rankings)
METRICS: dict[str, bool] = {
    "lung_focus": True,
    "relevance_mass_accuracy": True,
    "relevance_rank_accuracy": True,
    "pointing_game": True,
    "device_share": False,
    "outside_body_share": False,
    "padding_share": False,
    "outside_body_peak": False,
    "outside_body_reliance": False,
    "deletion_auc": False,
    "insertion_auc": True,
    "deletion_gap": True,
    "insertion_gap": True,
    "faithfulness": True,
    "sanity_spearman": False,
    "sanity_ssim": False,
    "max_sensitivity": False,
}
REFERENCE_COLUMNS = ("lung_area", "opacity_area", "device_area", "outside_body_area", "padding_area")


def _picked_mean(values: torch.Tensor, pick: np.ndarray) -> float:
    """Mean of the picked, finite entries; NaN (without a warning) when there are none."""
    chosen = np.where(pick, values.numpy(), np.nan)
    return float(np.nanmean(chosen)) if np.isfinite(chosen).any() else float("nan")


@dataclass
class Scorecard:
    """What :func:`run_scorecard` computed (also written to ``out_dir``)."""

    table: pd.DataFrame  # model, method, class, n_images, <metric>, <metric>_low, <metric>_high ...
    images: pd.DataFrame  # one row per model x method x class x image
    rankings: dict[str, list[dict]]
    verdicts: dict[str, dict]
    shortcut: dict[str, dict]
    sanity: dict[str, dict]
    files: dict[str, str] = field(default_factory=dict)


def _labels(mask_set: MaskSet, taxonomy: Any) -> np.ndarray:
    """Multi-hot labels of the mask images: from ``finding`` if the taxonomy knows it, else ``cls``;
    rows with neither (e.g. an ARDS-only image in cxr3) get no class."""
    out = np.zeros((len(mask_set), taxonomy.num_classes), dtype=np.float32)
    for i, row in mask_set.frame.iterrows():
        for column in ("finding", "cls"):
            value = str(row.get(column, "") or "").strip()
            if not value:
                continue
            try:
                out[i] = taxonomy.encode(value)
                break
            except KeyError:
                continue
    return out


@torch.no_grad()
def outside_body_reliance(model: nn.Module, images: torch.Tensor, outside: torch.Tensor, targets: list[int],
                          max_batch: int = 16) -> np.ndarray:
    """[B, T]: how much each target's probability drops when everything outside the thorax is blurred
    (Gaussian, sigma = side / 20). A model that reads markers, tags or borders there loses evidence; one
    that reads the lungs does not. Independent of any attribution method."""
    blurred = M.make_baseline(images, "blur", images.shape[-1] / 20)
    edited = torch.where(outside.to(images.device)[:, None], blurred, images)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.cat([model(part).float() for part in x.split(max_batch)]))[:, targets]

    return (probabilities(images) - probabilities(edited)).cpu().numpy().astype(np.float64)


def _explainer(method: str, targets: list[int], params: dict, max_batch: int, model_name: str) -> M.Explainer:
    from cxrlens.explain import attribute

    def explain(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return attribute(model, images, targets, method=method, max_batch=max_batch, model_name=model_name,
                         **params).maps.detach()

    return explain


def _subset(candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(k, len(candidates)), replace=False))


def _unique_names(runs: list[LoadedRun]) -> list[str]:
    names, seen = [], {}
    for run in runs:
        name = run.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def _shortcut_data(run: LoadedRun, data: Any, split: str | None, max_images: int | None, device: torch.device,
                   seed: int) -> dict:
    """Per-source performance and the source probe on a classification split."""
    from cxrlens.data import XrayDataset, load_manifest
    from cxrlens.evaluate import STUDY_THRESHOLD

    source = (run.config.data or None) if data is None else data
    manifest = load_manifest(source, run.taxonomy)
    if split is not None and manifest.has_split:
        manifest = manifest.split(split)
    manifest = manifest.head(max_images, seed)
    dataset = XrayDataset(manifest, run.config.image_size, cache=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    features, logits = S.penultimate_features(run.model, images.to(device))
    probs = 1 / (1 + np.exp(-logits))
    threshold = run.thresholds if run.thresholds is not None else STUDY_THRESHOLD
    frame = manifest.frame
    classes = list(run.taxonomy.classes)
    performance = S.source_performance(probs, manifest.targets, frame["source"].to_numpy(), classes, threshold)
    labels = ["+".join(c for c, v in zip(classes, t, strict=True) if v > 0.5) for t in manifest.targets]
    probe = S.source_probe(features, frame["source"].to_numpy(), frame["patient_group"].to_numpy(), labels,
                           seed=seed)
    return {
        "data": str(manifest.origin),
        "split": split,
        "n_images": len(manifest),
        "threshold": threshold,
        "performance": performance,
        "probe": probe,
    }


def score_model(
    run: LoadedRun,
    name: str,
    mask_set: MaskSet,
    methods: Sequence[str],
    *,
    method_params: dict[str, dict],
    targets: str,
    steps: int,
    baseline: str | float,
    pointing_tolerance: float,
    sanity_images: int,
    sanity_steps: int | None,
    sanity_threshold: float,
    robustness_images: int,
    robustness_samples: int,
    noise: float,
    seed: int,
    device: torch.device,
    max_batch: int,
    gallery_size: int,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict, list[dict]]:
    """Per-image metric rows of one model for every method, its randomisation results, and the
    candidates for the worst-offender gallery (with their maps)."""
    from cxrlens.explain import get_method, make_explainable

    classes = list(run.taxonomy.classes)
    labels = _labels(mask_set, run.taxonomy)
    if targets == "true":
        target_idx = [c for c in range(len(classes)) if labels[:, c].any()]
        chosen = labels[:, target_idx] > 0.5
    elif targets == "all":
        target_idx = list(range(len(classes)))
        chosen = np.ones((len(mask_set), len(target_idx)), dtype=bool)
    else:
        raise CxrlensError(f"targets must be 'true' or 'all', not {targets!r}")
    if not target_idx:
        raise CxrlensError(
            f"{mask_set.csv}: no image has a label of taxonomy '{run.taxonomy.name}' "
            f"({', '.join(classes)}); fill the 'finding' or 'cls' column, or use targets='all'"
        )
    images = mask_set.images.to(device)
    model = run.model.to(device).eval()
    if any(get_method(m).needs_rewrite or (method_params.get(m, {}).get("base") in ("deeplift", "guided_backprop"))
           for m in methods):
        model = make_explainable(model, images[:1])
    with torch.no_grad():
        probs = torch.sigmoid(torch.cat([model(x).float() for x in images.split(max_batch)])).cpu().numpy()
    masks = mask_set.masks
    lungs = masks["lungs"]
    opacity = masks.get("opacity", torch.zeros_like(lungs))
    devices = masks.get("devices", torch.zeros_like(lungs))
    outside = masks["outside_body"]
    padding = masks["padding"] | empty_border(mask_set.images)  # zero padding and black bars in the file
    areas = {
        "lung_area": M.mask_share(lungs).numpy(),
        "opacity_area": M.mask_share(opacity).numpy(),
        "device_area": M.mask_share(devices).numpy(),
        "outside_body_area": M.mask_share(outside).numpy(),
        "padding_area": M.mask_share(padding).numpy(),
    }
    for key, present in (("opacity_area", "opacity"), ("device_area", "devices")):
        if present in mask_set.present:
            areas[key] = np.where(mask_set.present[present].numpy(), areas[key], np.nan)
        else:
            areas[key] = np.full(len(mask_set), np.nan)
    reliance_outside = outside_body_reliance(model, images, outside, target_idx, max_batch)
    random_auc = M.random_order_auc(model, images, target_idx, seed=seed, steps=steps, baseline=baseline,
                                    max_batch=max_batch * 4)
    has_target = np.nonzero(chosen.any(1))[0]
    sanity_idx = _subset(has_target, sanity_images, seed)
    robust_idx = _subset(has_target, robustness_images, seed + 1)
    rows, sanity, gallery = [], {}, []
    ii, tt = np.nonzero(chosen)
    rel_paths = mask_set.frame["image"].to_numpy()
    for method in methods:
        started = time.perf_counter()
        explain = _explainer(method, target_idx, method_params.get(method, {}), max_batch, run.config.model)
        maps = explain(model, images)
        values = {
            "lung_focus": M.mass_share(maps, lungs),
            "relevance_mass_accuracy": M.mass_share(maps, opacity),
            "relevance_rank_accuracy": M.relevance_rank_accuracy(maps, opacity),
            "pointing_game": M.pointing_game(maps, opacity, pointing_tolerance),
            "device_share": M.mass_share(maps, devices),
            "outside_body_share": M.mass_share(maps, outside),
            "padding_share": M.mass_share(maps, padding),
            # does the map's maximum lie outside the thorax? (undefined for a map without positive values)
            "outside_body_peak": M.pointing_game(maps, outside).masked_fill(maps.flatten(-2).amax(-1) <= 0,
                                                                            float("nan")),
        }
        faith = M.faithfulness(model, images, maps, target_idx, steps=steps, baseline=baseline,
                               max_batch=max_batch * 4, random_auc=random_auc)
        for key in ("deletion_auc", "insertion_auc", "deletion_gap", "insertion_gap"):
            values[key] = faith[key]
        values["faithfulness"] = faith["deletion_gap"] + faith["insertion_gap"]
        values = {k: v.cpu().numpy().astype(np.float64) for k, v in values.items()}
        values["outside_body_reliance"] = reliance_outside
        for key in ("sanity_spearman", "sanity_ssim", "max_sensitivity"):
            values[key] = np.full(chosen.shape, np.nan)
        if len(sanity_idx):
            result = M.cascading_randomisation(model, explain, images[sanity_idx], steps=sanity_steps, seed=seed + 42)
            final = result.final()
            values["sanity_spearman"][sanity_idx] = final["spearman"].numpy()
            values["sanity_ssim"][sanity_idx] = final["ssim"].numpy()
            pick = chosen[sanity_idx]
            final_rho = _picked_mean(final["spearman"], pick)
            sanity[method] = {
                "passes": bool(final_rho < sanity_threshold),
                "spearman": final_rho,
                "threshold": sanity_threshold,
                "layers": result.layers,
                "n_randomised": result.n_randomised,
                "spearman_curve": [_picked_mean(r, pick) for r in result.spearman],
                "ssim_curve": [_picked_mean(r, pick) for r in result.ssim],
                "n_images": len(sanity_idx),
            }
        if len(robust_idx):
            sens = M.max_sensitivity(model, explain, images[robust_idx], n_samples=robustness_samples, radius=noise,
                                     seed=seed, original=maps[robust_idx])
            values["max_sensitivity"][robust_idx] = sens.cpu().numpy()
        frame = pd.DataFrame({
            "model": name,
            "method": method,
            "class": [classes[target_idx[t]] for t in tt],
            "image": rel_paths[ii],
            "patient_group": mask_set.frame.get("patient_group", pd.Series([""] * len(mask_set))).to_numpy()[ii],
            "finding": mask_set.frame.get("finding", pd.Series([""] * len(mask_set))).to_numpy()[ii],
            "probability": probs[ii, np.asarray(target_idx)[tt]],
            "outside_lungs": 1 - values["lung_focus"][ii, tt],
            **{k: v[ii, tt] for k, v in values.items()},
            **{k: v[ii] for k, v in areas.items()},
        })
        rows.append(frame)
        # gallery candidates: lowest lung focus first
        order = np.argsort(np.nan_to_num(values["lung_focus"][ii, tt], nan=np.inf), kind="stable")[:gallery_size]
        for j in order:
            i, t = int(ii[j]), int(tt[j])
            gallery.append({
                "model": name, "method": method, "class": classes[target_idx[t]], "image": rel_paths[i],
                "lung_focus": float(values["lung_focus"][i, t]), "index": i,
                "map": maps[i, t].detach().cpu(),
            })
        if progress:
            print(f"score {name} / {method}: {time.perf_counter() - started:.1f} s")
    gallery.sort(key=lambda g: (math.inf if math.isnan(g["lung_focus"]) else g["lung_focus"]))
    return pd.concat(rows, ignore_index=True), sanity, gallery[:gallery_size]


def summarise(images: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per model x method x class: each metric's mean and bootstrap CI over images."""
    records = []
    for (model, method, cls), rows in images.groupby(["model", "method", "class"], sort=False):
        record: dict[str, Any] = {"model": model, "method": method, "class": cls, "n_images": int(len(rows))}
        for metric in METRICS:
            mean, low, high, n = M.bootstrap_ci(rows[metric].to_numpy(), n_boot, seed)
            record.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high, f"{metric}_n": n})
        for ref in REFERENCE_COLUMNS:
            record[ref] = float(np.nanmean(rows[ref])) if rows[ref].notna().any() else float("nan")
        records.append(record)
    return pd.DataFrame(records)


def rank_models(images: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Models ranked by ``metric`` averaged per image over methods and classes (best first)."""
    out = []
    for model, rows in images.groupby("model", sort=False):
        per_image = rows.groupby("image")[metric].mean()
        mean, low, high, n = M.bootstrap_ci(per_image.to_numpy(), n_boot, seed)
        out.append({"model": model, metric: mean, "low": low, "high": high, "n_images": n})
    higher = METRICS[metric]
    out.sort(key=lambda r: (math.isnan(r[metric]), -r[metric] if higher else r[metric]))
    for rank, row in enumerate(out, 1):
        row["rank"] = rank
    return out


# --- writing -------------------------------------------------------------------------------------


def _fmt(value: float, low: float | None = None, high: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.2f}"
    if low is not None and high is not None and not math.isnan(low):
        text += f" [{low:.2f}, {high:.2f}]"
    return text


def table_markdown(table: pd.DataFrame) -> str:
    columns = list(METRICS)
    header = "| model | method | class | n | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 4)]
    for _, r in table.iterrows():
        cells = [_fmt(r[c], r[f"{c}_low"], r[f"{c}_high"]) for c in columns]
        lines.append(f"| {r['model']} | {r['method']} | {r['class']} | {r['n_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_heatmap(table: pd.DataFrame) -> bytes:
    """Heat map of the table: colour = rank of the row within each metric (green = better), text = value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(METRICS)
    values = table[columns].to_numpy(dtype=np.float64)
    colour = np.full_like(values, np.nan)
    for j, c in enumerate(columns):
        col = values[:, j]
        finite = np.isfinite(col)
        if finite.sum() == 1:
            colour[finite, j] = 0.5
        elif finite.sum() > 1:
            ranks = pd.Series(col[finite] if METRICS[c] else -col[finite]).rank().to_numpy()
            colour[finite, j] = (ranks - 1) / (finite.sum() - 1)
    labels = [f"{r.model} / {r.method} / {r['class']}" for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 3, 0.45 * len(labels) + 2))
    ax.imshow(np.ma.masked_invalid(colour), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), [c.replace("_", "\n") for c in columns], fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("interpretability scorecard (colour: rank per metric, green = better)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_gallery(gallery: dict[str, list[dict]], mask_sets: dict[str, MaskSet]) -> bytes:
    """Per model (row) the pairs with the least evidence in the lungs: image, positive attribution
    (magma), lung outline (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = max(1, len(gallery))
    n_cols = max(1, max((len(v) for v in gallery.values()), default=1))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.5 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (model, items) in enumerate(gallery.items()):
        mask_set = mask_sets[model]
        for c, item in enumerate(items):
            ax = axes[r, c]
            image = mask_set.images[item["index"], 0].numpy()
            heat = item["map"].clamp(min=0).numpy()
            top = np.percentile(heat, 99.5) if heat.max() > 0 else 1.0
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.clip(heat / max(top, 1e-12), 0, 1), cmap="magma", alpha=0.55, vmin=0, vmax=1)
            ax.contour(mask_set.masks["lungs"][item["index"]].numpy().astype(float), levels=[0.5], colors="cyan",
                       linewidths=0.7)
            ax.set_title(f"{model}\n{item['method']} · {item['class']}\nlung focus {_fmt(item['lung_focus'])}",
                         fontsize=6)
    fig.suptitle("worst offenders: least positive attribution inside the lungs (cyan)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def _dumps(obj: Any) -> str:
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True)
    return text.replace("NaN", "null")


# --- entry point ---------------------------------------------------------------------------------


def run_scorecard(
    runs: Sequence[str | Path | LoadedRun],
    mask_dir: str | Path | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    out_dir: str | Path = "scorecard",
    *,
    method_params: dict[str, dict] | None = None,
    targets: str = "true",
    data: str | Path | bool | None = None,
    split: str | None = "test",
    max_images: int | None = None,
    probe_images: int | None = None,
    steps: int = 20,
    baseline: str | float = "blur",
    pointing_tolerance: float = 15.0,
    sanity_images: int = 8,
    sanity_steps: int | None = 5,
    sanity_threshold: float = 0.5,
    robustness_images: int = 8,
    robustness_samples: int = 5,
    noise: float = 0.02,
    bootstrap: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_batch: int = 16,
    gallery_size: int = 6,
    progress: bool = False,
) -> Scorecard:
    """Score every run x attribution method x class and write the scorecard to ``out_dir``.

    runs: run folders (or :class:`LoadedRun`); mask_dir: a mask folder (default ``data/lungmasks``);
    methods: names from ``cxrlens.explain.METHODS``; method_params: method -> its parameters.
    targets: ``"true"`` explains each image's labelled classes (rows per class use only the images
    labelled with it), ``"all"`` every class on every image. data/split: the classification data for
    the shortcut detector (default each run's own data, ``test`` split; ``False`` skips it).
    max_images / probe_images: caps for quick runs. steps/baseline: deletion and insertion settings
    (``"blur"``, ``"mean"`` or a number). pointing_tolerance: px at the model's input size.
    sanity_images / sanity_steps / sanity_threshold: the cascading randomisation on a subset of
    images, at ``sanity_steps`` checkpoints (None: after every module); a method fails when the
    mean Spearman to the fully randomised model's maps is >= the threshold. robustness_images /
    robustness_samples / noise: max-sensitivity under uniform noise of that radius. bootstrap:
    resamples for the CIs. device: where models run. Returns a :class:`Scorecard`.
    """
    from cxrlens.explain import get_method

    if not runs:
        raise CxrlensError("give at least one run folder to score")
    if not methods:
        raise CxrlensError("give at least one attribution method to score")
    for method in methods:
        get_method(method)  # fail early on a typo, before loading anything
    method_params = dict(method_params or {})
    unknown = sorted(set(method_params) - set(methods))
    if unknown:
        raise CxrlensError(f"parameters given for '{unknown[0]}', which is not among the methods {', '.join(methods)}")
    for method, params in method_params.items():
        get_method(method).resolve(dict(params))
    device = torch.device(device)
    mask_dir = Path(mask_dir) if mask_dir is not None else DEFAULT_MASKS
    loaded = [r if isinstance(r, LoadedRun) else load_run(r) for r in runs]
    names = _unique_names(loaded)
    out_dir = Path(out_dir)
    cache: dict[int, MaskSet] = {}
    all_rows, sanity, galleries, shortcut, used_masks = [], {}, {}, {}, {}
    for run, name in zip(loaded, names, strict=True):
        size = run.config.image_size
        if size not in cache:
            cache[size] = load_mask_set(mask_dir, size, max_images=max_images)
            if "lungs" not in cache[size].masks:
                raise CxrlensError(f"{cache[size].csv}: a scorecard needs a 'lungs' mask column")
        mask_set = used_masks[name] = cache[size]
        rows, sanity[name], galleries[name] = score_model(
            run, name, mask_set, methods,
            method_params=method_params, targets=targets, steps=steps, baseline=baseline,
            pointing_tolerance=pointing_tolerance, sanity_images=sanity_images, sanity_steps=sanity_steps,
            sanity_threshold=sanity_threshold, robustness_images=robustness_images,
            robustness_samples=robustness_samples, noise=noise, seed=seed, device=device, max_batch=max_batch,
            gallery_size=gallery_size, progress=progress,
        )
        all_rows.append(rows)
        if data is not False:
            shortcut[name] = _shortcut_data(run, data, split, probe_images, device, seed)
    images = pd.concat(all_rows, ignore_index=True)
    table = summarise(images, bootstrap, seed)
    rankings = {
        "lung_focus": rank_models(images, "lung_focus", bootstrap, seed),
        "faithfulness": rank_models(images, "faithfulness", bootstrap, seed),
    }
    verdicts = {
        name: S.model_verdict(
            name,
            images[images["model"] == name],
            probe=shortcut.get(name, {}).get("probe"),
            performance=shortcut.get(name, {}).get("performance"),
            sanity=sanity[name],
        )
        for name in names
    }
    files = _write(out_dir, table, images, rankings, verdicts, shortcut, sanity, galleries, used_masks, {
        "runs": [str(r.run_dir) for r in loaded], "mask_dir": str(mask_dir), "methods": list(methods),
        "method_params": method_params, "targets": targets, "steps": steps, "baseline": baseline,
        "pointing_tolerance": pointing_tolerance, "sanity_images": sanity_images, "sanity_steps": sanity_steps,
        "sanity_threshold": sanity_threshold, "robustness_images": robustness_images,
        "robustness_samples": robustness_samples, "noise": noise, "bootstrap": bootstrap, "seed": seed,
    })
    return Scorecard(table, images, rankings, verdicts, shortcut, sanity, files)


def _write(out_dir: Path, table: pd.DataFrame, images: pd.DataFrame, rankings: dict, verdicts: dict, shortcut: dict,
           sanity: dict, galleries: dict, mask_sets: dict, settings: dict) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: str(out_dir / name) for name in (
        "scorecard.csv", "scorecard.md", "scorecard.png", "scorecard.json", "images.csv", "verdicts.json",
        "shortcut.json", "worst_offenders.png")}
    atomic_write_text(out_dir / "scorecard.csv", table.to_csv(index=False, float_format="%.5g"))
    worst_first = images.sort_values(["model", "lung_focus"], na_position="last", kind="stable")
    atomic_write_text(out_dir / "images.csv", worst_first.to_csv(index=False, float_format="%.5g"))
    text = "# Interpretability scorecard\n\nMean [95 % bootstrap CI over images].\n\n" + table_markdown(table)
    for metric, ranking in rankings.items():
        text += f"\n## Models ranked by {metric.replace('_', ' ')}\n\n"
        text += f"| rank | model | {metric} | n |\n|---|---|---|---|\n"
        text += "".join(
            f"| {r['rank']} | {r['model']} | {_fmt(r[metric], r['low'], r['high'])} | {r['n_images']} |\n"
            for r in ranking
        )
    text += "\n## Verdicts\n"
    for verdict in verdicts.values():
        text += f"\n**{verdict['summary']}**\n\n" + "".join(f"- {s}\n" for s in verdict["statements"])
    atomic_write_text(out_dir / "scorecard.md", text)
    atomic_write_bytes(out_dir / "scorecard.png", plot_heatmap(table))
    atomic_write_bytes(out_dir / "worst_offenders.png", plot_gallery(galleries, mask_sets))
    atomic_write_text(out_dir / "verdicts.json", _dumps(verdicts))
    atomic_write_text(out_dir / "shortcut.json", _dumps(shortcut))
    atomic_write_text(out_dir / "scorecard.json", _dumps({
        "settings": settings,
        "table": table.to_dict(orient="records"),
        "rankings": rankings,
        "sanity": sanity,
        "files": files,
    }))
    return files
