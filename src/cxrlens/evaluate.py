"""Evaluation: per-class precision, recall, specificity, F1 and AUROC, micro and macro averages,
confusion counts, the same per source, written as JSON, markdown and PNG plots.

Counts-based metrics are computed here from the confusion counts (so they equal a direct
computation exactly); AUROC and ROC curves come from torchmetrics.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from cxrlens.errors import CxrlensError
from cxrlens.io import progress_bar, save_figure, write_json
from cxrlens.runs import atomic_write_text

STUDY_THRESHOLD = 0.51  # the study's decision threshold on the sigmoid output


def _as_thresholds(threshold: float | Sequence[float], n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,)).copy()


def confusion_counts(probs: np.ndarray, targets: np.ndarray, threshold: float | Sequence[float]) -> np.ndarray:
    """[classes, 4] counts of tp, fp, fn, tn; a NaN target (an unknown label) counts nowhere."""
    predicted = probs > _as_thresholds(threshold, probs.shape[1])
    truth = targets > 0.5
    negative = targets <= 0.5  # False for NaN
    return np.stack(
        [
            (predicted & truth).sum(0),
            (predicted & negative).sum(0),
            (~predicted & truth).sum(0),
            (~predicted & negative).sum(0),
        ],
        axis=1,
    ).astype(np.int64)


def _ratio(a: np.ndarray | float, b: np.ndarray | float, undefined: float = 0.0) -> np.ndarray:
    """a / b, and ``undefined`` where b is 0 (0 for threshold search, NaN for reported metrics)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.full_like(a, undefined, dtype=np.float64), where=b > 0)


def _metric(a: float, b: float) -> float:
    """A reported ratio: NaN (shown as n/a, left out of averages) when its denominator is 0, e.g. the
    recall of a class with no positive image in a source."""
    return float(_ratio(a, b, undefined=float("nan")))


def f1_scores(
    probs: np.ndarray, targets: np.ndarray, threshold: float | Sequence[float] = STUDY_THRESHOLD
) -> np.ndarray:
    tp, fp, fn, _ = confusion_counts(probs, targets, threshold).T
    return _ratio(2 * tp, 2 * tp + fp + fn)


