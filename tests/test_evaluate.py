"""Metrics equal a direct computation on fixed arrays; ensembles vote as documented."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlens.ensemble import combine
from cxrlens.evaluate import best_f1_thresholds, compute_metrics, metrics_by_source

RNG = np.random.default_rng(7)
TARGETS = (RNG.random((200, 3)) < 0.4).astype(float)
PROBS = np.clip(TARGETS * 0.35 + RNG.random((200, 3)) * 0.65, 0, 1)


def _direct(probs, targets, threshold):
    """Textbook definitions, one image at a time."""
    out = []
    for c in range(targets.shape[1]):
        tp = fp = fn = tn = 0
        for p, t in zip(probs[:, c], targets[:, c], strict=True):
            pred = p > threshold
            tp += pred and t == 1
            fp += pred and t == 0
            fn += (not pred) and t == 1
            tn += (not pred) and t == 0
        pos, neg = probs[targets[:, c] == 1, c], probs[targets[:, c] == 0, c]
        # AUROC = probability a positive outranks a negative (ties count half)
        auroc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
        out.append(
            dict(
                tp=tp,
                fp=fp,
                fn=fn,
                tn=tn,
                precision=tp / (tp + fp),
                recall=tp / (tp + fn),
                specificity=tn / (tn + fp),
                f1=2 * tp / (2 * tp + fp + fn),
                auroc=auroc,
            )
        )
    return out


def test_metrics_equal_direct_computation():
    names = ["COVID-19", "Pneumonia", "Normal"]
    metrics = compute_metrics(PROBS, TARGETS, names, 0.51)
    direct = _direct(PROBS, TARGETS, 0.51)
    for name, d in zip(names, direct, strict=True):
        m = metrics["classes"][name]
        for key in ("tp", "fp", "fn", "tn"):
            assert m[key] == d[key]
        for key in ("precision", "recall", "specificity", "f1", "auroc"):
            assert m[key] == pytest.approx(d[key], abs=1e-6), key
    tp, fp, fn = (sum(d[k] for d in direct) for k in ("tp", "fp", "fn"))
    assert metrics["micro"]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics["macro"]["f1"] == pytest.approx(np.mean([d["f1"] for d in direct]))


def test_per_class_thresholds_and_sources():
    names = ["a", "b", "c"]
    thresholds = best_f1_thresholds(PROBS, TARGETS)
    tuned = compute_metrics(PROBS, TARGETS, names, thresholds)
    fixed = compute_metrics(PROBS, TARGETS, names, 0.5)
    for n in names:
        assert tuned["classes"][n]["f1"] >= fixed["classes"][n]["f1"]
    sources = np.array(["x"] * 120 + ["y"] * 80)
    by_source = metrics_by_source(PROBS, TARGETS, sources, names, 0.5)
    assert by_source["x"]["n_images"] == 120
    assert (
        by_source["y"]["classes"]["a"]["tp"]
        == compute_metrics(PROBS[120:], TARGETS[120:], names, 0.5)["classes"]["a"]["tp"]
    )


def test_soft_and_majority_votes():
    probs = np.array([[[0.9, 0.2]], [[0.6, 0.45]], [[0.1, 0.45]]])  # 3 models, 1 image, 2 classes
    thresholds = np.full((3, 2), 0.51)
    soft, soft_threshold = combine(probs, "soft", thresholds)
    assert soft == pytest.approx(np.array([[1.6 / 3, 1.1 / 3]]))
    assert (soft > soft_threshold).tolist() == [[True, False]]
    share, half = combine(probs, "majority", thresholds)
    assert share.tolist() == [[2 / 3, 0.0]] and half == 0.5
    # a class two of three models call positive wins the vote even if the mean is low
    probs = np.array([[[0.52]], [[0.53]], [[0.0]]])
    soft, t = combine(probs, "soft", np.full((3, 1), 0.51))
    share, half = combine(probs, "majority", np.full((3, 1), 0.51))
    assert not soft[0, 0] > t[0] and share[0, 0] > half
