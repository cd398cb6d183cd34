"""What the web app computes, free of HTTP: safe decoding of uploads, predictions of every model and
both ensembles, explanation maps rendered as PNG overlays, and a data set's test split.

Everything here is synchronous; the app runs it in one worker thread (see :mod:`cxrlens.serve.jobs`).
"""

from __future__ import annotations

import base64
import io
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxrlens.data import MAX_PIXELS, Preprocess
from cxrlens.errors import CxrlensError
from cxrlens.io import unique_names

CLIP_PERCENTILE = 99.0  # heat maps: outliers above this percentile of |map| are clipped (the study clipped 1-2 %)
DEFAULT_METHOD = "grad_cam"


class RequestError(CxrlensError):
    """A user error with the HTTP status the app answers it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- uploads -------------------------------------------------------------------------------------


def sniff(data: bytes) -> str | None:
    """The image type from content, never from a file name: 'png', 'jpeg', 'dicom' or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def _declared_pixels(data: bytes, kind: str) -> int:
    """Pixels the header declares, read before any pixel is decoded (so a bomb costs nothing)."""
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for broken files
            raise RequestError(400, f"not a readable DICOM file: {type(exc).__name__}: {str(exc)[:120]}") from None
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if rows <= 0 or cols <= 0:
            raise RequestError(400, "DICOM file has no image (Rows/Columns missing)")
        return rows * cols * max(frames, 1)
    if kind == "png" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])  # IHDR follows the 8-byte signature
        return width * height
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            return img.size[0] * img.size[1]
    except Exception as exc:
        raise RequestError(400, f"not a readable {kind.upper()} image: {str(exc)[:120]}") from None


