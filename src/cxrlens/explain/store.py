"""The map store: attribution maps of a whole data set, float16, in fixed-size chunks with an index.

Explaining hundreds of thousands of images cannot write one file per map (millions of small files) nor
keep float32 (twice the disk). ``cxrlens explain --store`` writes instead::

    out/store.json                       the plan: images, chunk size, models, methods, targets, a fingerprint
    out/images.csv                       position, image, path: the images in order (chunk k = rows k*C .. k*C+C-1)
    out/maps/<model>/chunk-000012.npy    float16 [rows, H, W]: every map of chunk 12 for that model
    out/index/chunk-000012.csv           one row per image x model x method x class of chunk 12
    out/index.csv                        every chunk's rows, in chunk order (when all chunks are done)

A chunk is written atomically: its ``.npy`` files first, then its index file, which marks it done, so a
run killed at any instant leaves whole chunks and a restart (``--resume``) skips them. Index columns:
``position`` (of the image in images.csv), ``image``, ``model``, ``method``, ``class``, ``file`` (relative
path of the chunk file), ``row`` (in it), ``scale`` (the map's largest absolute value: maps are stored
divided by it, so float16 keeps three significant digits of even the smallest gradients), ``probability``
(the model's sigmoid for that class), ``delta`` (convergence delta of IG / DeepLIFT, else empty) and
``error`` (why a method gave no map, else empty).

:class:`MapStore` reads a store back: its index, and any map as float32 (memory-mapped chunk files).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlens.errors import CxrlensError
from cxrlens.runs import atomic_write_bytes, atomic_write_text, remove_stale_temporaries

PLAN_FILE = "store.json"
IMAGES_FILE = "images.csv"
INDEX_FILE = "index.csv"
FORMAT = 1
DTYPE = np.float16  # 2 bytes a pixel: a 224 px map takes 98 kB; float16 keeps 3 significant digits
INDEX_COLUMNS = ("position", "image", "model", "method", "class", "file", "row", "scale", "probability", "delta",
                 "error")
_TEXT_COLUMNS = ("image", "model", "method", "class", "file", "error")


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


def map_file(model: str, chunk: int) -> str:
    """Path of a model's chunk file, relative to the store."""
    return f"maps/{model}/{chunk_name(chunk)}.npy"


def index_file(chunk: int) -> str:
    return f"index/{chunk_name(chunk)}.csv"


def save_array(path: Path, array: np.ndarray) -> None:
    """An .npy file written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def done_chunks(folder: str | Path, subfolder: str = "index") -> set[int]:
    """Chunks whose index (or metrics) file exists: the ones a restart skips."""
    found = set()
    for path in (Path(folder) / subfolder).glob("chunk-*.csv"):
        try:
            found.add(int(path.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return found


def prepare_folder(folder: Path, plan: dict[str, Any], resume: bool) -> set[int]:
    """Check ``folder`` can take a store of ``plan`` (a new one, or the same plan when resuming); the
    chunks already done. Writes nothing (every process calls it before the first one writes)."""
    path = folder / PLAN_FILE
    if not path.is_file():
        return set()
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CxrlensError(f"cannot read {path}: {exc}; delete the folder or choose another --out") from None
    done = done_chunks(folder) | done_chunks(folder, "metrics")
    if not resume:
        raise CxrlensError(
            f"{folder} already holds a store ({len(done)} of {saved.get('chunks', '?')} chunks done); "
            "pass --resume to continue it, or choose another --out"
        )
    changed = [k for k in plan if k != "fingerprint" and saved.get(k) != plan[k]]
    if changed or saved.get("fingerprint") != plan["fingerprint"]:
        what = ", ".join(changed) or "the image list"
        raise CxrlensError(
            f"{folder} holds a store of another job ({what} differ); resume with the options it was started "
            "with, or choose another --out"
        )
    return done


def start_store(folder: Path, plan: dict[str, Any], images: pd.DataFrame) -> None:
    """Write the plan and the image list (process 0, once), and drop temporaries a kill left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in [folder, folder / "index", folder / "metrics", *(folder / "maps").glob("*")]:
        if sub.is_dir():
            remove_stale_temporaries(sub)
    if not (folder / PLAN_FILE).is_file():
        atomic_write_text(folder / IMAGES_FILE, images.to_csv(index=False))
        atomic_write_text(folder / PLAN_FILE, json.dumps(plan, indent=1))


def write_chunk_index(folder: Path, chunk: int, rows: pd.DataFrame, subfolder: str = "index") -> None:
    """The chunk's rows; written last, it marks the chunk done."""
    atomic_write_text(folder / subfolder / f"{chunk_name(chunk)}.csv", rows.to_csv(index=False, float_format="%.7g"))


def read_rows(path: Path) -> pd.DataFrame:
    """An index (or metrics) CSV; names stay text (an image called 00012 is not the number 12)."""
    try:
        head = pd.read_csv(path, nrows=0).columns
    except pd.errors.EmptyDataError:  # a chunk with no rows (e.g. no image had a label to explain)
        return pd.DataFrame()
    text = [c for c in _TEXT_COLUMNS if c in head]
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(text, str))
    frame[text] = frame[text].fillna("")
    return frame


def merge_chunks(folder: Path, chunks: int, subfolder: str = "index") -> pd.DataFrame:
    """Every chunk's rows in chunk order."""
    parts = [read_rows(folder / subfolder / f"{chunk_name(k)}.csv") for k in range(chunks)]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(INDEX_COLUMNS))


class MapStore:
    """A map store read back: ``index`` (a DataFrame, one row per image x model x method x class),
    ``images``, ``plan`` and :meth:`map` / :meth:`maps` (float32 arrays)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / PLAN_FILE
        if not path.is_file():
            raise CxrlensError(
                f"{self.folder} is not a map store (no {PLAN_FILE}); write one with cxrlens explain --store")
        self.plan = json.loads(path.read_text())
        self.images = pd.read_csv(self.folder / IMAGES_FILE, keep_default_na=False, dtype={"image": str, "path": str})
        merged = self.folder / INDEX_FILE
        if merged.is_file():
            self.index = read_rows(merged)
        else:  # unfinished: the chunks done so far
            parts = [read_rows(self.folder / index_file(k)) for k in sorted(done_chunks(self.folder))]
            parts = [p for p in parts if len(p)]
            self.index = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(INDEX_COLUMNS))
        self._files: dict[str, np.ndarray] = {}

    @property
    def complete(self) -> bool:
        return (self.folder / INDEX_FILE).is_file()

    def _array(self, file: str) -> np.ndarray:
        if file not in self._files:
            self._files[file] = np.load(self.folder / file, mmap_mode="r")
        return self._files[file]

    def maps(self, rows: pd.DataFrame) -> np.ndarray:
        """float32 [len(rows), H, W] of index rows (all of one model, so of one size)."""
        if rows["file"].isna().any() or (rows["file"] == "").any():
            raise CxrlensError("some of these rows have no map (see their 'error' column)")
        stored = np.stack([self._array(f)[int(r)] for f, r in zip(rows["file"], rows["row"], strict=True)])
        return stored.astype(np.float32) * rows["scale"].to_numpy(np.float32)[:, None, None]

    def map(self, image: str, model: str, method: str, cls: str) -> np.ndarray:
        """One map, float32 [H, W]."""
        i = self.index
        rows = i[(i["image"] == image) & (i["model"] == model) & (i["method"] == method) & (i["class"] == cls)]
        if rows.empty:
            raise CxrlensError(f"{self.folder}: no map of image '{image}', model '{model}', method '{method}', "
                               f"class '{cls}'")
        return self.maps(rows.iloc[:1])[0]
