"""Measured interpretability: a scorecard of models x attribution methods, and a shortcut detector.

* :mod:`~cxrlens.score.masks` — ``load_mask_set(folder, preprocess)``: images and radiologists' masks
  aligned with the model input, plus a derived ``outside_body`` mask.
* :mod:`~cxrlens.score.metrics` — batched metrics: lung focus / relevance mass accuracy
  (``mass_share``), ``relevance_rank_accuracy``, ``pointing_game``, deletion / insertion curves
  (``perturbation_curves``, ``faithfulness``), ``cascading_randomisation``, ``max_sensitivity``,
  ``spearman``, ``ssim``, ``bootstrap_ci``; and the registry of the scorecard's columns
  (``register_metric``, ``SCORECARD_METRICS``: each metric with its facts).
* :mod:`~cxrlens.score.shortcut` — per-source performance, a source-prediction probe on the
  penultimate features and a verdict per model written from the numbers.
* :mod:`~cxrlens.score.config` — ``ScoreConfig``, every setting of a scorecard.
* :mod:`~cxrlens.score.scorecard` — ``run_scorecard(runs, out_dir, ScoreConfig(...))``, the library
  entry that ``cxrlens score`` calls (images in blocks, shared out when several processes run).
* :mod:`~cxrlens.score.online` — ``MetricSink``: the scorecard's metrics of a whole data set, chunk
  by chunk as it is explained, without keeping maps (``cxrlens explain --metrics-only``).
"""

from cxrlens.score.config import ScoreConfig
from cxrlens.score.masks import MaskSet, load_mask_set
from cxrlens.score.metrics import (
    SCORECARD_METRICS,
    MetricInputs,
    ScorecardMetric,
    bootstrap_ci,
    cascading_randomisation,
    faithfulness,
    get_metric,
    mass_share,
    max_sensitivity,
    perturbation_curves,
    pointing_game,
    register_metric,
    relevance_rank_accuracy,
    spearman,
    ssim,
)
from cxrlens.score.scorecard import Scorecard, run_scorecard
from cxrlens.score.shortcut import model_verdict, source_probe

__all__ = [
    "SCORECARD_METRICS",
    "MaskSet",
    "MetricInputs",
    "ScoreConfig",
    "Scorecard",
    "ScorecardMetric",
    "bootstrap_ci",
    "cascading_randomisation",
    "faithfulness",
    "get_metric",
    "load_mask_set",
    "mass_share",
    "max_sensitivity",
    "model_verdict",
    "perturbation_curves",
    "pointing_game",
    "register_metric",
    "relevance_rank_accuracy",
    "run_scorecard",
    "source_probe",
    "spearman",
    "ssim",
]