def decode_upload(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes of a PNG, JPEG or DICOM -> 2-D float32 raw intensities; RequestError (4xx) otherwise."""
    from cxrlens.data import read_image_bytes

    if not data:
        raise RequestError(400, f"{name}: the upload is empty; choose a PNG, JPEG or DICOM file")
    kind = sniff(data)
    if kind is None:
        raise RequestError(415, f"{name}: not a PNG, JPEG or DICOM image (judged by content); send one of those")
    pixels = _declared_pixels(data, kind)
    if pixels > max_pixels:
        raise RequestError(
            413, f"{name}: the image declares {pixels / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f}"
        )
    try:
        image = read_image_bytes(data, name)
    except CxrlensError as exc:  # PIL names the in-memory file object; the user needs no address
        raise RequestError(400, re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the upload", str(exc))) from None
    except Exception as exc:  # a decoder failing in an unforeseen way is still the file's fault
        raise RequestError(400, f"{name}: cannot decode the image ({type(exc).__name__})") from None
    if image.ndim != 2 or min(image.shape) < 8:
        raise RequestError(400, f"{name}: image too small or not 2-D ({list(image.shape)})")
    if not np.isfinite(image).all():
        raise RequestError(400, f"{name}: image has non-finite pixel values")
    return image


# --- images as PNG -------------------------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3|4] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def grey_png(tensor: torch.Tensor) -> bytes:
    """[1|3, H, W] in [0, 1] -> greyscale PNG (what the model saw)."""
    grey = tensor[0].clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return png_bytes(grey)


def display_png(pixels: np.ndarray, max_side: int = 512) -> bytes:
    """Raw intensities -> a contrast-stretched greyscale PNG, long side at most ``max_side``."""
    low, high = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1)
    img = Image.fromarray((scaled * 255).astype(np.uint8))
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return png_bytes(np.asarray(img))


def heatmap_rgba(attr: np.ndarray, signed: bool) -> np.ndarray:
    """A 2-D attribution map -> RGBA uint8, coloured like ``cxrlens.explain.figures.overlay`` (magma for
    unsigned maps, RdBu_r for signed ones, outliers clipped at the 99th percentile of |map|) but with
    opacity growing with |map|, so the browser can lay it over the X-ray with a slider."""
    from matplotlib import colormaps

    from cxrlens.explain.figures import normalise

    norm = normalise(attr, signed, CLIP_PERCENTILE)
    rgba = colormaps["RdBu_r"]((norm + 1) / 2) if signed else colormaps["magma"](norm)
    rgba[..., 3] = 0.15 + 0.85 * np.abs(norm)
    return (rgba * 255).round().astype(np.uint8)


# --- models --------------------------------------------------------------------------------------


def web_params(method: str, size: int) -> dict[str, Any]:
    """Method parameters that keep one explanation interactive (a few seconds on a CPU): each method's
    own interactive values (e.g. an occlusion window of an eighth of the image, 16 IG steps)."""
    from cxrlens.explain import get_method

    return get_method(method).interactive_params(size)


def describe_methods(size: int) -> list[dict[str, Any]]:
    """Every registered method for the front end's menu, with the parameters it may offer at ``size`` px."""
    from cxrlens.explain import METHODS

    return [
        {"name": m.name, "description": m.description, "signed": m.signed(), "cost": m.cost,
         "params": m.ui_params(size)}
        for m in METHODS.values()
    ]


@dataclass
class Member:
    """One loaded run in the app."""

    name: str
    run: Any  # cxrlens.runs.LoadedRun
    thresholds: np.ndarray  # [classes]
    explainable: torch.nn.Module | None = None  # rewritten copy, made on first use


class ModelBank:
    """The app's models: predictions of each and of both ensembles, and explanation maps."""

    def __init__(self, run_dirs: Sequence[str | Path], threshold: str | float = "study") -> None:
        from cxrlens.evaluate import STUDY_THRESHOLD, resolve_threshold
        from cxrlens.runs import load_run

        if not run_dirs:
            raise CxrlensError("give at least one run folder (--runs RUN_DIR ...)")
        runs = [load_run(r) for r in run_dirs]
        self.classes: tuple[str, ...] = runs[0].taxonomy.classes
        for run in runs[1:]:
            if run.taxonomy.classes != self.classes:
                raise CxrlensError(f"{run.run_dir} predicts {run.taxonomy.classes}, not {self.classes}")
        self.members: list[Member] = []
        for name, run in zip(unique_names(r.name for r in runs), runs, strict=True):
            value = STUDY_THRESHOLD if threshold == "study" else threshold
            t = np.broadcast_to(resolve_threshold(value, run.thresholds, run.run_dir), (len(self.classes),))
            self.members.append(Member(name, run, np.asarray(t, dtype=np.float64)))
        self.preprocesses = list(dict.fromkeys(m.run.config.preprocess for m in self.members))

    def info(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "model": m.run.config.model,
                "image_size": m.run.config.image_size,
                "thresholds": dict(zip(self.classes, m.thresholds.tolist(), strict=True)),
            }
            for m in self.members
        ]

    def preprocess(self, pixels: np.ndarray) -> dict[Preprocess, torch.Tensor]:
        """Raw intensities -> {preprocessing: [3, S, S] tensor} for every preprocessing the models need."""
        return {p: p(pixels).expand(3, -1, -1).contiguous() for p in self.preprocesses}

    def probabilities(self, images: dict[Preprocess, torch.Tensor]) -> np.ndarray:
        """[models, n, classes] sigmoid outputs for a batch {preprocessing: [n, 3, S, S]}."""
        from cxrlens.runs import predict

        return np.stack([predict(m.run.model, images[m.run.config.preprocess]).numpy() for m in self.members])

    def predictions(self, probs: np.ndarray) -> dict:
        """Per-model and ensemble predictions of ONE image from probs [models, classes]."""
        from cxrlens.ensemble import combine

        thresholds = np.stack([m.thresholds for m in self.members])
        models = []
        for m, p in zip(self.members, probs, strict=True):
            models.append(self._row(m.name, p, m.thresholds, f"{m.run.config.model}, {m.run.config.image_size} px"))
        soft, soft_t = combine(probs[:, None, :], "soft", thresholds)
        major, major_t = combine(probs[:, None, :], "majority", thresholds)
        n = len(self.members)
        ensembles = [
            self._row("soft vote", soft[0], np.broadcast_to(soft_t, (len(self.classes),)),
                      f"mean probability of {n} model(s), thresholded at the mean threshold"),
            self._row("majority vote", major[0], np.broadcast_to(major_t, (len(self.classes),)),
                      f"share of {n} model(s) voting positive; positive above one half"),
        ]
        return {"classes": list(self.classes), "models": models, "ensembles": ensembles}

    def _row(self, name: str, probs: np.ndarray, thresholds: np.ndarray, detail: str) -> dict:
        return {
            "name": name,
            "detail": detail,
            "probs": {c: round(float(p), 5) for c, p in zip(self.classes, probs, strict=True)},
            "positive": {c: bool(p > t) for c, p, t in zip(self.classes, probs, thresholds, strict=True)},
        }

    def predict_image(self, tensors: dict[Preprocess, torch.Tensor]) -> dict:
        probs = self.probabilities({s: t[None] for s, t in tensors.items()})[:, 0, :]
        return self.predictions(probs)

    def class_index(self, cls: str | int) -> int:
        if isinstance(cls, int) or (isinstance(cls, str) and cls.isdigit()):
            i = int(cls)
            if not 0 <= i < len(self.classes):
                raise RequestError(400, f"class index {i} out of range 0-{len(self.classes) - 1}")
            return i
        if cls not in self.classes:
            raise RequestError(400, f"unknown class '{cls}'; the classes are: {', '.join(self.classes)}")
        return self.classes.index(cls)

    def _explain_model(self, member: Member, method: str, params: dict[str, Any],
                       example: torch.Tensor) -> torch.nn.Module:
        from cxrlens.explain import get_method, make_explainable

        if not get_method(method).needs_rewrite(params):
            return member.run.model
        if member.explainable is None:  # rewriting costs a trace and an audit: do it once per model
            member.explainable = make_explainable(member.run.model, example)
        return member.explainable

    def describe(self, method: str, cls: str | int) -> dict:
        """What an explanation request asks for, checked before it is queued: RequestError 400 otherwise."""
        from cxrlens.explain import get_method

        try:
            spec = get_method(method)
        except CxrlensError as exc:
            raise RequestError(400, str(exc)) from None
        return {"method": spec.name, "description": spec.description, "cls": self.classes[self.class_index(cls)]}

    def explain(self, tensors: dict[Preprocess, torch.Tensor], method: str, cls: str | int,
                members: Sequence[str] | None = None, *, check: Callable[[], None] | None = None,
                on_map: Callable[[dict], None] | None = None) -> dict:
        """Heat maps of ``method`` for class ``cls`` by each model (or the named ones).

        check: called before every forward pass of every model (it raises to stop the work, e.g. when
        the client has gone); on_map: called with each model's map as soon as it is ready."""
        header = self.describe(method, cls)
        maps = []
        for m in (m for m in self.members if members is None or m.name in members):
            if check is not None:
                check()
            maps.append(self._explain_member(m, tensors, header, check))
            if on_map is not None:
                on_map(maps[-1])
        return {**header, "maps": maps}

    def _explain_member(self, member: Member, tensors: dict[Preprocess, torch.Tensor], header: dict,
                        check: Callable[[], None] | None) -> dict:
        from cxrlens.explain import attribute

        method, size = header["method"], member.run.config.image_size
        x = tensors[member.run.config.preprocess][None]
        params = web_params(method, size)
        model = self._explain_model(member, method, params, x)
        with _calling_before_forward(model, check):
            result = attribute(model, x, [self.classes.index(header["cls"])], method=method,
                               model_name=member.run.config.model, max_batch=16, **params)
        signed = bool(result.meta["signed"])
        attr = result.maps[0, 0].detach().float().numpy()
        return {
            "model": member.name,
            "arch": member.run.config.model,
            "xray": data_url(grey_png(tensors[member.run.config.preprocess])),
            "heatmap": data_url(png_bytes(heatmap_rgba(attr, signed))),
            "signed": signed,
            "score": float(result.scores[0, 0]) if result.scores is not None else None,
            "seconds": round(float(result.meta.get("seconds", 0.0)), 3),
            "params": {k: v for k, v in result.meta.get("params", {}).items() if v is not None},
        }


