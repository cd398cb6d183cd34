"""Data audit: what a manifest holds and what is wrong with it, before anything is trained or evaluated.

``audit_manifest(manifest)`` reads every image once and reports:

* images, patients and sources per split and class; image sizes and bit depths;
* missing and unreadable files;
* **leaks** (an error unless allowed): the same path, the same decoded pixels or the same patient
  (patient group) in two splits;
* **conflicts** (an error unless allowed): one image (path or pixels) with two different labels;
* duplicates within a split and **near-duplicates** (a 256-bit difference hash of a 17 x 16 thumbnail
  at Hamming distance <= 6, the rule data/cxr3 was de-duplicated with): reported, never refused,
  because follow-up films of one patient look alike too.

Reading the images is the slow part, so each file's facts (pixel hash, perceptual hash, size, depth)
are cached by path, size and modification time, in memory and in a SQLite file under the user's cache
folder (``$CXRLENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/cxrlens``, else ``~/.cache/cxrlens``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlens.data import Manifest, read_image
from cxrlens.errors import CxrlensError
from cxrlens.io import progress_bar

NEAR_DUPLICATE_BITS = 6  # Hamming distance of the 256-bit difference hashes (data/cxr3/README.md)
SHOWN = 3  # problems named in an error line; the rest are counted
CACHE_VERSION = 1
TRAIN_FIX = (
    "fix the manifest (`cxrlens split` splits by patient; `cxrlens check-data` lists every problem) "
    "or pass --allow-leaks to train anyway"
)
EVALUATE_FIX = "evaluate on images the run has not seen, or pass --allow-leaks to evaluate anyway"


@dataclass
class ImageFacts:
    """What the audit needs to know of one image file."""

    pixels: str = ""  # blake2b of the decoded pixels (shape and values): equal for re-encoded lossless copies
    dhash: str = ""  # 256-bit difference hash, hex
    width: int = 0
    height: int = 0
    depth: str = ""  # e.g. "8-bit grey", "16-bit grey", "8-bit colour", "DICOM 12-bit MONOCHROME2"
    error: str = ""  # why the file cannot be read; '' when it can


@dataclass
class DataAudit:
    """The findings of ``audit_manifest``; ``guard`` turns leaks and conflicts into an error."""

    origin: str
    images: int
    counts: dict  # split -> class -> {"images", "patients", "sources": {source: images}}
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    near_duplicates: list[str] = field(default_factory=list)
    near_duplicates_across_splits: int = 0
    sizes: dict = field(default_factory=dict)  # width/height -> min, median, max
    depths: dict = field(default_factory=dict)  # depth -> images
    fingerprint: str = ""  # of the rows' pixels, labels and splits: the same data wherever it lies
    notes: list[str] = field(default_factory=list)  # rows the reader left out (views, labels), by reason

    def guard(self, allow_leaks: bool = False, fix: str = TRAIN_FIX) -> list[str]:
        """Raise for unreadable images, and for leaks and conflicts unless ``allow_leaks`` (the error ends
        with ``fix``); return the leaks and conflicts that were let through (to be recorded)."""
        if self.unreadable:
            more = f" (and {len(self.unreadable) - 1} more unreadable files)" if len(self.unreadable) > 1 else ""
            raise CxrlensError(f"{self.unreadable[0]}{more}")
        problems = self.leaks + self.conflicts
        if problems and not allow_leaks:
            kinds = [f"{len(self.leaks)} leak(s) between splits"] if self.leaks else []
            kinds += [f"{len(self.conflicts)} image(s) with conflicting labels"] if self.conflicts else []
            shown = "; ".join(problems[:SHOWN]) + ("; ..." if len(problems) > SHOWN else "")
            raise CxrlensError(f"{self.origin}: {' and '.join(kinds)}: {shown}; {fix}")
        return problems

    def near_duplicate_note(self) -> str:
        return (
            f"{self.near_duplicates_across_splits} pair(s) of images in different splits look alike (possible "
            f"leaks, not refused): {'; '.join(self.near_duplicates[:2])}; `cxrlens check-data` lists them"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_markdown(self) -> str:
        return audit_markdown(self)


# --- per-image facts, cached ---------------------------------------------------------------------------


def _depth(path: Path) -> str:
    """Bit depth and colour of a file, from its header."""
    if path.suffix.lower() in {".dcm", ".dicom"}:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return f"DICOM {getattr(ds, 'BitsStored', '?')}-bit {getattr(ds, 'PhotometricInterpretation', '')}".strip()
    with Image.open(path) as img:
        if img.format == "DICOM":  # pragma: no cover - Pillow does not read DICOM
            return "DICOM"
        return {
            "1": "1-bit", "L": "8-bit grey", "LA": "8-bit grey + alpha", "P": "8-bit palette",
            "RGB": "8-bit colour", "RGBA": "8-bit colour + alpha", "I;16": "16-bit grey", "I;16B": "16-bit grey",
            "I;16L": "16-bit grey", "I": "32-bit grey", "F": "32-bit float grey",
        }.get(img.mode, img.mode)


def difference_hash(pixels: np.ndarray) -> str:
    """256-bit difference hash: is each pixel of a 17 x 16 thumbnail brighter than its right neighbour."""
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels.astype(np.float32) - low) / (high - low if high > low else 1.0)
    thumb = np.asarray(Image.fromarray(scaled, mode="F").resize((17, 16), Image.Resampling.BOX))
    return np.packbits(thumb[:, 1:] > thumb[:, :-1]).tobytes().hex()


def image_facts(path: str | Path) -> ImageFacts:
    """Read one image and describe it (never raises for a bad file: ``error`` says why)."""
    path = Path(path)
    try:
        pixels = read_image(path)
        depth = _depth(path)
    except CxrlensError as exc:
        return ImageFacts(error=str(exc))
    except Exception as exc:  # a header the decoder accepted but the depth reader did not
        return ImageFacts(error=f"cannot read image {path}: {type(exc).__name__}: {str(exc)[:120]}")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return ImageFacts(digest.hexdigest(), difference_hash(pixels), pixels.shape[1], pixels.shape[0], depth)


def cache_dir() -> Path:
    if os.environ.get("CXRLENS_CACHE_DIR"):
        return Path(os.environ["CXRLENS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrlens"


class FactsCache:
    """ImageFacts by (path, size, mtime): a dict in memory, backed by SQLite when the cache folder can be
    written (several processes may share it; SQLite serialises their writes)."""

    _memory: dict[tuple[str, int, int], ImageFacts] = {}

    def __init__(self, folder: Path | None = None):
        self.db, self.pending = None, 0
        try:
            folder = folder or cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(folder / f"image-facts-v{CACHE_VERSION}.sqlite", timeout=30)
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS facts (path TEXT, size INTEGER, mtime INTEGER, facts TEXT,"
                " PRIMARY KEY (path, size, mtime))"
            )
        except (OSError, sqlite3.Error):
            self.db = None  # no writable cache folder: audit without a disk cache

    def get(self, path: str) -> ImageFacts:
        try:
            stat = os.stat(path)
        except OSError:
            return image_facts(path)  # a file gone since the manifest was read: image_facts says so
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key in self._memory:
            return self._memory[key]
        facts = self._read(key)
        if facts is None:
            facts = image_facts(path)
            self._write(key, facts)
        self._memory[key] = facts
        return facts

    def _read(self, key) -> ImageFacts | None:
        if self.db is None:
            return None
        try:
            row = self.db.execute("SELECT facts FROM facts WHERE path=? AND size=? AND mtime=?", key).fetchone()
            return ImageFacts(**json.loads(row[0])) if row else None
        except (sqlite3.Error, ValueError, TypeError):
            return None

    def _write(self, key, facts: ImageFacts) -> None:
        if self.db is None:
            return
        try:
            self.db.execute("INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?)", (*key, json.dumps(asdict(facts))))
            self.pending += 1
            if self.pending >= 200:  # short transactions: other processes auditing the same files wait little
                self.db.commit()
                self.pending = 0
        except sqlite3.Error:
            self.db = None

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.commit()
            except sqlite3.Error:
                pass
            self.db.close()


def collect_facts(paths: list[str], progress: bool = True) -> list[ImageFacts]:
    cache = FactsCache()
    try:
        bar = progress_bar(paths, desc="audit images", unit="img", enabled=progress and len(paths) >= 500, leave=False)
        return [cache.get(p) for p in bar]  # (a bar for 500 images or more: a second or more)
    finally:
        cache.close()


# --- the audit ----------------------------------------------------------------------------------------


class _Rows:
    """Names of manifest rows for messages: 'row 12 (train)', or the path below the data folder."""

    def __init__(self, manifest: Manifest):
        frame = manifest.frame
        base = manifest.origin if manifest.origin.is_dir() else manifest.origin.parent
        rows = frame["_row"].to_numpy() if "_row" in frame else np.zeros(len(frame), dtype=int)
        self.split = frame["split"].replace("", "no split").to_numpy()
        self.path = [os.path.relpath(p, base) if p.startswith(str(base)) else p for p in frame["path"]]
        self.where = [f"row {r}" if r else self.path[i] for i, r in enumerate(rows)]
        names = manifest.taxonomy.classes
        self.label = ["+".join(n for n, v in zip(names, t, strict=True) if v) or "none" for t in manifest.targets]

    def at(self, i: int) -> str:
        return f"{self.where[i]} ({self.split[i]})"

    def labelled(self, i: int) -> str:
        return f"{self.where[i]} ({self.split[i]}, {self.label[i]})"


def _same_image_findings(groups: list[list[int]], rows: _Rows, what: str) -> tuple[list, list, list]:
    """Leaks, conflicts and duplicates among groups of rows that hold the same image."""
    leaks, conflicts, duplicates = [], [], []
    for members in groups:
        splits = {rows.split[i] for i in members}
        labels = {rows.label[i] for i in members}
        if len(labels) > 1:
            conflicts.append(f"{what} {', '.join(rows.labelled(i) for i in members)}")
        if len(splits) > 1:
            leaks.append(f"{what} {', '.join(rows.at(i) for i in members)}")
        elif len(labels) == 1:
            duplicates.append(f"{what} {', '.join(rows.at(i) for i in members)}")
    return leaks, conflicts, duplicates


def _groups(keys, valid=None) -> list[list[int]]:
    members: dict = defaultdict(list)
    for i, key in enumerate(keys):
        if key and (valid is None or valid[i]):
            members[key].append(i)
    return [m for m in members.values() if len(m) > 1]


def _patient_leaks(manifest: Manifest, rows: _Rows) -> list[str]:
    frame = manifest.frame
    real_ids = (frame["patient_group"] != frame["path"]).to_numpy()  # a group defaulted to the path is no patient
    leaks = []
    for members in _groups(frame["patient_group"].tolist(), real_ids):
        if len({rows.split[i] for i in members}) > 1:
            shown = ", ".join(rows.at(i) for i in members[:4]) + (", ..." if len(members) > 4 else "")
            leaks.append(f"patient '{frame['patient_group'].iat[members[0]]}' in {shown}")
    return leaks


def near_duplicate_pairs(hashes: list[str], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j whose hashes differ in at most ``max_bits`` bits; empty hashes never match.
    Compared in blocks of rows, so memory stays at block x n x 32 bytes."""
    valid = np.array([len(h) == 64 for h in hashes])
    index = np.flatnonzero(valid)
    if len(index) < 2:
        return []
    words = np.frombuffer(b"".join(bytes.fromhex(hashes[i]) for i in index), dtype=np.uint64).reshape(-1, 4)
    pairs = []
    for start in range(0, len(words), 256):
        block = words[start : start + 256]
        distance = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(-1)
        for a, b in zip(*np.nonzero(distance <= max_bits), strict=True):
            if start + a < b:
                pairs.append((int(index[start + a]), int(index[b]), int(distance[a, b])))
    return pairs


