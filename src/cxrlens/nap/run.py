"""The NAP entry point: runs (or models) and a manifest in, files in a folder out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from cxrlens import distributed
from cxrlens.data import Preprocess
from cxrlens.errors import CxrlensError
from cxrlens.io import unique_names
from cxrlens.models import MODELS
from cxrlens.nap.config import NapConfig
from cxrlens.nap.files import write_outputs
from cxrlens.nap.groups import resolve_groups
from cxrlens.nap.profile import NapResult, compute_naps, resolve_layers


@dataclass
class _Entry:
    """One model to profile."""

    name: str
    model: nn.Module
    architecture: str | None  # registry name: default layers
    preprocess: Preprocess
    run_dir: str | None = None


def _collect_models(runs: Any, image_size: int | None, classes: Sequence[str]) -> list[_Entry]:
    """The models of LoadedRuns (each at its own size, unless ``image_size``) or of a mapping name -> model."""
    from cxrlens.runs import LoadedRun

    if isinstance(runs, LoadedRun):
        runs = [runs]
    if isinstance(runs, Mapping):
        out = []
        for name, model in runs.items():
            if not isinstance(model, nn.Module):
                raise CxrlensError(f"model '{name}' is a {type(model).__name__}, not a torch module")
            architecture = str(name) if str(name) in MODELS else None
            out.append(_Entry(str(name), model, architecture, Preprocess(image_size or 224)))
        return out
    runs = list(runs)
    for run in runs:
        if not isinstance(run, LoadedRun):
            raise CxrlensError(f"expected runs loaded with load_run, got {type(run).__name__}")
        if tuple(run.taxonomy.classes) != tuple(classes):
            raise CxrlensError(
                f"run {run.run_dir} predicts {', '.join(run.taxonomy.classes)} but the data's taxonomy has "
                f"{', '.join(classes)}; load the data with the run's taxonomy"
            )
    if not runs:
        raise CxrlensError("no runs given for NAPs")
    names = unique_names(run.name for run in runs)  # two runs may share a folder name
    return [_Entry(name, run.model, run.config.model,
                   replace(run.config.preprocess, size=image_size) if image_size else run.config.preprocess,
                   str(run.run_dir))
            for name, run in zip(names, runs, strict=True)]


def _profile(entries: list[_Entry], manifest: Any, classes: Sequence[str], config: NapConfig) -> dict[str, NapResult]:
    """One pass over the images per distinct preprocessing feeds every model that sees those inputs."""
    from torch.utils.data import DataLoader

    from cxrlens.data import XrayDataset

    results: dict[str, NapResult] = {}
    n, size_ = len(manifest), config.batch_size
    # the batches one process would see; each process takes its share of them, whole (see cxrlens.distributed)
    batches = [list(range(k * size_, min((k + 1) * size_, n))) for k in distributed.owned(-(-n // size_))]
    for preprocess in dict.fromkeys(e.preprocess for e in entries):
        members = [e for e in entries if e.preprocess == preprocess]
        dataset = XrayDataset(manifest, preprocess, cache=False)  # no cache: memory stays flat
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers)
        results.update(compute_naps(
            {e.name: e.model for e in members}, loader, classes, config,
            architectures={e.name: e.architecture for e in members if e.architecture is not None},
            total=sum(len(b) for b in batches), image_size=preprocess.size,
        ))
    return {e.name: results[e.name] for e in entries}  # keep the given order


def run_nap(runs: Any, manifest: Any, out_dir: str | Path, config: NapConfig | None = None) -> dict:
    """Neuron Activation Profiles of one or more models over a data set, written to ``out_dir``.

    Args:
        runs: a list of ``LoadedRun`` (from ``load_run``; each uses its own image size and
            architecture), or a mapping name -> ``nn.Module`` (a registry name such as "resnet18" gets
            that architecture's default layers; images are ``config.image_size`` px, default 224).
        manifest: the images (``load_manifest(...)``, e.g. ``.split("test")``); its taxonomy must be
            the runs' taxonomy.
        out_dir: folder for the outputs (created).
        config: layers, groups, gradient weighting, batch size, ... (:class:`NapConfig`). Unknown
            layer names and bad group expressions raise ``CxrlensError`` before any image is read.

    Writes (each atomically: temporary file + rename):
        ``nap_<model>.npz``: group NAPs, contrastive NAPs (float32, [groups, C, h, w] per layer, keys
        '<layer>/nap', '<layer>/contrastive'), dead maps, min/max, map statistics, distances,
        separation scores, mean inputs; ``nap_stats.json``: per model the group sizes, dead-map
        shares, top maps, group distance matrices and separation rankings;
        ``nap_<model>_<layer>.png`` (groups x top-10 maps), ``nap_<model>_inputs.png``,
        ``nap_dead_maps.png``; ``config.json``: the config, the runs and the data.

    Memory does not grow with the number of images. Under several processes (:func:`run_nap_job`,
    :mod:`cxrlens.distributed`) each profiles its share of the batches, the sums are added up and
    process 0 writes the files.

    Returns:
        {"out_dir": str, "files": [paths], "stats": the JSON dict, "results": {model: NapResult}};
        on processes other than 0: None.
    """
    config = config or NapConfig()
    config.check()
    classes = tuple(manifest.taxonomy.classes)
    if len(manifest) == 0:
        raise CxrlensError("the manifest holds no images; check the data folder and split")
    entries = _collect_models(runs, config.image_size, classes)
    resolve_groups(config.groups, classes)  # fail on a bad expression before any image is read
    for e in entries:  # and on a bad layer name
        resolve_layers(e.model, config.layers_for(e.name), e.architecture)
    distributed.same_everywhere(_fingerprint(manifest), "image list")
    out = Path(out_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    results = _profile(entries, manifest, classes, config)
    if not distributed.is_main():
        return None
    settings = {"runs": [e.run_dir or e.name for e in entries], "data": str(manifest.origin),
                "splits": sorted(set(manifest.frame["split"]) - {""}), "images": len(manifest)}
    stats = write_outputs(out, results, list(classes), config, settings)
    return {"out_dir": str(out), "files": stats["files"], "stats": stats, "results": results}


def _fingerprint(manifest: Any) -> str:
    return hashlib.sha256("\n".join(manifest.frame["path"].astype(str)).encode()).hexdigest()


@dataclass
class NapJob:
    """A NAP run by name only (run folders, data, split), so that every process can load it itself."""

    runs: list[str]
    out: str
    data: str | None = None  # default: the first run's data set
    split: str | None = "test"  # None: every image
    config: NapConfig = field(default_factory=NapConfig)


def run_nap_job(job: NapJob) -> dict | None:
    """Load the runs and the data of ``job`` and call :func:`run_nap` (what ``cxrlens nap`` launches on
    each process, models on that process's device)."""
    from cxrlens.data import load_manifest
    from cxrlens.runs import load_run

    runs = [load_run(r) for r in job.runs]
    if not runs:
        raise CxrlensError("give at least one run folder (--run RUN_DIR)")
    for run in runs:
        run.model.to(distributed.device())
    options = None if job.data else runs[0].config.read_options  # the run's own data, read as trained on
    manifest = load_manifest(job.data or runs[0].config.data or None, runs[0].taxonomy, options=options).split(
        job.split)
    return run_nap(runs, manifest, job.out, job.config)
