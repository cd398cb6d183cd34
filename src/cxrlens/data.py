"""Data: image readers, manifests, patient-level splits, preprocessing and a torch Dataset.

Every data set layout is read into one ``Manifest`` (a table with absolute ``path``, ``patient_group``,
``split``, ``source``, ``view`` and the derived multi-label ``targets``, which targets are known, and
localisation boxes where the data set has them). The readers are a registry, one module per layout, in
:mod:`cxrlens.datasets`: our ``labels.csv`` (as in ``data/cxr3``), Cohen's ``metadata.csv``, a folder per
class, NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, RSNA Pneumonia, VinDr-CXR and COVIDx.
:func:`load_manifest` detects the layout (or takes ``ReadOptions(format=...)``); frontal views by default.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from cxrlens.datasets.registry import ReadOptions
from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import CXR3, Taxonomy

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "cxr3"

# One pixel cap for every reader (CLI and web app): a chest X-ray has < 10 MP, so larger declared sizes are
# refused as decompression bombs. Pillow warns above this and refuses above twice this.
MAX_PIXELS = 50_000_000
# Above this many pixels (no ordinary X-ray has that many) an image read for a model is decoded reduced.
REDUCE_ABOVE = 16_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


# --- image readers -------------------------------------------------------------------------------


def read_image(path: str | Path, target_size: int | None = None) -> np.ndarray:
    """Read a chest X-ray as a 2-D float32 array of raw intensities (no rescaling yet).

    PNG/JPEG of 8 or 16 bits, greyscale or colour (converted to grey; transparent pixels on black),
    and DICOM (rescale slope/intercept applied, MONOCHROME1 inverted so bone is bright). Images over
    ``MAX_PIXELS`` and non-finite pixel values are errors. With ``target_size`` (the model's input
    side), an image of over ``REDUCE_ABOVE`` pixels is decoded reduced (JPEG's DCT scaling, else
    Pillow's box reduction) to a long side of at least 4x that: an 8,000 px scan for a 128 px model
    then takes megabytes, not gigabytes, while ordinary X-rays are read in full, as everywhere else.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrlensError(f"image not found: {path}")
    try:
        if path.suffix.lower() in {".dcm", ".dicom"} or _is_dicom(path):
            return _read_dicom(path)
        with _open_checked(path, str(path)) as img:
            return _finite(_pil_to_grey(_reduced(img, target_size)), str(path))
    except CxrlensError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard (at twice our cap) fired on opening
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(str(path), f"{int(declared.group(1)) / 1e6:.0f} megapixels" if declared else "the image") \
            from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CxrlensError(
            f"cannot read image {path}: {str(exc).splitlines()[0][:160]}; "
            "replace the file or remove its row from the manifest"
        ) from None
    except Exception as exc:  # pydicom raises many types for broken files
        raise CxrlensError(f"cannot read image {path}: {type(exc).__name__}: {str(exc)[:160]}") from None


def _open_checked(source: Any, name: str) -> Image.Image:
    """Image.open (headers only), refused by its declared size before anything is decoded. Pillow's
    warning between our cap and its own is replaced by our error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
    try:
        _check_size(img.size, name)
    except CxrlensError:
        img.close()
        raise
    return img


def _check_size(size: tuple[int, int], name: str) -> None:
    """Refuse an image by its declared size, before anything is decoded."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise _too_large(name, f"{width}x{height} pixels")


def _too_large(name: str, declared: str) -> CxrlensError:
    return CxrlensError(
        f"{name}: {declared} is over the limit of {MAX_PIXELS / 1e6:.0f} megapixels (a chest X-ray has fewer "
        "than 10); downscale the image"
    )


def _reduced(img: Image.Image, target_size: int | None) -> Image.Image:
    if not target_size or img.width * img.height <= REDUCE_ABOVE:
        return img
    factor = max(img.size) // (4 * target_size)
    if factor < 2:
        return img
    if img.format == "JPEG":  # decoded at 1/2, 1/4 or 1/8 scale: never smaller than asked
        img.draft(img.mode, (img.width // factor, img.height // factor))
        return img
    try:
        return img.reduce(factor)
    except ValueError:  # a mode reduce() does not support: decoded in full
        return img


def _finite(pixels: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(pixels).all():
        raise CxrlensError(
            f"{name}: the image has non-finite pixel values (NaN or infinity, e.g. from a DICOM RescaleSlope "
            "or RescaleIntercept of NaN); fix the file's header or remove the image"
        )
    return pixels


def read_image_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """Like ``read_image`` for bytes in memory (e.g. an upload); the type is sniffed from content."""
    import io

    if len(data) > 132 and data[128:132] == b"DICM":
        return _read_dicom(io.BytesIO(data), name)
    try:
        with _open_checked(io.BytesIO(data), name) as img:
            if img.format not in {"PNG", "JPEG", "TIFF", "BMP"}:
                raise CxrlensError(f"{name}: unsupported image type {img.format}; send PNG, JPEG or DICOM")
            return _finite(_pil_to_grey(img), name)
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
        with warnings.catch_warnings():  # pydicom warns about odd header values; what matters is checked below
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source)
            _check_size((int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)), name or str(source))
            pixels = ds.pixel_array.astype(np.float32)
            slope = float(getattr(ds, "RescaleSlope", 1) or 1)
            intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    except CxrlensError:
        raise
    except Exception as exc:
        raise CxrlensError(
            f"cannot read DICOM {name or source}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        ) from None
    if pixels.ndim == 3:  # multi-frame or colour: take the first frame / convert to grey
        pixels = pixels.mean(axis=-1) if pixels.shape[-1] in (3, 4) else pixels[0]
    pixels = pixels * slope + intercept
    pixels = _finite(pixels, name or str(source))
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    return pixels


# --- preprocessing -------------------------------------------------------------------------------


FITS = ("pad", "crop")
BLANK_LEVEL = 0.02  # crop's blank border: within 2 % of the raw range above the darkest value (JPEG noise on black)


@dataclass(frozen=True)
class Geometry:
    """Where the pixels of one source image land in the square model input."""

    content: tuple[int, int, int, int]  # top, bottom, left, right of the source kept (crop: blank border trimmed)
    resized: tuple[int, int]  # (height, width) of the kept part after resizing
    offset: tuple[int, int]  # (top, left) of the resized part in the square; negative where it is cropped
    size: int

    def place(self, image: Image.Image, resample: Image.Resampling) -> np.ndarray:
        """A PIL image of the source's shape -> [size, size] array; zeros where no content lands."""
        top, bottom, left, right = self.content
        if self.content != (0, image.height, 0, image.width):  # the study's fit keeps it all: no copy
            image = image.crop((left, top, right, bottom))
        resized = np.asarray(image.resize(self.resized[::-1], resample))
        out = np.zeros((self.size, self.size), dtype=resized.dtype)
        (y, x), (height, width) = self.offset, self.resized
        src_y, src_x, dst_y, dst_x = max(0, -y), max(0, -x), max(0, y), max(0, x)
        rows, cols = min(height - src_y, self.size - dst_y), min(width - src_x, self.size - dst_x)
        out[dst_y : dst_y + rows, dst_x : dst_x + cols] = resized[src_y : src_y + rows, src_x : src_x + cols]
        return out

    def region(self) -> np.ndarray:
        """bool [size, size]: the part of the input covered by the image (not zero padding)."""
        out = np.zeros((self.size, self.size), dtype=bool)
        (y, x), (height, width) = self.offset, self.resized
        out[max(0, y) : y + height, max(0, x) : x + width] = True
        return out


@dataclass(frozen=True)
class Preprocess:
    """The study's preprocessing: intensities clipped and rescaled to [0, 1], long side resized
    (bicubic), zero-padded to a square. The study clipped 8-bit images at 207; we clip at
    percentiles so 16-bit and DICOM images are handled the same way.

    ``fit="crop"`` (crop to content) removes the padding shortcut instead: the blank border of the file
    (black bars) is trimmed, the short side resized and the long side centre-cropped, so the input has no
    padding and an image's shape or bars tell the model nothing (RESULTS.md §5 measures both)."""

    size: int = 224
    clip_low: float = 0.5  # percentile
    clip_high: float = 99.5  # percentile
    fit: str = "pad"  # "pad" (the study's) or "crop" (crop to content)

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise CxrlensError(f"unknown fit '{self.fit}'; choose one of: {', '.join(FITS)}")

    @property
    def label(self) -> str:
        """A short name, e.g. "224px" or "224px-crop" (folder names of runs at different settings)."""
        return f"{self.size}px" if self.fit == "pad" else f"{self.size}px-{self.fit}"

    def geometry(self, pixels: np.ndarray) -> Geometry:
        """Where ``pixels`` [H, W] (raw intensities) land in the input."""
        full = (0, pixels.shape[0], 0, pixels.shape[1])
        top, bottom, left, right = _content(pixels) if self.fit == "crop" else full
        h, w = bottom - top, right - left
        if self.fit == "crop":  # short side to size, the rest cropped (centred)
            factor = self.size / min(h, w)
            new_h, new_w = max(self.size, round(h * factor)), max(self.size, round(w * factor))
        else:  # long side to size, the rest zero-padded (centred)
            factor = self.size / max(h, w)
            new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
        offset = ((self.size - new_h) // 2, (self.size - new_w) // 2)
        return Geometry((top, bottom, left, right), (new_h, new_w), offset, self.size)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """[H, W] raw intensities -> [1, size, size] float32 in [0, 1]."""
        geometry = self.geometry(pixels)
        top, bottom, left, right = geometry.content
        low, high = np.percentile(pixels[top:bottom, left:right], [self.clip_low, self.clip_high])
        if high <= low:
            high = low + 1.0
        scaled = np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)
        placed = geometry.place(Image.fromarray(scaled, mode="F"), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.clip(placed, 0.0, 1.0))[None]


def _content(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """top, bottom, left, right of ``pixels`` without its blank border: the rows and columns at the edges
    whose every value is within ``BLANK_LEVEL`` of the raw range above the darkest value. Black bars
    added at the darkest value (another source's letterboxing, the planted ``padding`` artifact) leave
    the darkest and brightest values alone, so an image with bars keeps exactly the content it had
    without them."""
    darkest = float(pixels.min())
    blank = pixels <= darkest + BLANK_LEVEL * (float(pixels.max()) - darkest)
    rows, cols = np.flatnonzero(~blank.all(1)), np.flatnonzero(~blank.all(0))
    if len(rows) == 0:  # nothing but blank: keep it all
        return 0, pixels.shape[0], 0, pixels.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def load_image_tensor(path: str | Path, preprocess: int | Preprocess = 224) -> torch.Tensor:
    """One image file -> [3, size, size] tensor ready for a model (``preprocess``: the run's, or a size)."""
    preprocess = as_preprocess(preprocess)
    return preprocess(read_image(path, preprocess.size)).expand(3, -1, -1).contiguous()


def as_preprocess(preprocess: int | Preprocess) -> Preprocess:
    """A Preprocess, or the study's at a size."""
    return preprocess if isinstance(preprocess, Preprocess) else Preprocess(int(preprocess))


# --- manifests -----------------------------------------------------------------------------------


@dataclass
class Manifest:
    """A table of images with derived multi-label targets."""

    frame: pd.DataFrame  # columns: path (absolute), patient_group, split (may be ''), source, finding, view, _row
    targets: np.ndarray  # [n, num_classes] float32 0/1
    taxonomy: Taxonomy
    origin: Path  # the file or folder it was read from
    missing: list[tuple[int, str]] = field(default_factory=list)  # (CSV line, path) of rows whose file is missing
    known: np.ndarray | None = None  # [n, num_classes] bool: False where the label is unknown; None: all known
    boxes: pd.DataFrame | None = None  # localisation ground truth: path, finding, x, y, w, h, ref_w, ref_h
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out while reading, by reason
    format: str = ""  # the layout it was read as (cxrlens.datasets.FORMATS)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def has_split(self) -> bool:
        return bool((self.frame["split"] != "").any())

    def select(self, mask: np.ndarray | pd.Series) -> Manifest:
        mask = np.asarray(mask, dtype=bool)
        known = None if self.known is None else self.known[mask]
        return replace(self, frame=self.frame[mask].reset_index(drop=True), targets=self.targets[mask], known=known,
                       missing=[])

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

    def targets_or_nan(self) -> np.ndarray:
        """The targets with NaN where the label is unknown (e.g. CheXpert's uncertain labels under
        ``--uncertain ignore``): the loss and the metrics leave those entries out."""
        if self.known is None:
            return self.targets
        return np.where(self.known, self.targets, np.nan).astype(np.float32)

    def notes(self) -> list[str]:
        """What was left out while reading, one line per reason (for the terminal)."""
        return [f"{self.origin}: {n} rows left out ({why})" for why, n in self.dropped.items() if n]


def load_manifest(source: str | Path | None = None, taxonomy: Taxonomy = CXR3, missing: str = "error",
                  options: ReadOptions | None = None) -> Manifest:
    """Read a data set in any supported format (``cxrlens.datasets.FORMATS``: our labels.csv, Cohen,
    class folders, NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, RSNA Pneumonia, VinDr-CXR, COVIDx);
    ``source`` is a folder or a table file, ``options`` the format (default: detected), views,
    uncertainty and rater policies.

    Rows whose image file does not exist are an error naming how many and the first few
    (``missing="error"``), or are left out and listed in ``Manifest.missing`` (``missing="skip"``)."""
    from cxrlens.datasets.build import read_data

    options = options or ReadOptions()
    options.check()
    source = Path(source) if source is not None else DEFAULT_DATA
    if not source.exists():
        raise CxrlensError(f"data not found: {source}; give a folder or a labels CSV")
    manifest = read_data(source, taxonomy, options)
    gone, total = manifest.missing, len(manifest) + len(manifest.missing)
    if len(gone) == 1 and missing != "skip":
        where = f"{manifest.origin}, row {gone[0][0]}" if gone[0][0] else str(manifest.origin)
        raise CxrlensError(
            f"{where}: image file missing: {gone[0][1]}; restore it, remove the row, "
            "or pass --skip-missing to leave it out"
        )
    if gone and (missing != "skip" or not len(manifest)):
        shown = "; ".join(f"row {row}: {path}" if row else path for row, path in gone[:3])
        shown += "; ..." if len(gone) > 3 else ""
        fix = "restore them, remove their rows, or pass --skip-missing to leave them out"
        raise CxrlensError(
            f"{manifest.origin}: {len(gone)} of {total} image files are missing ({shown}); "
            + (fix if len(manifest) else "is the manifest in the folder its paths start from?")
        )
    return manifest


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
    return replace(manifest, frame=frame)


# --- torch dataset -------------------------------------------------------------------------------


PLACEMENTS = ("centre", "random")


class RandomPlacement:
    """Training-time placement: the image content (everything inside the blank border, i.e. the zero
    padding and any black bars) moves to a random position in the square, so *where* the padding lies
    tells nothing about the image; an answer to the padding shortcut (image shape differs by source).
    The amount of padding is unchanged, and inference keeps the centred placement."""

    def __call__(self, image: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # [C, H, W]
        """``rng``: where the draws come from (training passes one seeded per epoch and image, so a resumed
        run places every image as the uninterrupted one did); None: numpy's global generator."""
        rng = rng or np.random.default_rng(np.random.randint(2**31))
        filled = image.abs().amax(0) > 0
        rows, cols = torch.nonzero(filled.any(1)).flatten(), torch.nonzero(filled.any(0)).flatten()
        if len(rows) == 0:
            return image
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        height, width = image.shape[-2:]
        new_top = int(rng.integers(0, height - (bottom - top) + 1))
        new_left = int(rng.integers(0, width - (right - left) + 1))
        out = torch.zeros_like(image)
        out[:, new_top : new_top + bottom - top, new_left : new_left + right - left] = image[:, top:bottom, left:right]
        return out


class XrayDataset(Dataset):
    """Images of a manifest as [3, size, size] tensors with their multi-hot targets (NaN where unknown).

    Preprocessed images are cached in memory as float16 (a 224 px image takes 100 kB), so later
    epochs skip decoding; placement and augmentation, if any, run on the cached tensor. With ``disk_cache`` (a
    built :class:`cxrlens.datasets.cache.ImageCache` of these settings) images come from its memory map
    instead, at uint8 precision, and nothing is held in memory: the way to feed a GPU from a large set.
    ``preprocess``: the run's :class:`Preprocess` (or an input size: the study's at that size).
    ``placement``: "centre" (the study's) or "random" (:class:`RandomPlacement`, for training).
    """

    def __init__(self, manifest: Manifest, preprocess: int | Preprocess = 224, augment=None, cache: bool = True,
                 disk_cache=None, placement: str = "centre"):
        if placement not in PLACEMENTS:
            raise CxrlensError(f"unknown placement '{placement}'; choose one of: {', '.join(PLACEMENTS)}")
        self.manifest = manifest
        self.preprocess = as_preprocess(preprocess)
        self.placement = RandomPlacement() if placement == "random" else None
        self.augment = augment
        self.disk_cache = disk_cache
        self.cache: dict[int, torch.Tensor] | None = {} if cache and disk_cache is None else None
        self.targets = torch.from_numpy(manifest.targets_or_nan())  # NaN: unknown, left out of the loss
        self.slots = disk_cache.locate(manifest.frame["path"].tolist()) if disk_cache is not None else None

    def __len__(self) -> int:
        return len(self.manifest)

    def image(self, index: int) -> torch.Tensor:
        if self.slots is not None:
            return self.disk_cache.tensor(*self.slots[index])
        if self.cache is not None and index in self.cache:
            return self.cache[index].float()
        tensor = self.preprocess(read_image(self.manifest.frame["path"].iat[index], self.preprocess.size))
        if self.cache is not None:
            self.cache[index] = tensor.half()
            return self.cache[index].float()  # the values of every later epoch (and of a resumed run's first)
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(index)
        if self.placement is not None:
            image = self.placement(image)
        if self.augment is not None:
            image = self.augment(image)
        return image.expand(3, -1, -1), self.targets[index]


LABEL_PREFIX = "label:"  # write_manifest's columns of encoded targets: 1, 0, or empty for unknown


def write_manifest(manifest: Manifest, out: str | Path) -> None:
    """Save a manifest as our labels.csv format, paths relative to the CSV's folder where possible.
    Besides the finding, one ``label:<class>`` column per class holds the encoded targets (1, 0, empty
    where unknown), so a manifest read from any format reads back with the same targets."""
    from cxrlens.runs import atomic_write_text

    out = Path(out).resolve()
    frame = manifest.frame.drop(columns=["_row"], errors="ignore")
    parts = [p.rpartition(os.sep) for p in frame["path"].tolist()]
    folders = {p[0] for p in parts}  # relpath once per folder: a data set has few folders and many files
    relative = {f: os.path.relpath(f or os.sep, out.parent) for f in folders}
    frame["path"] = [p[2] if relative[p[0]] == "." else relative[p[0]] + os.sep + p[2] for p in parts]
    if "cls" not in frame:
        frame["cls"] = frame["finding"]
    values = np.where(manifest.targets > 0.5, "1", "0").astype(object)
    if manifest.known is not None:
        values[~manifest.known] = ""
    for i, name in enumerate(manifest.taxonomy.classes):
        frame[LABEL_PREFIX + name] = values[:, i]
    atomic_write_text(out, frame.to_csv(index=False))
