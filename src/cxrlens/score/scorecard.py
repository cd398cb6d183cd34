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
* ``scorecard.json``: the table, rankings, randomisation curves, the metrics' facts and the settings;
* ``config.json``: the :class:`~cxrlens.score.config.ScoreConfig` used, with the runs scored.

The columns are the registered metrics, :data:`cxrlens.score.metrics.SCORECARD_METRICS`, in
registration order (a metric registered with ``register_metric`` from anywhere is a new column):
``lung_focus`` (positive attribution share inside the lungs), ``relevance_mass_accuracy`` /
``relevance_rank_accuracy`` / ``pointing_game`` (against the opacity mask), ``device_share``,
``outside_body_share`` and ``padding_share`` (zero padding and black bars), ``outside_body_peak`` (the
map's maximum outside the thorax), ``outside_body_reliance`` (the probability's drop when the outside of
the thorax is blurred: no attribution involved), ``deletion_auc``, ``insertion_auc``, the gaps to a random
order and their sum ``faithfulness``, ``sanity_spearman`` / ``sanity_ssim`` (maps of the trained vs the fully randomised
model; low is good) and ``max_sensitivity``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlens import distributed
from cxrlens.data import Preprocess
from cxrlens.errors import CxrlensError
from cxrlens.io import save_figure, unique_names, write_json
from cxrlens.runs import LoadedRun, atomic_write_text, load_run
from cxrlens.score import metrics as M
from cxrlens.score import shortcut as S
from cxrlens.score.config import DEFAULT_MASKS, DEFAULT_METHODS, ScoreConfig
from cxrlens.score.masks import MaskSet, empty_border, load_mask_set

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DEFAULT_MASKS", "DEFAULT_METHODS", "REFERENCE_COLUMNS", "ScoreConfig", "Scorecard", "rank_models",
           "run_scorecard", "score_model", "summarise"]

SCORING_MASKS = ("lungs", "opacity", "devices", "outside_body", "padding")  # always in MetricInputs.masks
AREAS = {"lung_area": "lungs", "opacity_area": "opacity", "device_area": "devices", "outside_body_area": "outside_body",
         "padding_area": "padding"}
REFERENCE_COLUMNS = tuple(AREAS)  # each image's mask areas, beside the metrics (what a random map would score)


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
    config: ScoreConfig | None = None


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


def _shortcut_data(run: LoadedRun, config: ScoreConfig, device: torch.device) -> dict:
    """Per-source performance and the source probe on a classification split."""
    from cxrlens.data import XrayDataset, load_manifest
    from cxrlens.evaluate import STUDY_THRESHOLD

    own = config.data is None  # the run's own data set, read the way it was trained on
    source = (run.config.data or None) if own else config.data
    manifest = load_manifest(source, run.taxonomy, options=run.config.read_options if own else None)
    if config.split is not None and manifest.has_split:
        manifest = manifest.split(config.split)
    manifest = manifest.head(config.probe_images, config.seed)
    dataset = XrayDataset(manifest, run.config.preprocess, cache=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    features, logits = S.penultimate_features(run.model, images.to(device))
    probs = 1 / (1 + np.exp(-logits))
    threshold = run.thresholds if run.thresholds is not None else STUDY_THRESHOLD
    frame = manifest.frame
    classes = list(run.taxonomy.classes)
    performance = S.source_performance(probs, manifest.targets, frame["source"].to_numpy(), classes, threshold)
    labels = ["+".join(c for c, v in zip(classes, t, strict=True) if v > 0.5) for t in manifest.targets]
    probe = S.source_probe(features, frame["source"].to_numpy(), frame["patient_group"].to_numpy(), labels,
                           seed=config.seed)
    return {
        "data": str(manifest.origin),
        "split": config.split,
        "n_images": len(manifest),
        "threshold": threshold,
        "performance": performance,
        "probe": probe,
    }


# --- one model: a pipeline of short stages -------------------------------------------------------


@dataclass
class _ModelSetup:
    """What every attribution method of one model shares."""

    name: str
    classes: list[str]
    target_idx: list[int]  # explained classes
    chosen: np.ndarray  # [B, T] bool: the (image, class) pairs scored
    model: nn.Module
    images: torch.Tensor
    probs: np.ndarray  # [B, classes]
    masks: dict[str, torch.Tensor]
    areas: dict[str, np.ndarray]
    subsets: dict[str, np.ndarray]
    frame: pd.DataFrame  # the mask set's rows


def _choose_targets(mask_set: MaskSet, taxonomy: Any, targets: str) -> tuple[list[int], np.ndarray]:
    """Explained classes and the [B, T] (image, class) pairs scored: labelled ones, or all."""
    classes = list(taxonomy.classes)
    labels = _labels(mask_set, taxonomy)
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
            f"{mask_set.csv}: no image has a label of taxonomy '{taxonomy.name}' "
            f"({', '.join(classes)}); fill the 'finding' or 'cls' column, or use targets='all'"
        )
    return target_idx, chosen


