"""Shortcut detector: does a model recognise where an image comes from rather than what it shows?

Three kinds of evidence, each a number, and a verdict written from those numbers:

* performance per source (``cxrlens.evaluate.metrics_by_source``): recall and specificity of each
  class on each source with enough images;
* a source-prediction probe: a multinomial logistic regression on the model's penultimate
  features, cross-validated by patient group, compared with two baselines: always the most frequent
  source ("majority") and the best guess from the true class alone ("class only": the most frequent
  source of each class). Beating "class only" means source information beyond the label is encoded;
* where the attribution lies (from the scorecard's per-image rows), each relative to the area it
  would get from a map spread evenly (1 = chance): the lung focus relative to the lungs' area share
  (the lungs cover 20-55 % of an input, so an absolute share says little), the share outside the
  thorax relative to its area, how often the map's maximum lies outside the thorax relative to its
  area (a small artifact takes little mass but often the peak), and the share inside the zero padding
  (plus black bars burned into the file) relative to its area: padding differs by source when image
  shapes do;
* what the model does without the outside of the thorax: the drop of a class's probability when
  everything outside the thorax is blurred (no attribution method involved).

Every signal is flagged against a threshold. The thresholds live in ``shortcut_calibration.json``
beside this module, with where they came from (planted-shortcut runs of ``cxrlens shortcut-test``,
see :func:`calibrate`) and the error rates measured there; every verdict states them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.evaluate import metrics_by_source

MIN_SUPPORT = 5  # images a source needs to be reported
CALIBRATION_FILE = Path(__file__).with_name("shortcut_calibration.json")


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


def _probe_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of each sample: scikit-learn's StratifiedGroupKFold (a patient group never spans two
    folds; source shares similar across folds)."""
    n_splits = max(2, min(folds, len(np.unique(groups))))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.zeros(len(y), dtype=int)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": fine here
        warnings.filterwarnings("ignore", ".*least populated class.*", UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fold[test] = k
    return fold


def _probe_model(n_train: int, l2: float = 1e-2) -> Pipeline:
    """Standardised features, multinomial logistic regression (L-BFGS). ``C = 1 / (l2 * n)`` is the
    L2 penalty ``l2 / 2 * |W|^2`` on the mean cross-entropy that the probe has always used."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (l2 * max(1, n_train)), max_iter=1000))


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
    groups = np.asarray([str(g) for g in groups])
    fold = _probe_folds(y, groups, folds, seed)
    predicted, majority, class_only = (np.empty_like(y) for _ in range(3))
    label_arr = np.asarray(labels) if labels is not None else np.zeros(len(y), dtype=str)
    not_converged = 0  # folds whose L-BFGS stopped at max_iter (nearly separable features: still a usable fit)
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        overall = np.bincount(y[train], minlength=len(names)).argmax()
        if len(np.unique(y[train])) < 2:  # a fold cannot learn; fall back to the majority source
            predicted[test] = overall
        else:
            with warnings.catch_warnings(record=True) as caught:  # recorded in the result, not printed
                warnings.simplefilter("always", ConvergenceWarning)
                predicted[test] = _probe_model(int(train.sum())).fit(features[train], y[train]).predict(features[test])
            not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        majority[test] = overall
        for label in np.unique(label_arr[test]):
            same = train & (label_arr == label)
            guess = np.bincount(y[same], minlength=len(names)).argmax() if same.any() else overall
            class_only[test & (label_arr == label)] = guess
    recall = {str(n): float((predicted[y == i] == i).mean()) for i, n in enumerate(names)}
    return {
        "n_images": int(len(y)),
        "folds": int(len(np.unique(fold))),
        "folds_not_converged": int(not_converged),
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


# --- thresholds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """One number of the verdict and its flag: flagged when the value is below (``direction``
    "below") or at/above ("above") ``threshold``. ``used``: whether a flag counts towards the risk
    (a signal that does not separate planted from clean models is reported but not counted)."""

    threshold: float
    direction: str
    kind: str  # location, padding, probe or sources: each kind counts once towards the risk
    used: bool = True
    note: str = ""

    def flags(self, value: float | None) -> bool:
        if value is None or not np.isfinite(value):
            return False
        return bool(value < self.threshold) if self.direction == "below" else bool(value >= self.threshold)

    def rule(self, name: str) -> str:
        sign = "<" if self.direction == "below" else ">="
        return f"{name} {sign} {self.threshold:.3g}" + ("" if self.used else " (reported, not counted)")


SIGNAL_TEXT = {
    "lung_focus_ratio": "lung focus / lung area share (lowest class; 1 = a map spread evenly)",
    "outside_body_ratio": "share outside the thorax / its area share (highest class)",
    "padding_ratio": "share in the zero padding / its area share (highest class)",
    "outside_peak_ratio": "images whose map peaks outside the thorax / its area share (highest class)",
    "outside_reliance": "drop of the class probability when the outside of the thorax is blurred (highest class)",
    "probe_margin": "source-probe accuracy minus the better baseline",
    "source_spread": "largest spread of a class's recall or specificity across sources",
}
UNCALIBRATED = {
    "lung_focus_ratio": Signal(1.0, "below", "location"),
    "outside_body_ratio": Signal(1.5, "above", "location"),
    "padding_ratio": Signal(1.5, "above", "padding"),
    "outside_peak_ratio": Signal(2.0, "above", "location"),
    "outside_reliance": Signal(0.10, "above", "location"),
    "probe_margin": Signal(0.10, "above", "probe"),
    "source_spread": Signal(0.30, "above", "sources"),
}


@dataclass(frozen=True)
class DetectorThresholds:
    """The verdict's thresholds, where they came from and the error rates measured with them."""

    signals: dict[str, Signal] = field(default_factory=lambda: dict(UNCALIBRATED))
    source: str = "hand-chosen, not calibrated"
    error_rates: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> DetectorThresholds:
        """Thresholds from a calibration file (default: the one shipped beside this module); the
        uncalibrated defaults when the default file does not exist."""
        path = Path(path) if path is not None else CALIBRATION_FILE
        if not path.is_file():
            if path == CALIBRATION_FILE:
                return cls()
            raise CxrlensError(f"calibration file not found: {path}; write one with cxrlens.shortcut_test.calibrate")
        try:
            raw = json.loads(path.read_text())
            signals = {name: Signal(**value) for name, value in raw["signals"].items()}
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CxrlensError(f"{path}: not a shortcut-detector calibration ({exc})") from None
        return cls({**UNCALIBRATED, **signals}, raw.get("source", str(path)), raw.get("error_rates", {}))

    def to_json(self) -> dict:
        return {"source": self.source, "signals": {k: asdict(v) for k, v in self.signals.items()},
                "error_rates": self.error_rates}


# --- signals and the verdict ---------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _ratio(share: pd.Series, area: pd.Series) -> float:
    """Mean share over mean area on the rows where both are finite (NaN when the area is 0)."""
    keep = share.notna() & area.notna()
    total = float(area[keep].mean()) if keep.any() else 0.0
    return float(share[keep].mean() / total) if total > 0 else float("nan")


def location_signals(images: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per class: lung_focus_ratio, outside_body_ratio, padding_ratio (see the module docstring),
    from the scorecard's per-image rows averaged over methods per image."""
    columns = ["lung_focus", "lung_area", "outside_body_share", "outside_body_area", "padding_share", "padding_area",
               "outside_body_peak", "outside_body_reliance"]
    frame = images.reindex(columns=["class", "image", *columns])
    out = {}
    for cls, rows in frame.groupby("class", sort=False):
        per_image = rows.groupby("image")[columns].mean()
        out[str(cls)] = {
            "lung_focus_ratio": _ratio(per_image["lung_focus"], per_image["lung_area"]),
            "outside_body_ratio": _ratio(per_image["outside_body_share"], per_image["outside_body_area"]),
            "padding_ratio": _ratio(per_image["padding_share"], per_image["padding_area"].where(
                per_image["padding_area"] > 0)),
            "outside_peak_ratio": _ratio(per_image["outside_body_peak"], per_image["outside_body_area"]),
            "outside_reliance": float(per_image["outside_body_reliance"].mean()),
        }
    return out


def _extreme(values: list[float], lowest: bool) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float("nan") if not finite else float(min(finite) if lowest else max(finite))


def detector_signals(images: pd.DataFrame, probe: dict | None = None, performance: dict | None = None) -> dict:
    """The verdict's numbers for one model: each signal of :data:`SIGNAL_TEXT` (the most extreme
    class) and, under ``by_class``, the location signals per class."""
    by_class = location_signals(images) if len(images) else {}
    signals = {
        "lung_focus_ratio": _extreme([v["lung_focus_ratio"] for v in by_class.values()], lowest=True),
        "outside_body_ratio": _extreme([v["outside_body_ratio"] for v in by_class.values()], lowest=False),
        "padding_ratio": _extreme([v["padding_ratio"] for v in by_class.values()], lowest=False),
        "outside_peak_ratio": _extreme([v["outside_peak_ratio"] for v in by_class.values()], lowest=False),
        "outside_reliance": _extreme([v["outside_reliance"] for v in by_class.values()], lowest=False),
        "probe_margin": float("nan"),
        "source_spread": float("nan"),
    }
    if probe and "accuracy" in probe:
        signals["probe_margin"] = probe["accuracy"] - max(probe["majority_accuracy"], probe["class_only_accuracy"] or 0)
    if performance:
        spreads = [item["spread"] for entry in performance["spread"].values() for item in entry.values()]
        signals["source_spread"] = _extreme(spreads, lowest=False)
    return {**signals, "by_class": by_class}


def _location_statements(images: pd.DataFrame, methods: list[str]) -> tuple[list[str], dict]:
    """Sentences on where the evidence lies, and per class the images with the least in the lungs."""
    statements, worst = [], {}
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
        area = per_image["lung_area"].mean()
        statements.append(
            f"most of the {cls} evidence lies outside the lungs in {_pct(share)} of images "
            f"({int((focus < 0.5).sum())} of {len(focus)}; mean lung focus {focus.mean():.2f} over "
            f"{', '.join(methods)}; a map spread evenly would score {area:.2f}, so the lung focus is "
            f"{focus.mean() / area:.2f}x the lungs' area share)"
        )
    if images["device_share"].notna().any():
        with_devices = images[images["device_share"].notna()].groupby("image")[["device_share", "device_area"]].mean()
        statements.append(
            f"on the {len(with_devices)} images with devices, {100 * with_devices['device_share'].mean():.1f} % of "
            f"the evidence lies on them (they cover {100 * with_devices['device_area'].mean():.1f} % of the input)"
        )
    if images["outside_body_share"].notna().any():
        outside = images.groupby("image")[["outside_body_share", "outside_body_area"]].mean()
        statements.append(
            f"{_pct(outside['outside_body_share'].mean())} of the evidence lies outside the thorax "
            f"(which covers {_pct(outside['outside_body_area'].mean())} of the input)"
        )
    if "padding_share" in images and images["padding_share"].notna().any():
        padded = images[images["padding_area"] > 0].groupby("image")[["padding_share", "padding_area"]].mean()
        statements.append(
            f"on the {len(padded)} images with zero padding, {100 * padded['padding_share'].mean():.1f} % of the "
            f"evidence lies in it (it covers {100 * padded['padding_area'].mean():.1f} % of the input)"
        )
    return statements, worst


def _source_statements(probe: dict | None, performance: dict | None) -> list[str]:
    statements = []
    if probe and "accuracy" in probe:
        text = (
            f"a linear probe on its penultimate features tells the image source ({len(probe['sources'])} sources) "
            f"with {_pct(probe['accuracy'])} accuracy (majority baseline {_pct(probe['majority_accuracy'])}"
        )
        if probe["class_only_accuracy"] is not None:
            text += f", true class alone {_pct(probe['class_only_accuracy'])}"
        statements.append(text + ")")
    for cls, entry in (performance or {}).get("spread", {}).items():
        for key, item in entry.items():
            (low_s, low_v), (high_s, high_v) = item["low"], item["high"]
            statements.append(
                f"{cls} {key} ranges from {low_v:.2f} ({low_s}) to {high_v:.2f} ({high_s}) across sources"
            )
    return statements


def _quality_statements(images: pd.DataFrame, sanity: dict | None) -> list[str]:
    statements = []
    for method, result in (sanity or {}).items():
        verb = "passes" if result["passes"] else "FAILS"
        statements.append(
            f"{method} {verb} the randomisation check (maps of the fully randomised model correlate "
            f"{result['spearman']:.2f} with the trained model's)"
        )
    if "faithfulness" in images:
        for method, rows in images.groupby("method"):
            gap = rows["faithfulness"].dropna()
            if len(gap):
                statements.append(
                    f"{method}: removing its most relevant pixels first beats a random order in "
                    f"{_pct(float((gap > 0).mean()))} of image-class pairs"
                )
    return statements


def _flags(signals: dict, thresholds: DetectorThresholds) -> tuple[list[str], list[str], set[str]]:
    """Flags that count (with the kinds they come from) and flags that are only reported."""
    counted, reported, kinds = [], [], set()
    for name, signal in thresholds.signals.items():
        per_class = {c: v[name] for c, v in signals["by_class"].items() if name in v}
        hits = {c: v for c, v in per_class.items() if signal.flags(v)}
        if not per_class and signal.flags(signals.get(name)):
            hits = {"": signals[name]}
        for cls, value in hits.items():
            label = SIGNAL_TEXT[name].split(" (")[0]
            text = f"{(cls + ': ') if cls else ''}{label} = {value:.2f} ({signal.rule(name)})"
            (counted if signal.used else reported).append(text)
            if signal.used:
                kinds.add(signal.kind)
    return counted, reported, kinds


def _error_text(errors: dict) -> str:
    """The calibration's error rates of the location/padding flag, as a clause."""
    inside, cross = errors.get("in_sample"), errors.get("leave_one_run_out")
    if not inside or not cross:
        return ""
    return (f"; measured there, the location/padding flag falsely flagged {inside['false_flags']} of "
            f"{inside['clean']} evaluations of models without a planted shortcut and missed {inside['misses']} of "
            f"{inside['planted']} with one ({cross['false_flags']} and {cross['misses']} with thresholds "
            "chosen without the model judged)")


def model_verdict(
    model: str,
    images: pd.DataFrame,
    probe: dict | None = None,
    performance: dict | None = None,
    sanity: dict | None = None,
    thresholds: DetectorThresholds | None = None,
) -> dict:
    """A plain-language verdict for one model, every sentence computed from the numbers given.

    ``images``: the scorecard's per-image rows of this model (columns method, class, image,
    lung_focus, lung_area, device_share, device_area, outside_body_share, outside_body_area,
    padding_share, padding_area, faithfulness); ``probe``: :func:`source_probe`; ``performance``:
    :func:`source_performance`; ``sanity``: method -> {"passes": bool, "spearman": float};
    ``thresholds``: default :meth:`DetectorThresholds.load`. ``worst_images`` lists, per class, the
    five images with the most evidence outside the lungs; ``attribution_flagged`` says whether a
    counted location or padding signal is flagged (what a planted artifact should trigger)."""
    thresholds = thresholds or DetectorThresholds.load()
    images = images if images is not None else pd.DataFrame()
    images = images.reindex(columns=sorted(set(images.columns) | {
        "method", "class", "image", "lung_focus", "lung_area", "device_share", "device_area", "outside_body_share",
        "outside_body_area", "padding_share", "padding_area"}))
    methods = sorted(images["method"].dropna().unique())
    statements, worst = _location_statements(images, methods) if len(images) else ([], {})
    statements += _source_statements(probe, performance) + _quality_statements(images, sanity)
    signals = detector_signals(images, probe, performance)
    flags, reported, kinds = _flags(signals, thresholds)
    if reported:
        statements.append("flagged but not counted (these signals did not separate planted from clean models): "
                          + "; ".join(reported))
    rules = {name: signal.rule(name) for name, signal in thresholds.signals.items()}
    statements.append(f"thresholds: {'; '.join(rules.values())}; from: {thresholds.source}"
                      + _error_text(thresholds.error_rates))
    risk = "high" if len(kinds) >= 2 else "moderate" if kinds else "low"
    summary = f"{model}: shortcut risk {risk}" + (f" ({'; '.join(flags)})" if flags else "")
    numbers = {k: v for k, v in signals.items() if k != "by_class"}
    numbers.update({f"{c}:{k}": v for c, entry in signals["by_class"].items() for k, v in entry.items()})
    return {
        "model": model,
        "risk": risk,
        "summary": summary,
        "flags": flags,
        "attribution_flagged": bool(kinds & {"location", "padding"}),
        "statements": statements,
        "numbers": numbers,
        "worst_images": worst,
        "rules": {**rules, "risk": "high: flags of 2 or more kinds (location, padding, probe, sources), moderate: 1 "
                                    "kind, low: none"},
        "thresholds": thresholds.to_json(),
    }
