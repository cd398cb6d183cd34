"""An explain job: gather images from files, folders or a manifest split, load runs,
choose targets, and call ``cxrlens.explain.explain_images`` once per input size, as an
:class:`~cxrlens.explain.config.ExplainConfig` says."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cxrlens import distributed
from cxrlens.data import IMAGE_SUFFIXES, load_image_tensor, load_manifest
from cxrlens.errors import CxrlensError
from cxrlens.explain.config import ExplainConfig
from cxrlens.io import unique_names
from cxrlens.runs import LoadedRun, load_run, predict


def _image_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CxrlensError(f"{path}: no PNG, JPEG or DICOM files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CxrlensError(f"image not found: {path}")
    return files


def _inputs(config: ExplainConfig, run: LoadedRun) -> tuple[list[Path], np.ndarray | None]:
    """The image files, and their labels [N, classes] when they come from a data set."""
    if config.images:
        return _image_files(config.images), None
    manifest = load_manifest(config.data, run.taxonomy).split(config.split)
    if config.max_images is not None:
        manifest = manifest.select(np.arange(len(manifest)) < config.max_images)  # the first ones, in order
    return [Path(p) for p in manifest.frame["path"]], manifest.targets


def explain_runs(config: ExplainConfig, progress: bool = True, *, resume: bool = False,
                 stop_after: int | None = None) -> dict | None:
    """Explain image files (or the first ``max_images`` of a data split) with every run; returns the summary
    and saves ``config`` as config.json in ``config.out`` once everything is written.

    With ``config.store`` (data-set scale) the images go chunk by chunk to a map store (or, with
    ``metrics_only``, to scorecard metrics), on this process's share of the chunks when several run
    (:mod:`cxrlens.distributed`); ``resume`` continues a store, ``stop_after`` stops after that many
    chunks (see :func:`cxrlens.explain.dataset.explain_dataset`). Then the summary is returned on
    process 0 and None on the others."""
    from cxrlens.explain import explain_images

    runs: list[LoadedRun] = [load_run(r) for r in config.runs]
    classes = runs[0].taxonomy.classes
    if any(r.taxonomy.classes != classes for r in runs):
        raise CxrlensError("runs of different taxonomies cannot be explained together")
    if config.store:
        return _explain_store(config, runs, progress, resume, stop_after)
    if distributed.world_size() > 1:
        raise CxrlensError("several processes write a map store: add --store (or --metrics-only)")
    files, _ = _inputs(config, runs[0])
    ids = [f.stem for f in files]
    summary: dict = {"images": ids, "models": {}}
    preprocesses = sorted({r.config.preprocess for r in runs}, key=lambda p: (p.size, p.fit))
    names = unique_names(r.name for r in runs)  # two runs may share a folder name
    for preprocess in preprocesses:  # models that see the same input are explained together, in one grid
        group = [(name, r) for name, r in zip(names, runs, strict=True) if r.config.preprocess == preprocess]
        batch = torch.stack([load_image_tensor(f, preprocess) for f in files])
        chosen = _targets(config.targets, [r for _, r in group], batch, classes)
        part = explain_images(
            {name: r.model for name, r in group}, batch, classes, config.methods, chosen,
            Path(config.out) if len(preprocesses) == 1 else Path(config.out) / preprocess.label,
            image_ids=ids, settings=config.settings, progress=progress,
            architectures={name: r.config.model for name, r in group},
        )
        summary["models"].update(part["models"])
    config.save(config.out)
    return summary


def _explain_store(config: ExplainConfig, runs: list[LoadedRun], progress: bool, resume: bool,
                   stop_after: int | None) -> dict | None:
    from cxrlens.explain.dataset import DatasetJob, MapSink, explain_dataset
    from cxrlens.explain.report import _safe

    classes = list(runs[0].taxonomy.classes)
    if config.targets not in ("all", "positive", "true"):
        _targets(config.targets, runs, torch.empty(0), classes)  # unknown class names fail here
    files, labels = _inputs(config, runs[0])
    job = DatasetJob(
        ids=unique_names(_safe(f.stem) for f in files), paths=[str(f) for f in files], labels=labels,
        classes=classes, models=dict(zip(unique_names(r.name for r in runs), runs, strict=True)),
        methods=config.methods, targets=config.targets, settings=config.settings, chunk_size=config.chunk_size,
        out=Path(config.out),
    )
    if config.metrics_only:
        from cxrlens.score.online import MetricSink

        sink = MetricSink(job, config.masks, config.metrics)
    else:
        sink = MapSink(job)
    summary = explain_dataset(job, sink, resume=resume, progress=progress, stop_after=stop_after)
    if summary is not None and summary["complete"]:
        config.save(config.out)
    return summary


def _targets(targets: str, runs: list[LoadedRun], batch: torch.Tensor, classes: Sequence[str]) -> list[str]:
    if targets == "all":
        return list(classes)
    if targets == "positive":  # classes the soft vote calls positive for at least one image
        probs = torch.stack([predict(r.model, batch) for r in runs]).mean(0)
        positive = [c for i, c in enumerate(classes) if bool((probs[:, i] > 0.51).any())]
        return positive or [classes[int(probs.mean(0).argmax())]]
    names = [t.strip() for t in targets.split(",") if t.strip()]
    for name in names:
        if name not in classes:
            raise CxrlensError(f"unknown class '{name}'; the classes are: {', '.join(classes)}")
    return names