def _explainable_model(model: nn.Module, methods: Sequence[str], method_params: dict[str, dict],
                       images: torch.Tensor) -> nn.Module:
    """The model, rewritten into its explainable form when a method needs backward rules."""
    from cxrlens.explain import get_method, make_explainable

    if any(get_method(m).needs_rewrite(method_params.get(m)) for m in methods):
        model = make_explainable(model, images[:1])
    return model


def _scoring_masks(mask_set: MaskSet) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The masks metrics may score against (every mask of the set; the built-in metrics' masks all
    False where absent) and each image's mask areas (NaN where the radiologists drew no opacity /
    devices column)."""
    masks = dict(mask_set.masks)
    # zero padding plus black bars burned into the file: to a model they look the same
    masks["padding"] = masks["padding"] | empty_border(mask_set.images)
    for name in SCORING_MASKS:
        masks.setdefault(name, torch.zeros_like(masks["lungs"]))
    areas = {column: M.mask_share(masks[name]).numpy() for column, name in AREAS.items()}
    for key, present in (("opacity_area", "opacity"), ("device_area", "devices")):
        if present in mask_set.present:
            areas[key] = np.where(mask_set.present[present].numpy(), areas[key], np.nan)
        else:
            areas[key] = np.full(len(mask_set), np.nan)
    return masks, areas


def _prepare(run: LoadedRun, name: str, mask_set: MaskSet, config: ScoreConfig) -> _ModelSetup:
    device = distributed.device(config.device)
    target_idx, chosen = _choose_targets(mask_set, run.taxonomy, config.targets)
    images = mask_set.images.to(device)
    model = _explainable_model(run.model.to(device).eval(), config.methods, config.method_params, images)
    with torch.no_grad():
        logits = [model(x).float() for x in images.split(config.max_batch)]
    probs = torch.sigmoid(torch.cat(logits)).cpu().numpy()
    masks, areas = _scoring_masks(mask_set)
    has_target = np.nonzero(chosen.any(1))[0]
    subsets = {"sanity": _subset(has_target, config.sanity_images, config.seed),
               "robustness": _subset(has_target, config.robustness_images, config.seed + 1)}
    return _ModelSetup(name, list(run.taxonomy.classes), target_idx, chosen, model, images, probs, masks, areas,
                       subsets, mask_set.frame)


def _sanity_record(result: M.RandomisationResult, pick: np.ndarray, config: ScoreConfig, n_images: int) -> dict:
    spearman_curve = result.curve("spearman", pick)
    return {
        "passes": result.passes(config.sanity_threshold, pick),
        "spearman": spearman_curve[-1],
        "threshold": config.sanity_threshold,
        "layers": result.layers,
        "n_randomised": result.n_randomised,
        "spearman_curve": spearman_curve,
        "ssim_curve": result.curve("ssim", pick),
        "n_images": n_images,
    }


def _image_rows(setup: _ModelSetup, method: str, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per scored (image, class) pair: every metric and the image's mask areas."""
    ii, tt = np.nonzero(setup.chosen)
    blank = pd.Series([""] * len(setup.frame))
    return pd.DataFrame({
        "model": setup.name,
        "method": method,
        "class": [setup.classes[setup.target_idx[t]] for t in tt],
        "image": setup.frame["image"].to_numpy()[ii],
        "patient_group": setup.frame.get("patient_group", blank).to_numpy()[ii],
        "finding": setup.frame.get("finding", blank).to_numpy()[ii],
        "probability": setup.probs[ii, np.asarray(setup.target_idx)[tt]],
        "outside_lungs": 1 - values["lung_focus"][ii, tt],
        **{k: v[ii, tt] for k, v in values.items()},
        **{k: v[ii] for k, v in setup.areas.items()},
    })


