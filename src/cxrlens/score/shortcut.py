"""Shortcut detector: does a model recognise where an image comes from rather than what it shows?

Three kinds of evidence, each a number, and a verdict written from those numbers:

* performance per source (``cxrlens.evaluate.metrics_by_source``): recall and specificity of each
  class on each source with enough images;
* a source-prediction probe: a multinomial logistic regression on the model's penultimate
  features, cross-validated by patient group, compared with two baselines: always the most frequent
  source ("majority") and the best guess from the true class alone ("class only": the most frequent
  source of each class). Beating "class only" means source information beyond the label is encoded;
* where the attribution lies (from the scorecard's per-image rows): the share of images whose
  evidence for a class lies mostly outside the lungs, on devices, outside the thorax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlens.evaluate import metrics_by_source

# thresholds of the verdict's flags (stated in every verdict so a reader can judge them)
OUTSIDE_LUNGS_FLAG = 0.5  # share of images whose evidence lies mostly (> 50 %) outside the lungs
PROBE_MARGIN_FLAG = 0.10  # probe accuracy above the better of the two baselines
SOURCE_SPREAD_FLAG = 0.30  # spread of a class's recall or specificity across sources
MIN_SUPPORT = 5  # images a source needs to be reported


@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features before the classifier [N, D] and logits [N, classes] for a stack of images.

    timm models: ``forward_head(forward_features(x), pre_logits=True)``; other models: the input of
    their last ``nn.Linear``."""
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    timm_like = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    last_linear = None if timm_like else [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    store: dict[str, torch.Tensor] = {}
    handle = None
    if last_linear is not None:
        handle = last_linear.register_forward_hook(lambda m, args, out: store.__setitem__("x", args[0]))
    try:
        for chunk in images.split(batch_size):
            chunk = chunk.to(device)
            if timm_like:
                fmap = model.forward_features(chunk)
                feats.append(model.forward_head(fmap, pre_logits=True).flatten(1).float().cpu())
                logits.append(model.forward_head(fmap).float().cpu())
            else:
                logits.append(model(chunk).float().cpu())
                feats.append(store["x"].flatten(1).float().cpu())
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def group_folds(groups: Sequence[str], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number of each sample; all samples of a patient group share a fold (groups shuffled,
    then dealt out largest first to the emptiest fold, so folds have similar sizes)."""
    groups = np.asarray(groups)
    unique, counts = np.unique(groups, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(folds, dtype=int)
    fold_of = {}
    for g in order:
        k = int(np.argmin(sizes))
        fold_of[unique[g]] = k
        sizes[k] += counts[g]
    return np.array([fold_of[g] for g in groups])


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-2, max_iter: int = 200) -> dict:
    """Multinomial logistic regression (L-BFGS, L2 penalty) on standardised features."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    mean, std = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt = (xt - mean) / std
    yt = torch.as_tensor(y, dtype=torch.long)
    weight = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xt @ weight + bias, yt) + l2 * weight.pow(2).sum() / 2
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: thread start-up costs more than it saves (100x on a busy CPU)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return {"weight": weight.detach(), "bias": bias.detach(), "mean": mean, "std": std}


def predict_logistic(fit: dict, x: np.ndarray) -> np.ndarray:
    xt = (torch.as_tensor(x, dtype=torch.float64) - fit["mean"]) / fit["std"]
    return (xt @ fit["weight"] + fit["bias"]).argmax(1).numpy()


def source_probe(
    features: np.ndarray,
    sources: Sequence[str],
    groups: Sequence[str],
    labels: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    min_count: int = MIN_SUPPORT,
) -> dict:
    """Cross-validated (by patient group) source prediction from features.

    Sources with fewer than ``min_count`` images are pooled as ``other``. ``labels`` (one class
    name per image) enables the "class only" baseline. Returns accuracy, balanced accuracy,
    the baselines, per-source recall and counts; ``{"skipped": reason}`` when there is one source.
    """
    sources = np.asarray([str(s) for s in sources])
    names, counts = np.unique(sources, return_counts=True)
    rare = set(names[counts < min_count])
    sources = np.array(["other" if s in rare else s for s in sources])
    names = np.unique(sources)
    if len(names) < 2:
        return {"skipped": f"only one source ({names[0] if len(names) else 'none'}) among the images"}
    y = np.searchsorted(names, sources)
    fold = group_folds(groups, min(folds, len(set(groups))), seed)
    predicted = np.empty_like(y)
    majority = np.empty_like(y)
    class_only = np.empty_like(y)
    label_arr = np.asarray(labels) if labels is not None else np.zeros(len(y), dtype=str)
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        if len(np.unique(y[train])) < 2:  # a fold cannot learn; fall back to the majority source
            predicted[test] = np.bincount(y[train], minlength=len(names)).argmax()
        else:
            fit = fit_logistic(features[train], y[train], len(names))
            predicted[test] = predict_logistic(fit, features[test])
        overall = np.bincount(y[train], minlength=len(names)).argmax()
        majority[test] = overall
        for label in np.unique(label_arr[test]):
            same = train & (label_arr == label)
            guess = np.bincount(y[same], minlength=len(names)).argmax() if same.any() else overall
            class_only[test & (label_arr == label)] = guess
    recall = {str(n): float((predicted[y == i] == i).mean()) for i, n in enumerate(names)}
    return {
        "n_images": int(len(y)),
        "folds": int(len(np.unique(fold))),
        "sources": {str(n): int((y == i).sum()) for i, n in enumerate(names)},
        "accuracy": float((predicted == y).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "majority_accuracy": float((majority == y).mean()),
        "class_only_accuracy": float((class_only == y).mean()) if labels is not None else None,
        "recall": recall,
    }


def source_performance(
    probs: np.ndarray,
    targets: np.ndarray,
    sources: Sequence[str],
    class_names: Sequence[str],
    threshold: float | Sequence[float],
) -> dict:
    """``metrics_by_source`` plus, per class, the sources' recall (on positives) and specificity (on
    negatives) where a source has at least ``MIN_SUPPORT`` of them, and their spread."""
    by_source = metrics_by_source(probs, targets, np.asarray(sources), class_names, threshold)
    spread = {}
    for name in class_names:
        entry = {}
        for key, count_of in (("recall", lambda m: m["tp"] + m["fn"]), ("specificity", lambda m: m["tn"] + m["fp"])):
            values = {
                s: m["classes"][name][key] for s, m in by_source.items() if count_of(m["classes"][name]) >= MIN_SUPPORT
            }
            if len(values) >= 2:
                low, high = min(values, key=values.get), max(values, key=values.get)
                entry[key] = {"by_source": values, "low": [low, values[low]], "high": [high, values[high]],
                              "spread": values[high] - values[low]}
        spread[name] = entry
    return {"by_source": by_source, "spread": spread}


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def model_verdict(
    model: str,
    images: pd.DataFrame,
    probe: dict | None = None,
    performance: dict | None = None,
    sanity: dict | None = None,
) -> dict:
    """A plain-language verdict for one model, every sentence computed from the numbers given.

    ``images``: the scorecard's per-image rows of this model (columns method, class, image,
    lung_focus, lung_area, device_share, device_area, outside_body_share, outside_body_area,
    faithfulness); ``worst_images`` lists, per class, the five images with the most evidence outside
    the lungs; ``probe``: :func:`source_probe`; ``performance``: :func:`source_performance`;
    ``sanity``: method -> {"passes": bool, "spearman": float}."""
    statements, flags, numbers = [], [], {}
    worst: dict[str, list[dict]] = {}
    kinds: set[str] = set()  # each kind of evidence counts once towards the risk
    methods = sorted(images["method"].unique()) if len(images) else []
    for cls, rows in images.groupby("class", sort=False):
        per_image = rows.groupby("image")[["lung_focus", "lung_area", "device_share"]].mean()
        focus = per_image["lung_focus"].dropna()
        if focus.empty:
            continue
        worst[str(cls)] = [
            {"image": image, "outside_lungs": float(1 - r["lung_focus"]),
             "device_share": None if np.isnan(r["device_share"]) else float(r["device_share"])}
            for image, r in per_image.dropna(subset=["lung_focus"]).sort_values("lung_focus").head(5).iterrows()
        ]
        share = float((focus < 0.5).mean())
        numbers[f"{cls}:outside_lungs_share"] = share
        statements.append(
            f"most of the {cls} evidence lies outside the lungs in {_pct(share)} of images "
            f"({int((focus < 0.5).sum())} of {len(focus)}; mean lung focus {focus.mean():.2f} over "
            f"{', '.join(methods)}; a map spread evenly would score {per_image['lung_area'].mean():.2f})"
        )
        if share >= OUTSIDE_LUNGS_FLAG:
            flags.append(f"{cls} evidence mostly outside the lungs in {_pct(share)} of images")
            kinds.add("lungs")
    if len(images) and images["device_share"].notna().any():
        with_devices = images[images["device_share"].notna()].groupby("image")[["device_share", "device_area"]].mean()
        numbers["device_share"] = float(with_devices["device_share"].mean())
        statements.append(
            f"on the {len(with_devices)} images with devices, {100 * with_devices['device_share'].mean():.1f} % of "
            f"the evidence lies on them (they cover {100 * with_devices['device_area'].mean():.1f} % of the input)"
        )
    if len(images) and images["outside_body_share"].notna().any():
        outside = images.groupby("image")[["outside_body_share", "outside_body_area"]].mean()
        numbers["outside_body_share"] = float(outside["outside_body_share"].mean())
        statements.append(
            f"{_pct(outside['outside_body_share'].mean())} of the evidence lies outside the thorax "
            f"(which covers {_pct(outside['outside_body_area'].mean())} of the input)"
        )
    if probe and "accuracy" in probe:
        reference = max(probe["majority_accuracy"], probe["class_only_accuracy"] or 0.0)
        numbers["probe_accuracy"], numbers["probe_reference"] = probe["accuracy"], reference
        text = (
            f"a linear probe on its penultimate features tells the image source ({len(probe['sources'])} sources) "
            f"with {_pct(probe['accuracy'])} accuracy (majority baseline {_pct(probe['majority_accuracy'])}"
        )
        if probe["class_only_accuracy"] is not None:
            text += f", true class alone {_pct(probe['class_only_accuracy'])}"
        statements.append(text + ")")
        if probe["accuracy"] - reference >= PROBE_MARGIN_FLAG:
            flags.append(f"source decodable from features beyond the class (+{_pct(probe['accuracy'] - reference)})")
            kinds.add("probe")
    if performance:
        for cls, entry in performance["spread"].items():
            for key, item in entry.items():
                (low_s, low_v), (high_s, high_v) = item["low"], item["high"]
                numbers[f"{cls}:{key}_spread"] = item["spread"]
                statements.append(
                    f"{cls} {key} ranges from {low_v:.2f} ({low_s}) to {high_v:.2f} ({high_s}) across sources"
                )
                if item["spread"] >= SOURCE_SPREAD_FLAG:
                    flags.append(f"{cls} {key} differs by {item['spread']:.2f} between sources")
                    kinds.add("sources")
    for method, result in (sanity or {}).items():
        verb = "passes" if result["passes"] else "FAILS"
        statements.append(
            f"{method} {verb} the randomisation check (maps of the fully randomised model correlate "
            f"{result['spearman']:.2f} with the trained model's)"
        )
    if images is not None and len(images) and "faithfulness" in images:
        for method, rows in images.groupby("method"):
            gap = rows["faithfulness"].dropna()
            if len(gap):
                statements.append(
                    f"{method}: removing its most relevant pixels first beats a random order in "
                    f"{_pct(float((gap > 0).mean()))} of image-class pairs"
                )
    risk = "high" if len(kinds) >= 2 else "moderate" if kinds else "low"
    summary = f"{model}: shortcut risk {risk}" + (f" ({'; '.join(flags)})" if flags else "")
    return {
        "model": model,
        "risk": risk,
        "summary": summary,
        "flags": flags,
        "statements": statements,
        "numbers": numbers,
        "worst_images": worst,  # per class, the images with the most evidence outside the lungs (mean over methods)
        "rules": {
            "outside_lungs_flag": f"evidence of a class mostly outside the lungs in >= {_pct(OUTSIDE_LUNGS_FLAG)} of "
            "images",
            "probe_flag": f"probe accuracy >= best baseline + {PROBE_MARGIN_FLAG:.2f}",
            "source_flag": f"recall or specificity of a class differs by >= {SOURCE_SPREAD_FLAG:.2f} between sources",
            "risk": "high: flags of 2 or 3 kinds (lungs, probe, sources), moderate: 1 kind, low: none",
        },
    }
