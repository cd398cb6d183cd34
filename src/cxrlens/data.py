"""Data: image readers, manifests, patient-level splits, preprocessing and a torch Dataset.

Three manifest formats are read into one ``Manifest`` (a table with absolute ``path``,
``patient_group``, ``split``, ``source`` and the derived multi-label ``targets``):

* our ``labels.csv`` (columns ``path`` and ``cls`` or ``finding``; optional ``patient_group``/``patient_id``,
  ``split``, ``source``), as in ``data/cxr3``;
* Cohen's COVID-19 image data collection ``metadata.csv`` (``patientid, finding, view, filename``, images
  in ``images/``), frontal views only, as in the study;
* a folder per class (``COVID/``, ``Normal/``, ``Viral Pneumonia/``), optionally below split folders
  (``train/COVID/...``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import CXR3, Taxonomy

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
FRONTAL_VIEWS = {"PA", "AP", "AP SUPINE", "AP ERECT", "AP SEMI ERECT"}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "cxr3"

Image.MAX_IMAGE_PIXELS = 60_000_000  # refuse decompression bombs (a chest X-ray is < 10 MP)


# --- image readers -------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read a chest X-ray as a 2-D float32 array of raw intensities (no rescaling yet).

    PNG/JPEG of 8 or 16 bits, greyscale or colour (converted to grey; transparent pixels on black),
    and DICOM (rescale slope/intercept applied, MONOCHROME1 inverted so bone is bright).
    """
    path = Path(path)
    if not path.is_file():
        raise CxrlensError(f"image not found: {path}")
    try:
        if path.suffix.lower() in {".dcm", ".dicom"} or _is_dicom(path):
            return _read_dicom(path)
        with Image.open(path) as img:
            return _pil_to_grey(img)
    except CxrlensError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CxrlensError(
            f"cannot read image {path}: {str(exc).splitlines()[0][:160]}; "
            "replace the file or remove its row from the manifest"
        ) from None
    except Exception as exc:  # pydicom raises many types for broken files
        raise CxrlensError(f"cannot read image {path}: {type(exc).__name__}: {str(exc)[:160]}") from None