def _gallery_candidates(setup: _ModelSetup, method: str, lung_focus: np.ndarray, maps: torch.Tensor,
                        size: int, block: np.ndarray) -> list[dict]:
    """This method's pairs with the least evidence in the lungs among the images ``block`` (whose
    ``lung_focus`` and ``maps`` these are), with their maps."""
    ii, tt = np.nonzero(setup.chosen[block])
    order = np.argsort(np.nan_to_num(lung_focus[ii, tt], nan=np.inf), kind="stable")[:size]
    rel_paths = setup.frame["image"].to_numpy()
    return [
        {"model": setup.name, "method": method, "class": setup.classes[setup.target_idx[tt[j]]],
         "image": rel_paths[block[ii[j]]], "lung_focus": float(lung_focus[ii[j], tt[j]]),
         "index": int(block[ii[j]]), "map": maps[ii[j], tt[j]].detach().cpu()}
        for j in order
    ]


def block_seed(seed: int, block: int) -> int:
    """The seed of block ``block``'s random draws (random pixel order, noise), derived from ``seed``."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1)[0])


def subset_positions(subset: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Positions within ``block`` (sorted image indices) of the members of ``subset`` it holds."""
    return np.flatnonzero(np.isin(block, subset))


def block_metrics(inputs: M.MetricInputs) -> tuple[dict[str, np.ndarray], M.RandomisationResult | None]:
    """Every registered metric [B, T] of one block of images and its randomisation result."""
    values = {metric: compute(inputs) for metric, compute in M.SCORECARD_METRICS.items()}
    return values, M.randomisation(inputs)


def _score_block(run: LoadedRun, setup: _ModelSetup, config: ScoreConfig, k: int, block: np.ndarray) -> dict:
    """Block ``k`` (image indices ``block``) under every method: metric values, randomisation, gallery."""
    images = setup.images[block]
    masks = {name: mask[block] for name, mask in setup.masks.items()}
    subsets = {name: subset_positions(members, block) for name, members in setup.subsets.items()}
    model_shared: dict[str, Any] = {}  # e.g. the random-order AUCs, the same for every method
    out = {}
    for method in config.methods:
        explain = _explainer(method, setup.target_idx, config.method_params.get(method, {}), config.max_batch,
                             run.config.model)
        inputs = M.MetricInputs(setup.model, explain, images, explain(setup.model, images), setup.target_idx, masks,
                                subsets, config, model_shared=model_shared, draw_seed=block_seed(config.seed, k))
        values, result = block_metrics(inputs)
        out[method] = (values, result, _gallery_candidates(setup, method, values["lung_focus"], inputs.maps,
                                                           config.gallery_size, block))
    return out