@contextmanager
def _calling_before_forward(model: torch.nn.Module, check: Callable[[], None] | None) -> Iterator[None]:
    """Run ``check`` before every forward pass of ``model``: the points between batches where long
    work (occlusion's windows, IG's steps) can stop, without the attribution code knowing about it."""
    if check is None:
        yield
        return
    handle = model.register_forward_pre_hook(lambda module, args: check())
    try:
        yield
    finally:
        handle.remove()


class ExplainProgress:
    """An explanation as it grows, model by model, with an estimate of the time left.

    The estimate uses each model's time for this method in earlier requests (``history``, shared by
    the app) and, for models not seen yet, the mean of those finished in this request."""

    def __init__(self, header: dict, models: Sequence[str], history: dict[tuple[str, str], float]) -> None:
        self.header, self.models, self.history = header, list(models), history
        self.maps: list[dict] = []
        self.started: float | None = None
        self._last: float | None = None

    def start(self) -> None:
        self.started = self._last = time.monotonic()

    def add(self, map_: dict) -> None:
        now = time.monotonic()
        self.history[(self.header["method"], map_["model"])] = now - (self._last or now)
        self._last = now
        self.maps.append(map_)

    def estimate(self) -> float | None:
        """Seconds until the last model is done, or None while nothing is known to estimate from."""
        if self.started is None or self._last is None:
            return None
        remaining = self.models[len(self.maps):]
        if not remaining:
            return 0.0
        done = [self.history[(self.header["method"], m["model"])] for m in self.maps]
        fallback = sum(done) / len(done) if done else None
        times = [self.history.get((self.header["method"], name), fallback) for name in remaining]
        if any(t is None for t in times):
            return None
        return max(sum(times) - (time.monotonic() - self._last), 0.0)

    def snapshot(self) -> dict:
        return {**self.header, "maps": list(self.maps), "models_total": len(self.models),
                "models_done": len(self.maps), "estimate_seconds": self.estimate()}


