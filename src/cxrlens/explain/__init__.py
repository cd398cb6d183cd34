"""Local interpretability: attribution maps for the study's CNNs (and users' own models).

* :mod:`~cxrlens.explain.rewrite` — ``make_explainable(model, example)``: a copy whose
  nonlinearities are modules, each called once, with no in-place ops (needed by DeepLIFT and
  Guided Backprop), checked to compute the same outputs.
* :mod:`~cxrlens.explain.methods` — ``METHODS`` / ``attribute(model, images, targets, method=...)``
  returning an :class:`Attribution` (maps [B, T, H, W], convergence deltas, metadata).
* :mod:`~cxrlens.explain.figures` — overlays and grid figures.
* :mod:`~cxrlens.explain.report` — ``explain_images(...)`` writes maps, overlays, a grid figure
  and a JSON summary for a set of models and images.
* :mod:`~cxrlens.explain.config` — ``ExplainConfig`` (one explain job, saved as config.json) and
  ``ExplainSettings`` (how maps are computed and drawn).
* :mod:`~cxrlens.explain.job` — ``explain_runs(ExplainConfig)``: run folders and image files or a
  data split in, ``explain_images`` (or ``explain_dataset``) per input size (what the CLI calls).
* :mod:`~cxrlens.explain.dataset` — ``explain_dataset``: a whole data set in fixed chunks, shared
  between processes, resumable; :mod:`~cxrlens.explain.store` — the float16 map store it writes
  (``MapStore`` reads it back).

Extension point: ``register_method`` (see :mod:`~cxrlens.explain.methods`).
"""

from cxrlens.explain.config import ExplainConfig, ExplainSettings, parse_methods
from cxrlens.explain.figures import grid_figure, overlay
from cxrlens.explain.methods import (
    METHODS,
    Attribution,
    Method,
    MethodContext,
    MethodResult,
    UiParam,
    attribute,
    get_method,
    register_method,
)
from cxrlens.explain.report import explain_images
from cxrlens.explain.rewrite import RewriteError, find_hazards, is_explainable, make_explainable
from cxrlens.explain.store import MapStore

__all__ = [
    "METHODS",
    "Attribution",
    "ExplainConfig",
    "ExplainSettings",
    "MapStore",
    "Method",
    "MethodContext",
    "MethodResult",
    "RewriteError",
    "UiParam",
    "attribute",
    "explain_images",
    "find_hazards",
    "get_method",
    "grid_figure",
    "is_explainable",
    "make_explainable",
    "overlay",
    "parse_methods",
    "register_method",
]