def best_f1_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per class, the threshold in 0.05..0.95 with the highest F1 (ties: closest to 0.5)."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    scores = np.stack([f1_scores(probs, targets, t) for t in grid])  # [grid, classes]
    penalty = np.abs(grid - 0.5)[:, None] * 1e-6
    return [float(grid[i]) for i in np.argmax(scores - penalty, axis=0)]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def compute_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    threshold: float | Sequence[float] = STUDY_THRESHOLD,
) -> dict:
    """Per-class and averaged metrics for probabilities ``probs`` [n, classes] and 0/1 ``targets``
    (NaN where a label is unknown: that image is left out of that class's metrics)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    counts = confusion_counts(probs, targets, threshold)
    tp, fp, fn, tn = counts.T
    per_class = {}
    for i, name in enumerate(class_names):
        known = ~np.isnan(targets[:, i])
        has_both = 0 < targets[known, i].sum() < known.sum()
        auroc = (
            float(binary_auroc(torch.from_numpy(probs[known, i]), torch.from_numpy(targets[known, i]).long()))
            if has_both
            else float("nan")
        )
        support = tp[i] + fn[i]
        per_class[name] = {
            "precision": _metric(tp[i], tp[i] + fp[i]),
            "recall": _metric(tp[i], support),
            "specificity": _metric(tn[i], tn[i] + fp[i]),
            # F1 needs positives to be about: without any it is 0 or 0/0, either way not a score.
            "f1": _metric(2 * tp[i], 2 * tp[i] + fp[i] + fn[i]) if support else float("nan"),
            "auroc": auroc,
            "support": int(tp[i] + fn[i]),
            "tp": int(tp[i]),
            "fp": int(fp[i]),
            "fn": int(fn[i]),
            "tn": int(tn[i]),
            "threshold": float(_as_thresholds(threshold, len(class_names))[i]),
        }
    TP, FP, FN, TN = (int(v) for v in counts.sum(0))
    micro = {
        "precision": _metric(TP, TP + FP),
        "recall": _metric(TP, TP + FN),
        "specificity": _metric(TN, TN + FP),
        "f1": _metric(2 * TP, 2 * TP + FP + FN) if TP + FN else float("nan"),
    }
    keys = ("precision", "recall", "specificity", "f1", "auroc")
    macro = {k: _nanmean([per_class[c][k] for c in class_names]) for k in keys}
    return {"n_images": int(len(probs)), "classes": per_class, "micro": micro, "macro": macro}


def metrics_by_source(
    probs: np.ndarray,
    targets: np.ndarray,
    sources: Sequence[str],
    class_names: Sequence[str],
    threshold: float | Sequence[float] = STUDY_THRESHOLD,
) -> dict:
    sources = np.asarray(sources)
    return {
        str(s): compute_metrics(probs[sources == s], targets[sources == s], class_names, threshold)
        for s in sorted(set(sources))
    }


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric for a table: ``n/a`` where it is undefined (NaN, or null read back from JSON)."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def f1_line(metrics: dict) -> str:
    """One line: per-class, micro and macro F1 (what the CLI prints)."""
    per_class = ", ".join(f"{c} {fmt(m['f1'])}" for c, m in metrics["classes"].items())
    return f"F1: {per_class}; micro {fmt(metrics['micro']['f1'])}, macro {fmt(metrics['macro']['f1'])}"


def markdown_table(results: dict[str, dict], class_names: Sequence[str], key: str = "f1") -> str:
    """One row per model (or ensemble), one column per class, plus micro and macro averages."""
    header = "| model | " + " | ".join(class_names) + " | micro | macro |"
    lines = [header, "|" + "---|" * (len(class_names) + 3)]
    for name, m in results.items():
        cells = [fmt(m["classes"][c][key]) for c in class_names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(m['micro'].get(key))} | {fmt(m['macro'][key])} |")
    return "\n".join(lines) + "\n"


def detail_markdown(metrics: dict, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"{metrics['n_images']} images.",
        "",
        "| class | precision | recall | specificity | F1 | AUROC | support | tp | fp | fn | tn | threshold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["classes"].items():
        lines.append(
            f"| {name} | {fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['specificity'])} | {fmt(m['f1'])} | "
            f"{fmt(m['auroc'])} | {m['support']} | {m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} "
            f"| {m['threshold']:.2f} |"
        )
    for avg in ("micro", "macro"):
        m = metrics[avg]
        lines.append(
            f"| *{avg}* | {fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['specificity'])} | "
            f"{fmt(m['f1'])} | {fmt(m.get('auroc'))} | | | | | | |"
        )
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------


def plot_confusion(metrics: dict, path: Path, title: str = "") -> None:
    from matplotlib.figure import Figure

    names = list(metrics["classes"])
    fig = Figure(figsize=(3.2 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        m = metrics["classes"][name]
        grid = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        ax.imshow(grid, cmap="Blues")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, str(v), ha="center", va="center", color="black" if v < grid.max() / 2 else "white")
        ax.set_xticks([0, 1], ["pred -", "pred +"])
        ax.set_yticks([0, 1], ["true -", "true +"])
        ax.set_title(f"{name} (F1 {fmt(m['f1'], 2)})")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_roc(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    for i, name in enumerate(class_names):
        known = ~np.isnan(targets[:, i])
        if not 0 < targets[known, i].sum() < known.sum():
            continue
        p, t = torch.from_numpy(probs[known, i]).float(), torch.from_numpy(targets[known, i]).long()
        fpr, tpr, _ = binary_roc(p, t)
        auc = float(binary_auroc(p, t))
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # a class with both outcomes; none on a one-class source
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# --- whole evaluation ----------------------------------------------------------------------------


def write_evaluation(
    out_dir: Path,
    title: str,
    probs: np.ndarray,
    targets: np.ndarray,
    frame: pd.DataFrame,
    class_names: Sequence[str],
    threshold: float | Sequence[float],
    leaks_allowed: Sequence | None = None,
) -> dict:
    """metrics.json, metrics.md, predictions.csv, confusion.png and roc.png in ``out_dir``; leaks let
    through with ``--allow-leaks`` are recorded beside the numbers they inflate."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(probs, targets, class_names, threshold)
    metrics["by_source"] = metrics_by_source(probs, targets, frame["source"].to_numpy(), class_names, threshold)
    if leaks_allowed:
        metrics["leaks_allowed"] = list(leaks_allowed)
    write_json(out_dir / "metrics.json", metrics)  # strict JSON: an undefined AUROC is null
    text = detail_markdown(metrics, title)
    for source, m in metrics["by_source"].items():
        text += "\n" + detail_markdown(m, f"source: {source}").replace("# source", "## source", 1)
    atomic_write_text(out_dir / "metrics.md", text)
    predictions = frame[["path", "source"]].copy()
    for i, name in enumerate(class_names):
        predictions[f"true:{name}"] = pd.array(np.round(targets[:, i]), dtype="Int64")  # empty: unknown
        predictions[f"prob:{name}"] = np.round(probs[:, i], 5)
    atomic_write_text(out_dir / "predictions.csv", predictions.to_csv(index=False))
    plot_confusion(metrics, out_dir / "confusion.png", title)
    plot_roc(probs, targets, class_names, out_dir / "roc.png", title)
    return metrics