# --- a data set's test split ---------------------------------------------------------------------


class TestSplit:
    """The images the app may show from a data set: addressed by row index, never by path."""

    __test__ = False  # not a pytest class

    def __init__(self, data: str | Path, classes: Sequence[str], split: str = "test") -> None:
        from cxrlens.data import load_manifest
        from cxrlens.taxonomy import TAXONOMIES

        taxonomy = next((t for t in TAXONOMIES.values() if t.classes == tuple(classes)), None)
        if taxonomy is None:
            raise CxrlensError(f"no taxonomy has the classes {list(classes)}")
        manifest = load_manifest(data, taxonomy)
        self.manifest = manifest.split(split) if manifest.has_split else manifest
        self.split = split if manifest.has_split else "all"
        self.classes = tuple(classes)
        self.probs: np.ndarray | None = None  # [models, n, classes], filled on first use

    def __len__(self) -> int:
        return len(self.manifest)

    def check(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise RequestError(404, f"no image {index}; this split has images 0-{len(self) - 1}")
        return index

    def path(self, index: int) -> str:
        return str(self.manifest.frame["path"].iat[self.check(index)])

    def pixels(self, index: int) -> np.ndarray:
        from cxrlens.data import read_image

        return read_image(self.path(index))

    def label(self, index: int) -> str:
        """The most specific true class (first in model order): what a reader should look for."""
        row = self.manifest.targets[self.check(index)]
        return self.classes[int(np.argmax(row))] if row.any() else self.classes[0]

    def truth(self, index: int) -> dict[str, bool]:
        return {c: bool(v) for c, v in zip(self.classes, self.manifest.targets[self.check(index)], strict=True)}

    def compute_probs(self, bank: ModelBank, batch_size: int = 16) -> np.ndarray:
        """Every model's probabilities on the split; reuses ``RUN/eval-<split>/predictions.csv`` when it
        covers every image (same paths), so a browsed split costs nothing after ``cxrlens evaluate``."""
        if self.probs is not None:
            return self.probs
        import pandas as pd

        from cxrlens.data import XrayDataset

        paths = self.manifest.frame["path"].tolist()
        out = []
        for m in bank.members:
            cached = m.run.run_dir / f"eval-{self.split}" / "predictions.csv"
            probs = None
            if cached.is_file():
                frame = pd.read_csv(cached).drop_duplicates("path").set_index("path")
                columns = [f"prob:{c}" for c in self.classes]
                if set(columns) <= set(frame.columns) and set(paths) <= set(frame.index):
                    probs = frame.loc[paths, columns].to_numpy(dtype=np.float64)
            if probs is None:
                from cxrlens.runs import predict

                dataset = XrayDataset(self.manifest, m.run.config.preprocess, cache=False)
                chunks = []
                for start in range(0, len(dataset), batch_size):
                    batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
                    chunks.append(predict(m.run.model, batch).numpy())
                probs = np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)))
            out.append(probs)
        self.probs = np.stack(out)
        return self.probs

    def items(self, bank: ModelBank) -> list[dict]:
        """One summary per image: truth, soft-vote prediction, correctness (exact match of all classes)."""
        from cxrlens.ensemble import combine

        probs = self.compute_probs(bank)
        thresholds = np.stack([m.thresholds for m in bank.members])
        soft, soft_t = combine(probs, "soft", thresholds)
        predicted = soft > np.broadcast_to(soft_t, soft.shape[1:])
        truth = self.manifest.targets > 0.5
        per_model = probs > thresholds[:, None, :]
        frame = self.manifest.frame
        items = []
        for i in range(len(self)):
            items.append({
                "index": i,
                "label": self.label(i),
                "source": str(frame["source"].iat[i]),
                "truth": [c for c, t in zip(self.classes, truth[i], strict=True) if t],
                "predicted": [c for c, p in zip(self.classes, predicted[i], strict=True) if p],
                "probs": {c: round(float(p), 4) for c, p in zip(self.classes, soft[i], strict=True)},
                "correct": bool((predicted[i] == truth[i]).all()),
                "models_correct": {
                    m.name: bool((per_model[j, i] == truth[i]).all()) for j, m in enumerate(bank.members)
                },
            })
        return items


class LruCache:
    """A small thread-safe least-recently-used map (uploads and study tokens kept for follow-up requests)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return default

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