def _counts(manifest: Manifest) -> dict:
    frame, classes = manifest.frame, manifest.taxonomy.classes
    splits = frame["split"].replace("", "no split")
    counts: dict = {}
    for split in [*sorted(set(splits)), "all"]:
        in_split = (splits == split).to_numpy() if split != "all" else np.ones(len(frame), bool)
        counts[split] = {}
        for c, name in enumerate(classes):
            mask = in_split & (manifest.targets[:, c] > 0)
            counts[split][name] = {
                "images": int(mask.sum()),
                "patients": int(frame.loc[mask, "patient_group"].nunique()),
                "sources": {str(k): int(v) for k, v in Counter(frame.loc[mask, "source"]).most_common()},
            }
        counts[split]["total"] = {
            "images": int(in_split.sum()),
            "patients": int(frame.loc[in_split, "patient_group"].nunique()),
            "sources": {str(k): int(v) for k, v in Counter(frame.loc[in_split, "source"]).most_common()},
        }
    return counts


def audit_manifest(manifest: Manifest, progress: bool = True, patients: bool = True) -> DataAudit:
    """Read every image of ``manifest`` once and report what it holds and what is wrong with it.
    ``patients=False`` skips the patient check (for rows joined from data sets whose ids do not match)."""
    rows = _Rows(manifest)
    facts = collect_facts(manifest.frame["path"].tolist(), progress)
    readable = [not f.error for f in facts]
    audit = DataAudit(str(manifest.origin), len(manifest), _counts(manifest))
    audit.missing = [f"row {row}: {path}" for row, path in manifest.missing]
    audit.unreadable = [f.error for f in facts if f.error]
    by_path = _groups(manifest.frame["path"].tolist())
    leaks, conflicts, duplicates = _same_image_findings(by_path, rows, "the same file in")
    # the same pixels under different paths (one representative row per path)
    first_of_path = ~manifest.frame["path"].duplicated().to_numpy()
    by_pixels = _groups([f.pixels for f in facts], first_of_path & np.array(readable, bool))
    more = _same_image_findings(by_pixels, rows, "the same pixels in")
    leaks, conflicts, duplicates = leaks + more[0], conflicts + more[1], duplicates + more[2]
    audit.leaks = leaks + (_patient_leaks(manifest, rows) if patients else [])
    audit.conflicts, audit.duplicates = conflicts, duplicates
    hashes = [f.dhash if keep else "" for f, keep in zip(facts, first_of_path, strict=True)]
    groups = manifest.frame["patient_group"].to_numpy()
    across = []
    for i, j, bits in near_duplicate_pairs(hashes):
        if facts[i].pixels == facts[j].pixels or groups[i] == groups[j]:
            continue  # exact duplicates are reported above; one patient's films may look alike
        text = f"{rows.at(i)} and {rows.at(j)} look alike (hash distance {bits})"
        (across if rows.split[i] != rows.split[j] else audit.near_duplicates).append(text)
    audit.near_duplicates = across + audit.near_duplicates
    audit.near_duplicates_across_splits = len(across)
    rows_seen = sorted(zip(rows.split, rows.label, (f.pixels or f.error for f in facts), strict=True))
    audit.fingerprint = hashlib.sha256(json.dumps(rows_seen).encode()).hexdigest()
    good = [f for f in facts if not f.error]
    if good:
        for axis in ("width", "height"):
            values = np.array([getattr(f, axis) for f in good])
            audit.sizes[axis] = {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}
        audit.depths = dict(Counter(f.depth for f in good).most_common())
    return audit


