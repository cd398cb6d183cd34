"""Ensembles of trained runs: soft vote (mean of sigmoid outputs, what the study's code does) and
majority vote (a class is positive when more than half the models say so, as its abstract says)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrlens.errors import CxrlensError
from cxrlens.evaluate import STUDY_THRESHOLD, predict_manifest, resolve_threshold, write_evaluation

VOTES = ("soft", "majority")


def combine(probs: np.ndarray, vote: str, thresholds: np.ndarray) -> tuple[np.ndarray, float | np.ndarray]:
    """Combine per-model probabilities [models, n, classes] into ensemble scores and their threshold.

    soft: the mean probability, thresholded like a single model. majority: the share of models
    whose probability exceeds their own threshold, positive above one half (so its "probability"
    is the vote share, which still ranks images for AUROC).
    """
    if vote == "soft":
        return probs.mean(0), thresholds.mean(0)
    if vote == "majority":
        votes = probs > thresholds[:, None, :]
        return votes.mean(0), 0.5
    raise CxrlensError(f"unknown vote '{vote}'; choose one of: {', '.join(VOTES)}")


def ensemble_runs(
    run_dirs: Sequence[str | Path],
    votes: Sequence[str] = VOTES,
    data: str | Path | None = None,
    split: str | None = "test",
    threshold: str | float = STUDY_THRESHOLD,
    out: str | Path = "runs/ensemble",
    progress: bool = True,
    allow_leaks: bool = False,
) -> dict[str, dict]:
    """Evaluate the ensembles of ``run_dirs``; writes one folder per vote under ``out``. Images any of
    the runs was trained or validated on are refused unless ``allow_leaks`` (then recorded in each
    vote's metrics.json as ``leaks_allowed``)."""
    from cxrlens.audit import check_evaluation_data
    from cxrlens.data import load_manifest
    from cxrlens.runs import load_run

    if len(run_dirs) < 2:
        raise CxrlensError("an ensemble needs at least two runs (--runs RUN_DIR RUN_DIR ...)")
    runs = [load_run(r) for r in run_dirs]
    classes = runs[0].taxonomy.classes
    for run in runs[1:]:
        if run.taxonomy.classes != classes:
            raise CxrlensError(
                f"{run.run_dir} predicts {run.taxonomy.classes}, not {classes}; ensemble runs of one taxonomy"
            )
    options = None if data else runs[0].config.read_options
    manifest = load_manifest(data or runs[0].config.data or None, runs[0].taxonomy, options=options).split(split)
    leaks = list(dict.fromkeys(  # runs trained on the same data report the same leaks: once each
        leak for run in runs for leak in check_evaluation_data(run.config, manifest, allow_leaks, progress)))
    probs = np.stack([predict_manifest(run, manifest, progress=progress) for run in runs])
    thresholds = np.stack(
        [np.broadcast_to(resolve_threshold(threshold, r.thresholds, r.run_dir), (len(classes),)) for r in runs]
    )
    results = {}
    for vote in votes:
        scores, vote_threshold = combine(probs, vote, thresholds)
        title = f"{vote} vote of {len(runs)} models ({', '.join(r.config.model for r in runs)}) [{split or 'all'}]"
        results[vote] = write_evaluation(
            Path(out) / vote, title, scores, manifest.targets_or_nan(), manifest.frame, classes, vote_threshold,
            leaks_allowed=leaks,
        )
    return results
