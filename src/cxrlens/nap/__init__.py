"""Global interpretability: Neuron Activation Profiles (NAPs) over a whole data set.

A NAP of a group of images is the mean feature map of a layer over the group's images; the
contrastive NAP is the group NAP minus the (unweighted) mean of all group NAPs, so it shows what is
special about a group. Everything is computed in one streaming pass whose memory does not grow with
the number of images. Split by concern:

* :mod:`~cxrlens.nap.groups` — group expressions over class names (``"Pneumonia & ~COVID-19"``,
  ``pred:NAME``), parsed by a tiny parser (no ``eval``);
* :mod:`~cxrlens.nap.config` — ``NapConfig``, every setting of a NAP run;
* :mod:`~cxrlens.nap.profile` — the profiler: ``compute_naps`` (models + any iterable of batches ->
  ``NapResult`` objects), layers, dead maps, distances, separation;
* :mod:`~cxrlens.nap.figures` — the plots; :mod:`~cxrlens.nap.files` — arrays, JSON, figures on disk;
* :mod:`~cxrlens.nap.run` — ``run_nap`` (runs or models + a manifest -> files in a folder) and
  ``run_nap_job`` (the same by folder names, on one or several processes), what ``cxrlens nap`` launches.
"""

from cxrlens.nap.config import TOP_MAPS, NapConfig
from cxrlens.nap.figures import plot_dead_shares, plot_inputs, plot_layer_grid
from cxrlens.nap.files import dead_share_lines, result_arrays, result_stats
from cxrlens.nap.groups import (
    PRED_THRESHOLD,
    GroupExpr,
    GroupSpec,
    default_groups,
    error_groups,
    parse_group,
    resolve_groups,
)
from cxrlens.nap.profile import LayerNap, NapResult, compute_naps, resolve_layers
from cxrlens.nap.run import NapJob, run_nap, run_nap_job

__all__ = [
    "PRED_THRESHOLD",
    "TOP_MAPS",
    "GroupExpr",
    "GroupSpec",
    "LayerNap",
    "NapConfig",
    "NapJob",
    "NapResult",
    "compute_naps",
    "dead_share_lines",
    "default_groups",
    "error_groups",
    "parse_group",
    "plot_dead_shares",
    "plot_inputs",
    "plot_layer_grid",
    "resolve_groups",
    "resolve_layers",
    "result_arrays",
    "result_stats",
    "run_nap",
    "run_nap_job",
]