def audit_data(data: str | Path | None = None, taxonomy: str = "cxr3", progress: bool = True,
               options=None) -> DataAudit:
    """The audit of a data set as `cxrlens check-data` prints it (missing files are listed, not refused);
    ``options``: how to read it (:class:`cxrlens.datasets.ReadOptions`)."""
    from cxrlens.data import load_manifest
    from cxrlens.taxonomy import get_taxonomy

    manifest = load_manifest(data or None, get_taxonomy(taxonomy), missing="skip", options=options)
    audit = audit_manifest(manifest, progress)
    audit.notes = manifest.notes()
    return audit


def check_evaluation_data(run_config, manifest: Manifest, allow_leaks: bool = False, progress: bool = True) -> list:
    """Before evaluating a run on ``manifest``: refuse images (by path or pixels) and, within the run's own
    data set, patients that the run was trained or validated on, unless ``allow_leaks`` or the run was
    trained with these very leaks allowed. Returns the leaks let through, to be recorded."""
    from cxrlens.data import load_manifest

    try:
        training = load_manifest(run_config.data or None, run_config.tax, missing="skip",
                                 options=run_config.read_options)
    except CxrlensError as exc:  # e.g. a run copied to a machine without its training data
        if progress:
            print(f"note: overlap with the training data was not checked ({exc})", file=sys.stderr)
        return audit_manifest(manifest, progress, patients=True).guard(allow_leaks, EVALUATE_FIX)
    seen = training.frame["split"].isin([run_config.train_split, run_config.val_split]).to_numpy()
    same_data = training.origin == manifest.origin
    if same_data:  # the rows evaluated plus the rows trained on, each under its own split name
        evaluated = manifest.frame["path"].to_numpy()
        keep = seen | training.frame["path"].isin(evaluated).to_numpy()
        combined = training.select(keep)
    else:
        outside = manifest.frame.assign(split="evaluated: " + manifest.origin.name)
        combined = Manifest(
            pd.concat([training.frame[seen], outside], ignore_index=True),
            np.concatenate([training.targets[seen], manifest.targets]),
            manifest.taxonomy,
            manifest.origin,
        )
    audit = audit_manifest(combined, progress=progress, patients=same_data)
    if not allow_leaks and set(audit.leaks + audit.conflicts) <= set(run_config.leaks):
        allow_leaks = True  # the run was trained with exactly these leaks allowed (config.json records them)
    return audit.guard(allow_leaks, EVALUATE_FIX)


