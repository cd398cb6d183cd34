"""Explaining a whole data set: images in fixed-size chunks, shared out between processes, written chunk
by chunk to a sink (the float16 map store of :mod:`cxrlens.explain.store`, or scorecard metrics computed
on the fly), and resumable after a kill.

A chunk is the unit of everything: chunk ``k`` holds images ``k*C .. k*C+C-1`` of the list whatever the
number of processes, process ``r`` of ``N`` takes every ``N``-th chunk not yet done, and each chunk is
explained in exactly the batches a single process uses. So the maps of an image are the same bits on one
or many processes, and a restarted run (``--resume``) continues with the chunks that have no index file.

Targets per image: ``all`` classes, named classes, ``true`` (the image's labels) or ``positive`` (the
classes the soft vote of the models predicts at 0.51, else the most probable one). A chunk is explained
for the union of its images' classes; the sink keeps the (image, class) pairs asked for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from cxrlens import distributed
from cxrlens.data import Preprocess, load_image_tensor
from cxrlens.errors import CxrlensError
from cxrlens.explain.config import ExplainSettings
from cxrlens.explain.methods import attribute, describe_params, get_method
from cxrlens.explain.report import _safe
from cxrlens.explain.rewrite import make_explainable
from cxrlens.explain.store import (
    DTYPE,
    FORMAT,
    INDEX_COLUMNS,
    INDEX_FILE,
    done_chunks,
    map_file,
    merge_chunks,
    prepare_folder,
    save_array,
    start_store,
    write_chunk_index,
)
from cxrlens.io import write_json
from cxrlens.runs import atomic_write_text

POSITIVE = 0.51  # the study's threshold for the soft vote


@dataclass
class ChunkMaps:
    """One model x method over one chunk: what a sink receives."""

    chunk: int
    positions: np.ndarray  # [B] positions of the chunk's images in the whole list
    model: str
    method: str
    network: nn.Module  # the model the maps came from (its explainable copy where the method needs one)
    images: torch.Tensor  # [B, 3, H, W] on the model's device
    maps: torch.Tensor | None  # [B, T, H, W] float32 on the CPU; None when the method failed (``error``)
    targets: list[int]  # class index of each of the T maps
    chosen: np.ndarray  # [B, T] bool: the (image, class) pairs asked for
    probs: np.ndarray  # [B, classes] the model's sigmoid outputs
    params: dict[str, Any]  # the method's parameters
    delta: np.ndarray | None = None  # [B, T] convergence deltas (IG, DeepLIFT)
    error: str | None = None


class Sink(Protocol):
    """Where chunks go. ``kind`` names the output; ``folder`` the subfolder whose files mark chunks done."""

    kind: str
    marker: str

    def settings(self) -> dict[str, Any]: ...  # what the results depend on, beside the plan (resume checks it)

    def model_done(self, chunk: int, model: str, items: list[ChunkMaps]) -> None: ...

    def commit(self, chunk: int) -> None: ...

    def finish(self, chunks: int) -> dict[str, Any]: ...  # process 0, when every chunk is done


@dataclass
class DatasetJob:
    """What to explain: images (ids, paths, labels), models, methods, targets, settings, output folder."""

    ids: list[str]
    paths: list[str]
    labels: np.ndarray | None  # [N, classes] 0/1, for targets "true"
    classes: list[str]
    models: dict[str, Any]  # name -> LoadedRun
    methods: dict[str, dict[str, Any]]
    targets: str
    settings: ExplainSettings
    chunk_size: int
    out: Path

    @property
    def chunks(self) -> int:
        return -(-len(self.ids) // self.chunk_size)

    def positions(self, chunk: int) -> np.ndarray:
        return np.arange(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, len(self.ids)))

    def plan(self, sink: Sink) -> dict[str, Any]:
        """What the results depend on (saved as store.json; a resume must match it)."""
        weights = {name: _file_digest(Path(run.run_dir) / "best.safetensors") for name, run in self.models.items()}
        listing = hashlib.sha256(json.dumps([self.ids, self.paths]).encode()).hexdigest()
        return {
            "format": FORMAT,
            "kind": sink.kind,
            "images": len(self.ids),
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "classes": self.classes,
            "targets": self.targets,
            "models": {n: {"run": str(r.run_dir), "image_size": r.config.image_size} for n, r in self.models.items()},
            "methods": {m: describe_params(get_method(m).resolve(dict(p))) for m, p in self.methods.items()},
            "output": self.settings.output,
            "max_batch": self.settings.max_batch,
            **sink.settings(),
            "fingerprint": hashlib.sha256(f"{listing} {json.dumps(weights, sort_keys=True)}".encode()).hexdigest(),
        }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- one chunk ---------------------------------------------------------------------------------------


def _chunk_targets(job: DatasetJob, positions: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    """[B, classes] bool: the classes asked for per image."""
    b, k = len(positions), len(job.classes)
    if job.targets == "all":
        return np.ones((b, k), dtype=bool)
    if job.targets == "true":
        return job.labels[positions] > 0.5
    if job.targets == "positive":
        vote = np.mean(probs, axis=0)
        chosen = vote > POSITIVE
        chosen[np.arange(b), vote.argmax(1)] |= ~chosen.any(1)  # nothing predicted: the most probable class
        return chosen
    names = [t.strip() for t in job.targets.split(",") if t.strip()]
    return np.broadcast_to(np.isin(job.classes, names), (b, k)).copy()


@dataclass
class _Model:
    name: str
    model: nn.Module
    explainable: nn.Module | None
    rewrite_error: str | None
    preprocess: Preprocess


def _prepare_models(job: DatasetJob) -> list[_Model]:
    """Each model on this process's device, with one explainable copy if a method needs it."""
    dev = distributed.device()
    needs = any(get_method(m).needs_rewrite(p) for m, p in job.methods.items())
    out = []
    for name, run in job.models.items():
        model = run.model.to(dev).eval()
        preprocess = run.config.preprocess
        explainable, error = None, None
        if needs:
            try:  # the first image as the example: the same on every process
                explainable = make_explainable(model, load_image_tensor(job.paths[0], preprocess)[None].to(dev))
            except CxrlensError as exc:
                error = str(exc)
        out.append(_Model(name, model, explainable, error, preprocess))
    return out


