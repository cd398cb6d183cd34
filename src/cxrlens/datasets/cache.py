"""A preprocessed image cache on disk: decoded, clipped, resized and padded once, then memory-mapped.

Decoding a PNG/JPEG/DICOM and resizing it costs milliseconds of CPU per image; a GPU trains on hundreds
of images in that time. :class:`ImageCache` stores each image as the model input at uint8 precision
(``size x size`` bytes: 50 kB at 224 px) in append-only shards (``shard-NNNN.u8``, numpy memmaps) with
an index (``index.csv``: path, file size, mtime, shard, slot). Reading an image is then a page of memory.

The cache folder is keyed on the preprocessing settings (every field of :class:`cxrlens.data.Preprocess`
and a format version): other settings get another folder, so a cache is never reused for settings it was
not built with. An image whose file changed (size or mtime) since it was cached is decoded again. Builds
take a lock file, so processes of one DDP run share one build. uint8 rounds intensities to 1/255 (the
float path keeps them to float16 in memory): a run trained with a cache is not bit-identical to one
without, so ``--cache`` is part of a run's settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrlens.errors import CxrlensError

CACHE_VERSION = 1
INDEX_COLUMNS = ["path", "bytes", "mtime_ns", "shard", "slot"]


def settings_key(preprocess) -> tuple[dict, str]:
    """The preprocessing settings (and the cache version) and their short hash: the cache folder's name."""
    settings = {**asdict(preprocess), "version": CACHE_VERSION, "dtype": "uint8"}
    if settings["fit"] == "pad":  # the study's fit keeps the name caches had before crop existed
        del settings["fit"]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return settings, f"{preprocess.size}px-{digest}"


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


class ImageCache:
    """Preprocessed images of one set of preprocessing settings below ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | Path, preprocess):
        self.preprocess = preprocess
        self.settings, key = settings_key(preprocess)
        self.dir = Path(folder) / key
        self.size = preprocess.size
        self.index = self._read_index()
        self._maps: dict[int, np.memmap] = {}

    # --- the index and the shards ---------------------------------------------------------------

    def _read_index(self) -> pd.DataFrame:
        settings_file, index_file = self.dir / "settings.json", self.dir / "index.csv"
        if not index_file.is_file():
            return pd.DataFrame(columns=INDEX_COLUMNS)
        try:
            if json.loads(settings_file.read_text()) != self.settings:
                return pd.DataFrame(columns=INDEX_COLUMNS)  # another version wrote it: rebuilt
            return pd.read_csv(index_file, dtype={"path": str}, keep_default_na=False).set_index("path", drop=False)
        except (OSError, ValueError) as exc:
            raise CxrlensError(f"cannot read the image cache {self.dir}: {exc}; delete the folder to rebuild it"
                               ) from None

    def _shard(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            path = self.dir / f"shard-{shard:04d}.u8"
            count = path.stat().st_size // (self.size * self.size)
            self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, self.size, self.size))
        return self._maps[shard]

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_maps": {}}

    @contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def stale(self, paths: Sequence[str]) -> list[str]:
        """The paths not cached, or cached from a file that has changed since."""
        unique = list(dict.fromkeys(paths))
        cached = self.index.reindex(unique)
        out = []
        for path, size, mtime in zip(unique, cached["bytes"], cached["mtime_ns"], strict=True):
            if size != size or (int(size), int(mtime)) != _stamp(path):  # NaN: not cached
                out.append(path)
        return out

    def build(self, paths: Sequence[str], progress: bool = True) -> int:
        """Decode and store every image of ``paths`` not cached yet (one new shard); returns how many."""
        from tqdm.auto import tqdm

        from cxrlens.data import read_image
        from cxrlens.runs import atomic_write_text

        with self._locked():
            self.index = self._read_index()  # another process may have built meanwhile
            todo = self.stale(paths)
            if not todo:
                return 0
            shard = int(self.index["shard"].max()) + 1 if len(self.index) else 0
            final = self.dir / f"shard-{shard:04d}.u8"
            partial = final.with_suffix(".u8.partial")
            data = np.memmap(partial, dtype=np.uint8, mode="w+", shape=(len(todo), self.size, self.size))
            stamps = []
            for slot, path in enumerate(tqdm(todo, desc="cache images", unit="img", disable=not progress or None)):
                stamps.append(_stamp(path))
                image = self.preprocess(read_image(path, self.preprocess.size))[0].numpy()
                data[slot] = np.rint(image * 255.0).astype(np.uint8)
            data.flush()
            del data
            os.replace(partial, final)
            added = pd.DataFrame({"path": todo, "bytes": [s for s, _ in stamps], "mtime_ns": [m for _, m in stamps],
                                  "shard": shard, "slot": np.arange(len(todo))})
            kept = self.index[~self.index["path"].isin(set(todo))]
            self.index = pd.concat([kept, added], ignore_index=True).set_index("path", drop=False)
            atomic_write_text(self.dir / "settings.json", json.dumps(self.settings, indent=2))
            atomic_write_text(self.dir / "index.csv", self.index[INDEX_COLUMNS].to_csv(index=False))
            return len(todo)

    # --- reading --------------------------------------------------------------------------------

    def __contains__(self, path: str) -> bool:
        return path in self.index.index

    def locate(self, paths: Sequence[str]) -> np.ndarray:
        """[n, 2] (shard, slot) of cached paths, found once (a dataset keeps them); an error for a path
        not cached (build first)."""
        where = self.index.reindex(list(paths))
        if where["shard"].isna().any():
            first = where.index[where["shard"].isna()][0]
            raise CxrlensError(f"{first} is not in the image cache {self.dir}; build the cache for these images first")
        return where[["shard", "slot"]].to_numpy(dtype=np.int64)

    def array(self, shard: int, slot: int) -> np.ndarray:
        """uint8 [size, size] of a cached image (a view of the memory map)."""
        return self._shard(shard)[slot]

    def tensor(self, shard: int, slot: int) -> torch.Tensor:
        """[1, size, size] float32 in [0, 1], as :class:`cxrlens.data.Preprocess` returns it."""
        return torch.from_numpy(self.array(shard, slot).astype(np.float32) / 255.0)[None]