# --- the report of `cxrlens check-data` ------------------------------------------------------------------


def audit_markdown(audit: DataAudit) -> str:
    lines = [f"# Data audit: {audit.origin}", "", f"{audit.images} images.", ""]
    classes = [c for c in next(iter(audit.counts.values())) if c != "total"] if audit.counts else []
    lines += ["| split | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    for split, per_class in audit.counts.items():
        cells = [f"{v['images']} img, {v['patients']} pat" for v in per_class.values()]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += ["", "## Sources", ""]
    for split, per_class in audit.counts.items():
        sources = ", ".join(f"{k} {v}" for k, v in per_class["total"]["sources"].items())
        lines.append(f"* {split}: {sources}")
    if audit.sizes:
        w, h = audit.sizes["width"], audit.sizes["height"]
        lines += ["", "## Images", "", f"* width {w['min']}-{w['max']} px (median {w['median']:g}), "
                  f"height {h['min']}-{h['max']} px (median {h['median']:g})"]
        lines.append("* " + ", ".join(f"{k}: {v}" for k, v in audit.depths.items()))
    for title, items in (
        ("Missing files", audit.missing),
        ("Unreadable files", audit.unreadable),
        ("Leaks between splits (an error unless --allow-leaks)", audit.leaks),
        ("Conflicting labels (an error unless --allow-leaks)", audit.conflicts),
        ("Duplicates within a split", audit.duplicates),
        (f"Near-duplicates ({audit.near_duplicates_across_splits} across splits; reported, not refused)",
         audit.near_duplicates),
    ):
        lines += ["", f"## {title}: {len(items)}", ""] + [f"* {item}" for item in items]
    return "\n".join(lines) + "\n"


def audit_summary(audit: DataAudit) -> str:
    """A few lines for the terminal."""
    total = audit.counts.get("all", {}).get("total", {})
    lines = [f"{audit.origin}: {audit.images} images, {total.get('patients', 0)} patients"]
    lines += [f"  note: {note}" for note in audit.notes]
    for split, per_class in audit.counts.items():
        if split == "all":
            continue
        cells = ", ".join(f"{c} {v['images']}" for c, v in per_class.items() if c != "total")
        sources = ", ".join(f"{k} {v}" for k, v in per_class["total"]["sources"].items())
        lines.append(f"  {split}: {per_class['total']['images']} images ({cells}); "
                     f"{per_class['total']['patients']} patients; sources: {sources}")
    if audit.sizes:
        w, h = audit.sizes["width"], audit.sizes["height"]
        depths = ", ".join(f"{k} {v}" for k, v in audit.depths.items())
        lines.append(f"  sizes: width {w['min']}-{w['max']}, height {h['min']}-{h['max']} px; depths: {depths}")
    for name, items in (
        ("missing files", audit.missing),
        ("unreadable files", audit.unreadable),
        ("leaks between splits", audit.leaks),
        ("conflicting labels", audit.conflicts),
        ("duplicates within a split", audit.duplicates),
        ("near-duplicates", audit.near_duplicates),
    ):
        lines.append(f"  {name}: {len(items)}" + "".join(f"\n    {item}" for item in items[:5])
                     + (f"\n    ... ({len(items) - 5} more)" if len(items) > 5 else ""))
    return "\n".join(lines)


def write_audit(audit: DataAudit, out: str | Path) -> Path:
    """audit.json and audit.md in ``out``, each written atomically."""
    from cxrlens.runs import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "audit.json", audit.to_json())
    atomic_write_text(out / "audit.md", audit.to_markdown())
    return out