def _explain_chunk(job: DatasetJob, chunk: int, models: list[_Model], sink: Sink) -> None:
    positions = job.positions(chunk)
    dev = distributed.device()
    images = {p: torch.stack([load_image_tensor(job.paths[i], p) for i in positions]).to(dev)
              for p in dict.fromkeys(m.preprocess for m in models)}
    with torch.inference_mode():
        probs = [torch.sigmoid(torch.cat([m.model(x) for x in images[m.preprocess].split(job.settings.max_batch)]))
                 .float().cpu().numpy() for m in models]
    wanted = _chunk_targets(job, positions, probs)
    targets = [c for c in range(len(job.classes)) if wanted[:, c].any()]
    s = job.settings
    for m, p in zip(models, probs, strict=True):
        items = []
        for method, params in job.methods.items():
            item = ChunkMaps(chunk, positions, m.name, method, m.model, images[m.preprocess], None, targets,
                             wanted[:, targets], p, params)
            if targets and get_method(method).needs_rewrite(params) and m.explainable is None:
                item.error = m.rewrite_error
            elif targets:
                item.network = m.explainable if get_method(method).needs_rewrite(params) else m.model
                try:
                    result = attribute(item.network, item.images, targets, method=method, output=s.output,
                                       max_batch=s.max_batch, channels_last=s.channels_last,
                                       autocast_bf16=s.autocast_bf16, model_name=job.models[m.name].config.model,
                                       **params)
                    item.maps = result.maps.detach().float().cpu()
                    item.delta = result.delta.detach().cpu().numpy() if result.delta is not None else None
                except CxrlensError as exc:  # e.g. a layer this model lacks: recorded, the others still run
                    item.error = str(exc)
            items.append(item)
        sink.model_done(chunk, m.name, items)
    sink.commit(chunk)


# --- the whole data set ----------------------------------------------------------------------------


