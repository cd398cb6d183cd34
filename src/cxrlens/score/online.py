"""Scorecard metrics of a whole data set, computed chunk by chunk as it is explained, with no map kept:
``cxrlens explain --store --metrics-only``.

:class:`MetricSink` receives each chunk's maps from :func:`cxrlens.explain.dataset.explain_dataset` and
scores them with the scorecard's registered metrics exactly as :func:`cxrlens.score.run_scorecard` scores
a block (:func:`~cxrlens.score.scorecard.block_metrics`: same per-block random draws, same
randomisation and robustness subsets drawn over the whole image list), so a chunk of C images gives the
rows a scorecard with ``block_size`` C gives. It writes::

    out/metrics/chunk-000012.csv   one row per image x model x method x class of chunk 12 (marks it done)
    out/images.csv                 every row, in chunk order (when every chunk is done)
    out/scorecard.csv, .md         mean and bootstrap CI per model x method x class, as the scorecard's
    out/summary.json

Localisation metrics need masks: images of the data set that a mask folder (``--masks``) holds, matched
by path, are scored against its masks; the others get NaN there and are scored on the metrics that run
the model (deletion / insertion, randomisation, robustness).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlens.data import Preprocess
from cxrlens.errors import CxrlensError
from cxrlens.explain.dataset import ChunkMaps, DatasetJob
from cxrlens.explain.store import merge_chunks, write_chunk_index
from cxrlens.io import write_json
from cxrlens.runs import atomic_write_text
from cxrlens.score import metrics as M
from cxrlens.score.config import ScoreConfig
from cxrlens.score.masks import MaskSet, load_mask_set
from cxrlens.score.scorecard import (
    AREAS,
    SCORING_MASKS,
    _explainer,
    _scoring_masks,
    _subset,
    block_metrics,
    block_seed,
    subset_positions,
    summarise,
    table_markdown,
)


def _score_config(job: DatasetJob, masks: str | None, settings: dict[str, Any]) -> ScoreConfig:
    fixed = {"methods", "method_params", "masks", "targets", "max_batch"}
    taken = sorted(set(settings) & fixed)
    if taken:
        raise CxrlensError(f"metric setting '{taken[0]}' comes from the explain options; leave it out")
    try:
        config = ScoreConfig(**settings, methods=list(job.methods), method_params=dict(job.methods), masks=masks,
                             max_batch=job.settings.max_batch)
    except TypeError as exc:
        raise CxrlensError(f"unknown metric setting: {exc}") from None
    config.check()
    return config


class MetricSink:
    """Scorecard metrics per chunk instead of maps (see the module docstring)."""

    kind = "metrics"
    marker = "metrics"

    def __init__(self, job: DatasetJob, masks: str | None = None, settings: dict[str, Any] | None = None):
        self.job = job
        self.config = _score_config(job, masks, dict(settings or {}))
        self.masks = masks
        candidates = (np.flatnonzero(job.labels.any(1)) if job.targets == "true" and job.labels is not None
                      else np.arange(len(job.ids)))
        self.subsets = {"sanity": _subset(candidates, self.config.sanity_images, self.config.seed),
                        "robustness": _subset(candidates, self.config.robustness_images, self.config.seed + 1)}
        self.pending: dict[int, list[pd.DataFrame]] = {}
        self._mask_sets: dict[Preprocess, tuple[MaskSet, dict, dict, dict[str, int]]] = {}

    def settings(self) -> dict[str, Any]:
        values = self.config.to_dict()
        return {"metrics": {k: v for k, v in values.items() if k not in ("progress", "method_params")}}

    def _masks(self, preprocess: Preprocess,
               positions: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """Masks [B, S, S] and mask areas [B] of a chunk's images (none where the mask folder lacks them)."""
        b, size = len(positions), preprocess.size
        if self.masks is None:
            return ({name: torch.zeros(b, size, size, dtype=torch.bool) for name in SCORING_MASKS},
                    {column: np.full(b, np.nan) for column in AREAS})
        if preprocess not in self._mask_sets:
            mask_set = load_mask_set(self.masks, preprocess)
            masks, areas = _scoring_masks(mask_set)
            rows = {path: i for i, path in enumerate(mask_set.frame["path"])}
            self._mask_sets[preprocess] = (mask_set, masks, areas, rows)
        _, masks, areas, rows = self._mask_sets[preprocess]
        found = [rows.get(str(Path(self.job.paths[p]).resolve())) for p in positions]
        out_masks = {name: torch.zeros(b, size, size, dtype=torch.bool) for name in masks}
        out_areas = {column: np.full(b, np.nan) for column in areas}
        for i, row in enumerate(found):
            if row is None:
                continue
            for name in masks:
                out_masks[name][i] = masks[name][row]
            for column in areas:
                out_areas[column][i] = areas[column][row]
        return out_masks, out_areas

    def model_done(self, chunk: int, model: str, items: list[ChunkMaps]) -> None:
        positions = items[0].positions
        masks, areas = self._masks(self.job.models[model].config.preprocess, positions)
        subsets = {name: subset_positions(members, positions) for name, members in self.subsets.items()}
        shared: dict[int, dict] = {}  # per network: the random-order AUCs every method shares
        architecture = self.job.models[model].config.model
        for item in items:
            if item.maps is None:
                continue  # the method failed on this model (no targets, or e.g. a missing layer)
            explain = _explainer(item.method, item.targets, item.params, self.config.max_batch, architecture)
            inputs = M.MetricInputs(item.network, explain, item.images, item.maps.to(item.images.device),
                                    item.targets, masks, subsets, self.config,
                                    model_shared=shared.setdefault(id(item.network), {}),
                                    draw_seed=block_seed(self.config.seed, chunk))
            values, _ = block_metrics(inputs)
            self.pending.setdefault(chunk, []).append(self._rows(item, values, areas))

    def _rows(self, item: ChunkMaps, values: dict[str, np.ndarray], areas: dict[str, np.ndarray]) -> pd.DataFrame:
        ii, tt = np.nonzero(item.chosen)
        classes = np.asarray(item.targets)[tt]
        return pd.DataFrame({
            "position": item.positions[ii],
            "image": np.asarray(self.job.ids)[item.positions[ii]],
            "model": item.model,
            "method": item.method,
            "class": np.asarray(self.job.classes)[classes],
            "probability": item.probs[ii, classes],
            "outside_lungs": 1 - values["lung_focus"][ii, tt],
            **{k: v[ii, tt] for k, v in values.items()},
            **{k: v[ii] for k, v in areas.items()},
        })

    def commit(self, chunk: int) -> None:
        parts = self.pending.pop(chunk, [])
        write_chunk_index(self.job.out, chunk, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(),
                          subfolder=self.marker)

    def finish(self, chunks: int) -> dict[str, Any]:
        out = self.job.out
        images = merge_chunks(out, chunks, self.marker)
        atomic_write_text(out / "images.csv", images.to_csv(index=False, float_format="%.7g"))
        table = summarise(images, self.config.bootstrap, self.config.seed) if len(images) else pd.DataFrame()
        atomic_write_text(out / "scorecard.csv", table.to_csv(index=False, float_format="%.5g"))
        if len(table):
            atomic_write_text(out / "scorecard.md", "# Interpretability scorecard\n\nMean [95 % bootstrap CI over "
                              "images].\n\n" + table_markdown(table))
        summary = {"rows": len(images), "scorecard": str(out / "scorecard.csv"), "images_csv": str(out / "images.csv")}
        write_json(out / "summary.json", {**summary, "classes": self.job.classes, "methods": list(self.job.methods),
                                          "masks": self.masks})
        return summary
