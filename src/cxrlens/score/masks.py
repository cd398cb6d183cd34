"""Mask sets: chest X-rays with named binary masks (lungs, heart, opacity, devices), aligned with
the model input.

A mask folder holds ``masks.csv`` with an ``image`` column and one column per mask, each a path
relative to the folder (empty where the radiologists drew nothing of that kind), as in
``data/lungmasks``. Masks are brought to the model input with exactly the geometry
:class:`cxrlens.data.Preprocess` gives their image (the study's: long side resized to ``size``, centred,
zero-padded to a square; crop to content: blank border trimmed, short side resized, centre-cropped),
with nearest-neighbour sampling, so mask pixel (y, x) covers input pixel (y, x).

Derived masks (always present when ``lungs`` is):

* ``image_region``: the part of the square input covered by the image (not zero padding);
* ``padding``: the zero padding;
* ``outside_body``: everything outside the thorax, defined as NOT (the union of ``lungs`` and
  ``heart`` dilated by a disk of radius ``body_margin * size`` px, intersected with the image
  region). The margin (6 % of the side by default) covers the ribs and chest wall lateral to the
  lung outline, so what is left is neck, shoulders, arms, abdomen, borders, text, markers and the
  padding: the places where source shortcuts live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from cxrlens.data import Geometry, Preprocess, as_preprocess, read_image
from cxrlens.errors import CxrlensError

KNOWN_MASKS = ("lungs", "left_lung", "right_lung", "heart", "opacity", "devices")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif")
DERIVED_MASKS = ("image_region", "padding", "outside_body")
BODY_MARGIN = 0.06  # dilation of lungs+heart, as a share of the input side


def place_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A 2-D 0/1 (or 0/255) mask of the original image -> bool [size, size] aligned with the model input,
    ``geometry`` being its image's (``Preprocess.geometry(pixels)``)."""
    img = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L")
    return geometry.place(img, Image.Resampling.NEAREST) >= 128


def disk(radius: float) -> torch.Tensor:
    """A disk of ones, [2r+1, 2r+1] float32."""
    r = int(math.ceil(radius))
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    return ((yy**2 + xx**2) <= radius**2 + 1e-6).float()