def explain_dataset(job: DatasetJob, sink: Sink, *, resume: bool = False, progress: bool = True,
                    stop_after: int | None = None) -> dict[str, Any] | None:
    """Explain every chunk of ``job`` not yet done into ``sink``, on this process's share of the chunks.

    ``resume``: continue a store of the same plan in ``job.out`` (else an existing one is an error);
    ``stop_after``: stop after this many chunks of this process (a time-boxed slice of a long job; run
    again with ``resume`` for the rest). Returns, on process 0, what the sink's ``finish`` reports (with
    ``complete``: whether every chunk is done), and None on the others.
    """
    plan = job.plan(sink)
    done = prepare_folder(job.out, plan, resume)  # every process reads before process 0 writes
    distributed.same_everywhere(plan["fingerprint"], "image list or model weights")
    distributed.barrier()
    if distributed.is_main():
        _check_disk(job, sink, len(done))
        start_store(job.out, plan, pd.DataFrame({"position": range(len(job.ids)), "image": job.ids,
                                                 "path": job.paths}))
    done = set(distributed.gather(sorted(done))[0])  # process 0's view, so that the shares agree
    distributed.barrier()
    todo = [k for k in range(job.chunks) if k not in done]
    mine = todo[distributed.rank()::distributed.world_size()][:stop_after]
    models = _prepare_models(job) if mine else []
    label = f"explain ({distributed.world_size()} processes)" if distributed.active() else "explain"
    for chunk in tqdm(mine, desc=label, unit="chunk", disable=not (progress and distributed.is_main())):
        _explain_chunk(job, chunk, models, sink)
    distributed.barrier()
    if not distributed.is_main():
        return None
    finished = done_chunks(job.out, sink.marker)
    complete = finished >= set(range(job.chunks))
    report = sink.finish(job.chunks) if complete else {}
    return {"complete": complete, "chunks": job.chunks, "chunks_done": len(finished), "images": len(job.ids),
            "models": list(job.models), "store": str(job.out), **report}


def _check_disk(job: DatasetJob, sink: Sink, done: int) -> None:
    """Refuse to start what cannot fit: the maps still to write, at most, against the free space."""
    per_image = getattr(sink, "bytes_per_image", lambda: 0)()
    need = per_image * max(0, len(job.ids) - done * job.chunk_size)
    existing = next(p for p in (job.out, *job.out.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise CxrlensError(
            f"the maps would take up to {_size(need)} but {job.out} has {_size(free)} free; free some space, "
            "choose another --out, explain fewer methods or classes, or use --metrics-only (no maps kept)"
        )


def _size(count: int) -> str:
    for unit, step in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= step:
            return f"{count / step:.1f} {unit}"
    return f"{count} bytes"


# --- the map store as a sink -----------------------------------------------------------------------


class MapSink:
    """Writes maps as float16 chunk files with their index (see :mod:`cxrlens.explain.store`).

    Each map is stored divided by its largest absolute value, with that value in the index's ``scale``
    column: float16 then keeps three significant digits of every map, however small its values
    (gradients of a sigmoid are often below float16's smallest normal number, 6e-5)."""

    kind = "maps"
    marker = "index"

    def __init__(self, job: DatasetJob):
        self.job = job
        self.pending: dict[int, list[dict]] = {}

    def settings(self) -> dict[str, Any]:
        return {"dtype": np.dtype(DTYPE).name}

    def bytes_per_image(self) -> int:
        per_model = [r.config.image_size ** 2 for r in self.job.models.values()]
        return sum(per_model) * len(self.job.methods) * len(self.job.classes) * np.dtype(DTYPE).itemsize

    def model_done(self, chunk: int, model: str, items: list[ChunkMaps]) -> None:
        arrays, rows = [], self.pending.setdefault(chunk, [])
        file = map_file(_safe(model), chunk)
        for b, position in enumerate(items[0].positions):
            for item in items:
                for t, c in enumerate(item.targets):
                    if not item.chosen[b, t]:
                        continue
                    row = {"position": int(position), "image": self.job.ids[position], "model": model,
                           "method": item.method, "class": self.job.classes[c], "file": "", "row": -1,
                           "probability": float(item.probs[b, c]), "scale": np.nan,
                           "delta": float(item.delta[b, t]) if item.delta is not None else np.nan,
                           "error": item.error or ""}
                    if item.maps is not None:
                        values = item.maps[b, t].numpy()
                        scale = float(np.abs(values).max())
                        arrays.append((values / scale if scale > 0 else values).astype(DTYPE))
                        row.update(file=file, row=len(arrays) - 1, scale=scale)
                    rows.append(row)
        if arrays:
            save_array(self.job.out / file, np.stack(arrays))

    def commit(self, chunk: int) -> None:
        rows = pd.DataFrame(self.pending.pop(chunk, []), columns=list(INDEX_COLUMNS))
        write_chunk_index(self.job.out, chunk, rows)

    def finish(self, chunks: int) -> dict[str, Any]:
        index = merge_chunks(self.job.out, chunks)
        path = self.job.out / INDEX_FILE
        atomic_write_text(path, index.to_csv(index=False, float_format="%.7g"))
        size = sum(f.stat().st_size for f in (self.job.out / "maps").rglob("*.npy"))
        summary = {"rows": len(index), "maps_bytes": size, "errors": int((index["error"].fillna("") != "").sum()),
                   "index": str(path)}
        write_json(self.job.out / "summary.json", {**summary, "classes": self.job.classes,
                                                   "methods": list(self.job.methods)})
        return summary