def read_image_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """Like ``read_image`` for bytes in memory (e.g. an upload); the type is sniffed from content."""
    import io

    if len(data) > 132 and data[128:132] == b"DICM":
        return _read_dicom(io.BytesIO(data), name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in {"PNG", "JPEG", "TIFF", "BMP"}:
                raise CxrlensError(f"{name}: unsupported image type {img.format}; send PNG, JPEG or DICOM")
            return _pil_to_grey(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CxrlensError(f"{name}: not a readable PNG, JPEG or DICOM image ({str(exc)[:120]})") from None


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _pil_to_grey(img: Image.Image) -> np.ndarray:
    img.load()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(img, dtype=np.float32)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32)


def _read_dicom(source, name: str | None = None) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise CxrlensError(
            f"cannot read DICOM {name or source}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        ) from None
    if pixels.ndim == 3:  # multi-frame or colour: take the first frame / convert to grey
        pixels = pixels.mean(axis=-1) if pixels.shape[-1] in (3, 4) else pixels[0]
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    return pixels


# --- preprocessing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """The study's preprocessing: intensities clipped and rescaled to [0, 1], long side resized
    (bicubic), zero-padded to a square. The study clipped 8-bit images at 207; we clip at
    percentiles so 16-bit and DICOM images are handled the same way."""

    size: int = 224
    clip_low: float = 0.5  # percentile
    clip_high: float = 99.5  # percentile

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """[H, W] raw intensities -> [1, size, size] float32 in [0, 1]."""
        low, high = np.percentile(pixels, [self.clip_low, self.clip_high])
        if high <= low:
            high = low + 1.0
        scaled = np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)
        h, w = scaled.shape
        factor = self.size / max(h, w)
        new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
        resized = Image.fromarray(scaled, mode="F").resize((new_w, new_h), Image.Resampling.BICUBIC)
        out = np.zeros((self.size, self.size), dtype=np.float32)
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        out[top : top + new_h, left : left + new_w] = np.clip(np.asarray(resized), 0.0, 1.0)
        return torch.from_numpy(out)[None]


def load_image_tensor(path: str | Path, size: int = 224) -> torch.Tensor:
    """One image file -> [3, size, size] tensor ready for a model."""
    return Preprocess(size)(read_image(path)).expand(3, -1, -1).contiguous()


# --- manifests -----------------------------------------------------------------------------------


@dataclass
class Manifest:
    """A table of images with derived multi-label targets."""

    frame: pd.DataFrame  # columns: path (absolute), patient_group, split (may be ''), source, finding
    targets: np.ndarray  # [n, num_classes] float32 0/1
    taxonomy: Taxonomy
    origin: Path  # the file or folder it was read from

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def has_split(self) -> bool:
        return bool((self.frame["split"] != "").any())

    def select(self, mask: np.ndarray | pd.Series) -> Manifest:
        mask = np.asarray(mask, dtype=bool)
        return Manifest(self.frame[mask].reset_index(drop=True), self.targets[mask], self.taxonomy, self.origin)

    def split(self, name: str | None) -> Manifest:
        """The rows of split ``name``; without a split column, or with ``name`` None, every row."""
        if name is None or not self.has_split:
            return self
        present = sorted(set(self.frame["split"]) - {""})
        if name not in present:
            raise CxrlensError(f"{self.origin}: split '{name}' does not occur; the splits are: {', '.join(present)}")
        return self.select(self.frame["split"] == name)

    def head(self, n: int | None, seed: int = 0) -> Manifest:
        """At most ``n`` rows drawn at random (for quick runs), kept in their original order."""
        if n is None or n >= len(self):
            return self
        order = np.random.default_rng(seed).permutation(len(self))
        return self.select(np.isin(np.arange(len(self)), np.sort(order[:n])))

    def class_counts(self) -> dict[str, int]:
        return {c: int(v) for c, v in zip(self.taxonomy.classes, self.targets.sum(0), strict=True)}


def load_manifest(source: str | Path | None = None, taxonomy: Taxonomy = CXR3) -> Manifest:
    """Read a data set in any supported format; ``source`` is a CSV file or a folder."""
    source = Path(source) if source is not None else DEFAULT_DATA
    if not source.exists():
        raise CxrlensError(f"data not found: {source}; give a folder or a labels CSV")
    if source.is_dir():
        for name in ("labels.csv", "metadata.csv"):
            if (source / name).is_file():
                return load_manifest(source / name, taxonomy)
        return _read_class_folders(source, taxonomy)
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise CxrlensError(f"cannot read manifest {source}: {str(exc).splitlines()[0][:160]}") from None
    columns = set(frame.columns)
    if {"patientid", "finding", "filename"} <= columns:
        return _read_cohen(frame, source, taxonomy)
    if "path" in columns and ({"cls", "finding", "label"} & columns):
        return _read_labels_csv(frame, source, taxonomy)
    raise CxrlensError(
        f"{source}: unrecognised columns {sorted(columns)[:12]}; expected our labels.csv "
        "(path + cls or finding) or Cohen's metadata.csv (patientid, finding, view, filename)"
    )


def _finish(rows: pd.DataFrame, source: Path, taxonomy: Taxonomy) -> Manifest:
    """Derive targets, check files exist, fill optional columns. Errors name the CSV line (``_line``)."""
    lines = rows.pop("_line").tolist() if "_line" in rows else [i + 2 for i in range(len(rows))]
    targets = np.zeros((len(rows), taxonomy.num_classes), dtype=np.float32)
    for i, finding in enumerate(rows["finding"]):
        try:
            targets[i] = taxonomy.encode(finding)
        except KeyError:
            raise CxrlensError(
                f"{source}, row {lines[i]}: unknown label '{finding}'; taxonomy '{taxonomy.name}' knows "
                f"{', '.join(taxonomy.classes)} (use --taxonomy or fix the row)"
            ) from None
    for i, path in enumerate(rows["path"]):
        if not os.path.isfile(path):
            raise CxrlensError(f"{source}, row {lines[i]}: image file missing: {path}")
    for column, default in (("split", ""), ("source", "unknown")):
        if column not in rows:
            rows[column] = default
    if "patient_group" not in rows:
        rows["patient_group"] = rows["patient_id"] if "patient_id" in rows else rows["path"]
    rows["patient_group"] = rows["patient_group"].astype(str).where(rows["patient_group"] != "", rows["path"])
    rows["split"] = rows["split"].astype(str).str.strip().str.lower()
    return Manifest(rows.reset_index(drop=True), targets, taxonomy, source)


def _read_labels_csv(frame: pd.DataFrame, source: Path, taxonomy: Taxonomy) -> Manifest:
    rows = frame.copy()
    label_column = next(c for c in ("finding", "cls", "label") if c in rows)
    # cxr3's cls (covid/pneumonia/normal) is the cleanest label; NIH findings carry extra words
    if "cls" in rows:
        label_column = "cls"
    rows["finding"] = rows[label_column]
    empty = rows["path"].str.strip() == ""
    if empty.any():
        raise CxrlensError(f"{source}, row {int(np.argmax(empty.values)) + 2}: empty 'path'")
    rows["path"] = [str((source.parent / p).resolve()) for p in rows["path"]]
    return _finish(rows, source, taxonomy)


def _read_cohen(frame: pd.DataFrame, source: Path, taxonomy: Taxonomy) -> Manifest:
    rows = frame.copy()
    rows["_line"] = np.arange(len(rows)) + 2
    if "view" in rows:
        rows = rows[rows["view"].str.upper().str.replace("_", " ").isin(FRONTAL_VIEWS)]
    if "modality" in rows:
        rows = rows[rows["modality"].str.upper().isin({"X-RAY", "XRAY", "CR", "DX", ""})]
    folder = rows["folder"] if "folder" in rows else pd.Series("images", index=rows.index)
    rows["path"] = [str((source.parent / f / n).resolve()) for f, n in zip(folder, rows["filename"], strict=True)]
    rows["patient_group"] = "cohen:" + rows["patientid"].astype(str)
    rows["source"] = "cohen"
    # the study dropped findings it did not model ("todo", unknown): keep only known ones
    known = [_knows(taxonomy, f) for f in rows["finding"]]
    rows = rows[known]
    if rows.empty:
        raise CxrlensError(f"{source}: no frontal X-ray with a known finding; check the 'view' and 'finding' columns")
    return _finish(rows.reset_index(drop=True), source, taxonomy)


def _knows(taxonomy: Taxonomy, finding: str) -> bool:
    try:
        taxonomy.encode(finding)
        return True
    except KeyError:
        return False


def _read_class_folders(root: Path, taxonomy: Taxonomy) -> Manifest:
    records = []
    split_names = {"train", "val", "valid", "validation", "test"}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue
        split = parts[0].lower() if len(parts) >= 3 and parts[0].lower() in split_names else ""
        split = {"valid": "val", "validation": "val"}.get(split, split)
        records.append({"path": str(path.resolve()), "finding": parts[-2], "split": split, "source": root.name})
    if not records:
        raise CxrlensError(
            f"{root}: no labels.csv, metadata.csv or class folders with images (e.g. {root}/COVID/*.png)"
        )
    rows = pd.DataFrame(records)
    for folder in sorted(set(rows["finding"])):
        if not _knows(taxonomy, folder):
            raise CxrlensError(
                f"{root / folder}: folder name is not a class of taxonomy '{taxonomy.name}' "
                f"({', '.join(taxonomy.classes)}); rename the folder"
            )
    return _finish(rows, root, taxonomy)


# --- patient-level splits ------------------------------------------------------------------------


def _group_strata(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Unique patient groups and, for stratification, the label pattern of each group's first image."""
    groups = manifest.frame["patient_group"].to_numpy()
    unique, first = np.unique(groups, return_index=True)
    patterns = np.array(["".join(str(int(v)) for v in manifest.targets[i]) for i in first])
    return unique, patterns


def patient_kfold(manifest: Manifest, folds: int = 5, seed: int = 1701) -> list[np.ndarray]:
    """Assign each patient group to one of ``folds`` folds, stratified by label pattern.
    Returns, per fold, a boolean mask of the images in that fold."""
    unique, patterns = _group_strata(manifest)
    rng = np.random.default_rng(seed)
    fold_of_group = {}
    for pattern in np.unique(patterns):
        members = rng.permutation(unique[patterns == pattern])
        offset = rng.integers(folds)
        for j, group in enumerate(members):
            fold_of_group[group] = (j + offset) % folds
    fold = manifest.frame["patient_group"].map(fold_of_group).to_numpy()
    return [fold == k for k in range(folds)]


def patient_split(
    manifest: Manifest,
    fractions: tuple[float, ...] = (0.7, 0.15, 0.15),
    names: tuple[str, ...] = ("train", "val", "test"),
    seed: int = 0,
) -> Manifest:
    """A new ``split`` column drawn by patient group, stratified by label pattern.
    ``fractions=(0.6, 0.4), names=("train", "test")`` gives the study's split."""
    if len(fractions) != len(names) or abs(sum(fractions) - 1) > 1e-6:
        raise CxrlensError("split fractions must sum to 1, one per split name")
    unique, patterns = _group_strata(manifest)
    rng = np.random.default_rng(seed)
    split_of_group = {}
    bounds = np.cumsum(fractions)
    for pattern in np.unique(patterns):
        members = rng.permutation(unique[patterns == pattern])
        position = (np.arange(len(members)) + 0.5) / len(members)
        for group, p in zip(members, position, strict=True):
            split_of_group[group] = names[int(np.searchsorted(bounds, p))]
    frame = manifest.frame.copy()
    frame["split"] = frame["patient_group"].map(split_of_group)
    return Manifest(frame, manifest.targets, manifest.taxonomy, manifest.origin)


# --- torch dataset -------------------------------------------------------------------------------


PLACEMENTS = ("centre", "random")


class RandomPlacement:
    """Training-time placement: the image content (everything inside the blank border, i.e. the zero
    padding and any black bars) moves to a random position in the square, so *where* the padding lies
    tells nothing about the image; an answer to the padding shortcut (image shape differs by source).
    The amount of padding is unchanged, and inference keeps the centred placement."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # [C, H, W]
        filled = image.abs().amax(0) > 0
        rows, cols = torch.nonzero(filled.any(1)).flatten(), torch.nonzero(filled.any(0)).flatten()
        if len(rows) == 0:
            return image
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        height, width = image.shape[-2:]
        new_top = int(np.random.randint(0, height - (bottom - top) + 1))
        new_left = int(np.random.randint(0, width - (right - left) + 1))
        out = torch.zeros_like(image)
        out[:, new_top : new_top + bottom - top, new_left : new_left + right - left] = image[:, top:bottom, left:right]
        return out


class XrayDataset(Dataset):
    """Images of a manifest as [3, size, size] tensors with their multi-hot targets.

    Preprocessed images are cached in memory as float16 (a 224 px image takes 100 kB), so later
    epochs skip decoding; placement and augmentation, if any, run on the cached tensor.
    ``placement``: "centre" (the study's) or "random" (:class:`RandomPlacement`, for training).
    """

    def __init__(self, manifest: Manifest, size: int = 224, augment=None, cache: bool = True,
                 placement: str = "centre"):
        if placement not in PLACEMENTS:
            raise CxrlensError(f"unknown placement '{placement}'; choose one of: {', '.join(PLACEMENTS)}")
        self.manifest = manifest
        self.preprocess = Preprocess(size)
        self.placement = RandomPlacement() if placement == "random" else None
        self.augment = augment
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.targets = torch.from_numpy(manifest.targets)

    def __len__(self) -> int:
        return len(self.manifest)

    def image(self, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index].float()
        tensor = self.preprocess(read_image(self.manifest.frame["path"].iat[index]))
        if self.cache is not None:
            self.cache[index] = tensor.half()
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(index)
        if self.placement is not None:
            image = self.placement(image)
        if self.augment is not None:
            image = self.augment(image)
        return image.expand(3, -1, -1), self.targets[index]


def write_manifest(manifest: Manifest, out: str | Path) -> None:
    """Save a manifest as our labels.csv format, paths relative to the CSV's folder where possible."""
    from cxrlens.runs import atomic_write_text

    out = Path(out).resolve()
    frame = manifest.frame.copy()
    frame["path"] = [os.path.relpath(p, out.parent) for p in frame["path"]]
    if "cls" not in frame:
        frame["cls"] = frame["finding"]
    atomic_write_text(out, frame.to_csv(index=False))