def resolve_threshold(threshold: str | float, run_thresholds: list[float] | None, run_dir: Path) -> float | list[float]:
    """A float, or 'tuned' for the per-class thresholds chosen on the validation split."""
    if isinstance(threshold, str) and threshold.strip().lower() == "tuned":
        if run_thresholds is None:
            raise CxrlensError(f"{run_dir} has no thresholds.json; use a number for --threshold")
        return run_thresholds
    try:
        value = float(threshold)
    except ValueError:
        raise CxrlensError(f"--threshold must be a number in (0, 1) or 'tuned', not '{threshold}'") from None
    if not 0 < value < 1:
        raise CxrlensError(f"--threshold must lie in (0, 1), not {value}")
    return value


def predict_manifest(run, manifest, batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Probabilities of one loaded run on every image of a manifest, at the run's image size."""
    from torch.utils.data import DataLoader

    from cxrlens.data import XrayDataset
    from cxrlens.runs import predict

    loader = DataLoader(XrayDataset(manifest, run.config.preprocess, cache=False), batch_size=batch_size)
    batches = progress_bar(loader, desc=f"predict {run.name}", enabled=progress)
    outs = [predict(run.model, images) for images, _ in batches]
    return torch.cat(outs).numpy() if outs else np.zeros((0, run.taxonomy.num_classes))


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str | None = "test",
    threshold: str | float = STUDY_THRESHOLD,
    out: str | Path | None = None,
    progress: bool = True,
    allow_leaks: bool = False,
    options=None,
) -> dict:
    """Evaluate a run's best model on a split of its own data or of another data set (``options``: how to
    read that one, a :class:`cxrlens.datasets.ReadOptions`; its labels are read into the run's taxonomy,
    so a model trained on one collection is validated on another). Images the run was trained on are
    refused unless ``allow_leaks`` (see ``cxrlens.audit.check_evaluation_data``)."""
    from cxrlens.audit import check_evaluation_data
    from cxrlens.data import load_manifest
    from cxrlens.runs import load_run, make_output_folder

    run = load_run(run_dir)
    options = options if data else run.config.read_options
    manifest = load_manifest(data or run.config.data or None, run.taxonomy, options=options).split(split)
    thresholds = resolve_threshold(threshold, run.thresholds, run.run_dir)
    leaks = check_evaluation_data(run.config, manifest, allow_leaks, progress)
    out_dir = Path(out) if out else run.run_dir / f"eval-{split or 'all'}"
    created = make_output_folder(out_dir)  # before the slow part: an impossible --out fails at once
    try:
        probs = predict_manifest(run, manifest, progress=progress)
        metrics = write_evaluation(
            out_dir,
            f"{run.config.model} on {manifest.origin.name} [{split or 'all'}]",
            probs,
            manifest.targets_or_nan(),
            manifest.frame,
            run.taxonomy.classes,
            thresholds,
            leaks_allowed=leaks,
        )
    except BaseException:
        if created:  # a failed evaluation leaves no folder behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return metrics