def dilate(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Binary dilation of masks [..., H, W] by a disk of ``radius`` px (radius 0: unchanged)."""
    if radius <= 0:
        return mask.bool()
    kernel = disk(radius).to(mask.device)
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    out = F.conv2d(flat, kernel[None, None], padding=kernel.shape[-1] // 2)
    return (out > 0.5).reshape(shape)


def empty_border(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """bool [N, H, W]: the rows and columns at the edges of each input [N, C, H, W] that are blank
    (every value <= ``eps``), counted inwards until the first row or column with content. This is
    preprocessing's zero padding plus any black bars burned into the file, which look the same to a
    model (the ``padding`` mask knows only the former)."""
    blank = images.abs().amax(1) <= eps

    def from_edges(lines: torch.Tensor) -> torch.Tensor:  # [N, L] blank lines -> those connected to an edge
        return lines.int().cumprod(1).bool() | lines.flip(1).int().cumprod(1).flip(1).bool()

    rows, cols = from_edges(blank.all(2)), from_edges(blank.all(1))
    return rows[:, :, None] | cols[:, None, :]


@dataclass
class MaskSet:
    """Images and masks of a mask folder at one input size.

    images: [N, 3, S, S] model input (the run's ``Preprocess``); masks: name -> bool [N, S, S], all False
    where the mask is absent; present: name -> bool [N], whether the row has that mask (derived masks
    are present wherever ``lungs`` is); frame: the CSV rows with an absolute ``path`` column.
    """

    folder: Path
    csv: Path
    size: int
    frame: pd.DataFrame
    images: torch.Tensor
    masks: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    mask_columns: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.frame)

    def select(self, index: np.ndarray | list[int]) -> MaskSet:
        """The rows ``index`` (integer positions) as a new mask set."""
        idx = np.asarray(index, dtype=np.int64)
        rows = torch.from_numpy(idx)
        return replace(self, frame=self.frame.iloc[idx].reset_index(drop=True), images=self.images[rows],
                       masks={k: v[rows] for k, v in self.masks.items()},
                       present={k: v[rows] for k, v in self.present.items()})


def _mask_columns(frame: pd.DataFrame, csv: Path, wanted: list[str] | None) -> list[str]:
    if wanted is not None:
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise CxrlensError(
                f"{csv}: no mask column '{missing[0]}'; the columns are: {', '.join(frame.columns)}"
            )
        return list(wanted)
    columns = []
    for column in frame.columns:
        if column == "image":
            continue
        values = [v for v in frame[column] if v.strip()]
        if column in KNOWN_MASKS or (values and all(v.lower().endswith(MASK_SUFFIXES) for v in values)):
            columns.append(column)
    return columns


def _read_mask(path: Path, csv: Path, line: int, column: str) -> np.ndarray:
    if not path.is_file():
        raise CxrlensError(f"{csv}, row {line}, column '{column}': mask file missing: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CxrlensError(
            f"{csv}, row {line}, column '{column}': cannot read mask {path}: {str(exc).splitlines()[0][:120]}"
        ) from None


def _read_csv(folder: Path, max_images: int | None) -> tuple[Path, pd.DataFrame]:
    csv = folder if folder.suffix.lower() == ".csv" else folder / "masks.csv"
    if not csv.is_file():
        raise CxrlensError(
            f"no masks.csv in {folder}; a mask folder holds masks.csv with an 'image' column and one column "
            "per mask (paths relative to the folder), like data/lungmasks"
        )
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise CxrlensError(f"cannot read {csv}: {str(exc).splitlines()[0][:160]}") from None
    if "image" not in frame.columns:
        raise CxrlensError(f"{csv}: no 'image' column; the columns are: {', '.join(frame.columns)}")
    if frame.empty:
        raise CxrlensError(f"{csv} has no rows")
    return csv, frame.iloc[:max_images] if max_images is not None else frame


def _read_row(csv: Path, frame: pd.DataFrame, i: int, columns: list[str],
              preprocess: Preprocess) -> tuple[Path, torch.Tensor, Geometry, dict[str, np.ndarray]]:
    """Row ``i``: its image path, model input, where the image lies in the input and its masks there."""
    line = i + 2  # CSV line: header is line 1
    image_rel = str(frame["image"].iat[i]).strip()
    if not image_rel:
        raise CxrlensError(f"{csv}, row {line}: empty 'image'")
    image_path = csv.parent / image_rel
    if not image_path.is_file():
        raise CxrlensError(f"{csv}, row {line}: image file missing: {image_path}")
    pixels = read_image(image_path)
    h, w = pixels.shape
    geometry = preprocess.geometry(pixels)
    placed = {}
    for column in columns:
        rel = str(frame[column].iat[i]).strip()
        if not rel:
            continue
        mask_path = csv.parent / rel
        mask = _read_mask(mask_path, csv, line, column)
        if mask.shape != (h, w):
            raise CxrlensError(
                f"{csv}, row {line}, column '{column}': mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} "
                f"but image {image_path.name} is {w}x{h}; masks must have exactly their image's size"
            )
        placed[column] = place_mask(mask, geometry)
    return image_path, preprocess(pixels).expand(3, -1, -1), geometry, placed


def _derive(masks: dict[str, torch.Tensor], present: dict[str, torch.Tensor], region: torch.Tensor,
            margin_px: float) -> None:
    """Add the derived masks (see the module docstring), present wherever ``lungs`` is."""
    body = masks["lungs"] | masks["heart"] if "heart" in masks else masks["lungs"]
    body = dilate(body, margin_px) & region
    # rows without lungs (box masks: cxrlens.datasets.box_mask_set): thorax unknown, outside_body empty (NaN)
    masks["outside_body"] = ~body & present["lungs"][:, None, None]
    masks["image_region"] = region
    masks["padding"] = ~region
    for name in DERIVED_MASKS:
        present[name] = present["lungs"].clone()


def load_mask_set(
    folder: str | Path,
    preprocess: int | Preprocess = 224,
    mask_columns: list[str] | None = None,
    body_margin: float = BODY_MARGIN,
    max_images: int | None = None,
) -> MaskSet:
    """Read a mask folder (``masks.csv`` + files; or the CSV itself) as a model sees it: ``preprocess`` is
    the run's :class:`cxrlens.data.Preprocess` (or an input size: the study's preprocessing at that size).

    ``mask_columns``: the mask columns to read; default: the known ones present
    (lungs, left_lung, right_lung, heart, opacity, devices) and any other column whose values are
    all PNG/BMP/TIFF/GIF paths. ``max_images``: read only the first rows (quick runs).
    Errors name the CSV, the row (CSV line number) and the file.
    """
    folder = Path(folder)
    csv, frame = _read_csv(folder, max_images)
    columns = _mask_columns(frame, csv, mask_columns)
    if not columns:
        raise CxrlensError(f"{csv}: no mask columns found (e.g. 'lungs' with PNG paths); pass mask_columns")
    preprocess = as_preprocess(preprocess)
    n, size = len(frame), preprocess.size
    images = torch.empty(n, 3, size, size)
    masks = {c: torch.zeros(n, size, size, dtype=torch.bool) for c in columns}
    present = {c: torch.zeros(n, dtype=torch.bool) for c in columns}
    region = torch.zeros(n, size, size, dtype=torch.bool)
    paths = []
    for i in range(n):
        image_path, images[i], geometry, placed = _read_row(csv, frame, i, columns, preprocess)
        paths.append(str(image_path.resolve()))
        region[i] = torch.from_numpy(geometry.region())
        for column, mask in placed.items():
            masks[column][i] = torch.from_numpy(mask)
            present[column][i] = True
    if "lungs" in masks:
        _derive(masks, present, region, body_margin * size)
    frame = frame.reset_index(drop=True).copy()
    frame["path"] = paths
    return MaskSet(folder, csv, size, frame, images, masks, present, tuple(columns))