def combine_randomisation(parts: list[M.RandomisationResult | None]) -> M.RandomisationResult | None:
    """The results of several blocks as one, images in block order."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return M.RandomisationResult(parts[0].layers, parts[0].n_randomised, torch.cat([p.spearman for p in parts], 1),
                                 torch.cat([p.ssim for p in parts], 1))


def score_model(run: LoadedRun, name: str, mask_set: MaskSet,
                config: ScoreConfig) -> tuple[pd.DataFrame, dict, list[dict]]:
    """Per-image rows of every registered metric for one model and every method, its randomisation
    results, and the candidates for the worst-offender gallery (with their maps).

    The images are scored in blocks of ``config.block_size`` (each with its own random draws); under
    several processes each scores its share of the blocks and the results are gathered, so every
    process returns what one process computes alone."""
    started = time.perf_counter()
    setup = _prepare(run, name, mask_set, config)
    n, size = len(mask_set), config.block_size
    blocks = [np.arange(start, min(start + size, n)) for start in range(0, n, size)]
    mine = {k: _score_block(run, setup, config, k, blocks[k]) for k in distributed.owned(len(blocks))}
    parts = [part for share in distributed.gather(mine) for part in share.items()]
    by_block = [block for _, block in sorted(parts, key=lambda kv: kv[0])]
    rows, sanity, gallery = [], {}, []
    for method in config.methods:
        values = {metric: np.concatenate([b[method][0][metric] for b in by_block]) for metric in M.SCORECARD_METRICS}
        result = combine_randomisation([b[method][1] for b in by_block])
        if result is not None:
            index = setup.subsets["sanity"]
            sanity[method] = _sanity_record(result, setup.chosen[index], config, len(index))
        rows.append(_image_rows(setup, method, values))
        candidates = [c for b in by_block for c in b[method][2]]
        candidates.sort(key=lambda g: (math.inf if math.isnan(g["lung_focus"]) else g["lung_focus"]))
        gallery += candidates[:config.gallery_size]
    if config.progress and distributed.is_main():
        print(f"score {name}: {time.perf_counter() - started:.1f} s")
    gallery.sort(key=lambda g: (math.inf if math.isnan(g["lung_focus"]) else g["lung_focus"]))
    return pd.concat(rows, ignore_index=True), sanity, gallery[:config.gallery_size]


def summarise(images: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per model x method x class: each metric's mean and bootstrap CI over images."""
    records = []
    for (model, method, cls), rows in images.groupby(["model", "method", "class"], sort=False):
        record: dict[str, Any] = {"model": model, "method": method, "class": cls, "n_images": int(len(rows))}
        for metric in M.SCORECARD_METRICS:
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
    higher = M.get_metric(metric).higher_is_better
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
    columns = list(M.SCORECARD_METRICS)
    header = "| model | method | class | n | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 4)]
    for _, r in table.iterrows():
        cells = [_fmt(r[c], r[f"{c}_low"], r[f"{c}_high"]) for c in columns]
        lines.append(f"| {r['model']} | {r['method']} | {r['class']} | {r['n_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(table: pd.DataFrame) -> Figure:
    """Heat map of the table: colour = rank of the row within each metric (green = better), text = value."""
    from matplotlib.figure import Figure

    columns = list(M.SCORECARD_METRICS)
    values = table[columns].to_numpy(dtype=np.float64)
    colour = np.full_like(values, np.nan)
    for j, c in enumerate(columns):
        col = values[:, j]
        finite = np.isfinite(col)
        if finite.sum() == 1:
            colour[finite, j] = 0.5
        elif finite.sum() > 1:
            higher = M.SCORECARD_METRICS[c].higher_is_better
            ranks = pd.Series(col[finite] if higher else -col[finite]).rank().to_numpy()
            colour[finite, j] = (ranks - 1) / (finite.sum() - 1)
    labels = [f"{r.model} / {r.method} / {r['class']}" for _, r in table.iterrows()]
    fig = Figure(figsize=(1.0 * len(columns) + 3, 0.45 * len(labels) + 2))
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(colour), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), [c.replace("_", "\n") for c in columns], fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("interpretability scorecard (colour: rank per metric, green = better)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_gallery(gallery: dict[str, list[dict]], mask_sets: dict[str, MaskSet]) -> Figure:
    """Per model (row) the pairs with the least evidence in the lungs: image, positive attribution
    (magma), lung outline (cyan)."""
    from matplotlib.figure import Figure

    n_rows = max(1, len(gallery))
    n_cols = max(1, max((len(v) for v in gallery.values()), default=1))
    fig = Figure(figsize=(2.2 * n_cols, 2.5 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
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
    return fig


# --- entry point ---------------------------------------------------------------------------------


def run_scorecard(runs: Sequence[str | Path | LoadedRun], out_dir: str | Path,
                  config: ScoreConfig | None = None) -> Scorecard | None:
    """Score every run x attribution method x class and write the scorecard (and its ``config.json``)
    to ``out_dir``. runs: run folders or :class:`LoadedRun`; config: every setting (defaults:
    ``ScoreConfig()``). Returns a :class:`Scorecard`.

    Under several processes (:func:`cxrlens.distributed.launch`) each scores its share of the image
    blocks and of the shortcut probes; process 0 gathers the rows, writes the files and returns the
    Scorecard, the others return None."""
    config = config or ScoreConfig()
    if not runs:
        raise CxrlensError("give at least one run folder to score")
    config.check()  # fail on a typo before anything is loaded
    config = replace(config, masks=str(config.mask_dir), methods=list(config.methods),
                     method_params=dict(config.method_params))
    loaded = [r if isinstance(r, LoadedRun) else load_run(r) for r in runs]
    names = unique_names(r.name for r in loaded)
    rows, sanity, galleries, shortcut, mask_sets = _score_runs(loaded, names, config)
    if not distributed.is_main():
        return None
    images = pd.concat(rows, ignore_index=True)
    table = summarise(images, config.bootstrap, config.seed)
    rankings = {metric: rank_models(images, metric, config.bootstrap, config.seed) for metric in config.rank_by}
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
    card = Scorecard(table, images, rankings, verdicts, shortcut, sanity, config=config)
    card.files = _write(Path(out_dir), card, galleries, mask_sets, {"runs": [str(r.run_dir) for r in loaded],
                                                                     **config.to_dict()})
    return card


def _score_runs(loaded: list[LoadedRun], names: list[str], config: ScoreConfig) -> tuple[list, dict, dict, dict, dict]:
    """Per model: the image rows, randomisation results, gallery, shortcut data and the mask set
    used (loaded once per preprocessing: input size and fit)."""
    device = distributed.device(config.device)
    cache: dict[Preprocess, MaskSet] = {}
    rows, sanity, galleries, shortcut, mask_sets = [], {}, {}, {}, {}
    for i, (run, name) in enumerate(zip(loaded, names, strict=True)):
        preprocess = run.config.preprocess
        if preprocess not in cache:
            cache[preprocess] = load_mask_set(config.mask_dir, preprocess, max_images=config.max_images)
            if "lungs" not in cache[preprocess].masks:
                raise CxrlensError(f"{cache[preprocess].csv}: a scorecard needs a 'lungs' mask column")
        mask_sets[name] = cache[preprocess]
        model_rows, sanity[name], galleries[name] = score_model(run, name, cache[preprocess], config)
        rows.append(model_rows)
        if config.shortcut and i % distributed.world_size() == distributed.rank():  # one process per model
            shortcut[name] = _shortcut_data(run, config, device)
    merged = {k: v for share in distributed.gather(shortcut) for k, v in share.items()}
    return rows, sanity, galleries, {name: merged[name] for name in names if name in merged}, mask_sets


def _markdown(card: Scorecard) -> str:
    text = "# Interpretability scorecard\n\nMean [95 % bootstrap CI over images].\n\n" + table_markdown(card.table)
    for metric, ranking in card.rankings.items():
        text += f"\n## Models ranked by {metric.replace('_', ' ')}\n\n"
        text += f"| rank | model | {metric} | n |\n|---|---|---|---|\n"
        text += "".join(
            f"| {r['rank']} | {r['model']} | {_fmt(r[metric], r['low'], r['high'])} | {r['n_images']} |\n"
            for r in ranking
        )
    text += "\n## Verdicts\n"
    for verdict in card.verdicts.values():
        text += f"\n**{verdict['summary']}**\n\n" + "".join(f"- {s}\n" for s in verdict["statements"])
    return text


def _write(out_dir: Path, card: Scorecard, galleries: dict, mask_sets: dict, settings: dict) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: str(out_dir / name) for name in (
        "scorecard.csv", "scorecard.md", "scorecard.png", "scorecard.json", "images.csv", "verdicts.json",
        "shortcut.json", "worst_offenders.png", "config.json")}
    atomic_write_text(out_dir / "scorecard.csv", card.table.to_csv(index=False, float_format="%.5g"))
    worst_first = card.images.sort_values(["model", "lung_focus"], na_position="last", kind="stable")
    atomic_write_text(out_dir / "images.csv", worst_first.to_csv(index=False, float_format="%.5g"))
    atomic_write_text(out_dir / "scorecard.md", _markdown(card))
    save_figure(plot_heatmap(card.table), out_dir / "scorecard.png")
    save_figure(plot_gallery(galleries, mask_sets), out_dir / "worst_offenders.png")
    write_json(out_dir / "verdicts.json", card.verdicts)
    write_json(out_dir / "shortcut.json", card.shortcut)
    write_json(out_dir / "scorecard.json", {
        "settings": settings,
        "metrics": {m.name: {"higher_is_better": m.higher_is_better, "needs_model": m.needs_model,
                             "map_sign": m.map_sign, "description": m.description}
                    for m in M.SCORECARD_METRICS.values()},
        "table": card.table.to_dict(orient="records"),
        "rankings": card.rankings,
        "sanity": card.sanity,
        "files": files,
    })
    write_json(out_dir / "config.json", settings)
    return files
