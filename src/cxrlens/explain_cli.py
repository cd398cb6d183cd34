"""Glue for ``cxrlens explain``: gather images from files, folders or a manifest split, load runs,
choose targets, and call ``cxrlens.explain.explain_images`` once per input size, as an
:class:`~cxrlens.explain.config.ExplainConfig` says."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

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


def _input_files(config: ExplainConfig, run: LoadedRun) -> list[Path]:
    if config.images:
        return _image_files(config.images)
    manifest = load_manifest(config.data, run.taxonomy).split(config.split)
    return [Path(p) for p in manifest.frame["path"].head(config.max_images)]


def explain_runs(config: ExplainConfig, progress: bool = True) -> dict:
    """Explain image files (or the first ``max_images`` of a data split) with every run; returns the summary
    and saves ``config`` as config.json in ``config.out`` once everything is written."""
    from cxrlens.explain import explain_images

    runs: list[LoadedRun] = [load_run(r) for r in config.runs]
    classes = runs[0].taxonomy.classes
    if any(r.taxonomy.classes != classes for r in runs):
        raise CxrlensError("runs of different taxonomies cannot be explained together")
    files = _input_files(config, runs[0])
    ids = [f.stem for f in files]
    summary: dict = {"images": ids, "models": {}}
    sizes = sorted({r.config.image_size for r in runs})
    names = unique_names(r.name for r in runs)  # two runs may share a folder name
    for size in sizes:  # models trained at one size are explained together, in one grid
        group = [(name, r) for name, r in zip(names, runs, strict=True) if r.config.image_size == size]
        batch = torch.stack([load_image_tensor(f, size) for f in files])
        chosen = _targets(config.targets, [r for _, r in group], batch, classes)
        part = explain_images(
            {name: r.model for name, r in group}, batch, classes, config.methods, chosen,
            Path(config.out) if len(sizes) == 1 else Path(config.out) / f"{size}px",
            image_ids=ids, settings=config.settings, progress=progress,
            architectures={name: r.config.model for name, r in group},
        )
        summary["models"].update(part["models"])
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
