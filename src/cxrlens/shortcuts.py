"""Planted shortcuts: artifacts with a known location, put into a data set on purpose.

An explanation method, or a shortcut detector, can only be checked against a known answer. Following
DeGrave et al. (2021) and Sun et al. (MICCAI 2023), we plant artifacts that real X-rays carry into
the images of one class, so we know what a model that relies on them must look at:

* ``marker``: burned-in text (a side tag such as ``L`` or ``PORTABLE``), rendered with Pillow's
  built-in bitmap font (no font file needed) and scaled to the asked height;
* ``patch``: a small bright disc, like an ECG electrode or a button;
* ``texture``: a grating added to a square region (an intensity and texture change);
* ``padding``: black bars added to two (or one) sides, which change the image's aspect ratio, so the
  zero padding of the square model input differs: the shortcut that separates sources with different
  image shapes.

:func:`plant` is a deterministic function of (image, artifact settings, seed) that returns the changed
image and the artifact's pixel mask. :func:`plant_dataset` writes a planted copy of a data set: the
artifact on exactly ``round(rate * n)`` of one class's images in each planted split (train and val),
optionally on ``round(other_rate * n)`` of the other images, with patient-level splits unchanged, as a
normal ``labels.csv`` (so every other command works on it) plus mask files and three versions of the
test split: clean, aligned (artifact on every image of the class, none elsewhere) and swapped (on
every other image, none of the class). :func:`plant_mask_set` does the same to a mask folder such as
``data/lungmasks``, so the scorecard and the shortcut detector can be run on planted images.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from cxrlens.data import Manifest, Preprocess, load_manifest, read_image
from cxrlens.errors import CxrlensError
from cxrlens.runs import atomic_write_bytes, atomic_write_text
from cxrlens.taxonomy import get_taxonomy

ARTIFACTS = ("marker", "patch", "texture", "padding")
# Where an artifact's centre may lie, as (top, bottom, left, right) shares of the image's height and width.
BANDS: dict[str, tuple[float, float, float, float]] = {
    "top": (0.02, 0.15, 0.1, 0.9),
    "bottom": (0.85, 0.98, 0.1, 0.9),
    "left": (0.1, 0.9, 0.02, 0.15),
    "right": (0.1, 0.9, 0.85, 0.98),
    "top-left": (0.02, 0.15, 0.02, 0.15),
    "top-right": (0.02, 0.15, 0.85, 0.98),
    "any": (0.05, 0.95, 0.05, 0.95),
}
PADDING_SIDES = {"top-bottom": "tb", "left-right": "lr", "top": "t", "bottom": "b", "left": "l", "right": "r"}
DEFAULT_BAND = {"marker": "top", "patch": "any", "texture": "any", "padding": "top-bottom"}
DEFAULT_SIZE = {"marker": 0.05, "patch": 0.06, "texture": 0.1, "padding": 0.1}
TEST_VERSIONS = ("clean", "aligned", "swapped")


@dataclass(frozen=True)
class ArtifactConfig:
    """One kind of artifact and its look.

    size: the artifact's extent as a share of the image's short side: the marker's letter height, the
    patch's diameter, the texture square's side, each padding bar's thickness (of the padded side);
    None: the kind's default (:data:`DEFAULT_SIZE`).
    band: where it goes (:data:`BANDS`; padding: which sides, :data:`PADDING_SIDES`); None: the kind's
    default (marker top, patch and texture anywhere, padding top and bottom).
    contrast: marker and patch brightness between the image's dark (0) and bright (1) clip levels, the
    0.5th and 99.5th percentiles that preprocessing maps to 0 and 1; texture: the grating's amplitude
    as a share of that range.
    text: the marker's letters.
    """

    kind: str = "marker"
    size: float | None = None
    band: str | None = None
    contrast: float = 1.0
    text: str = "PORTABLE"

    @property
    def where(self) -> str:
        return self.band or DEFAULT_BAND.get(self.kind, "any")

    @property
    def extent(self) -> float:
        return self.size if self.size is not None else DEFAULT_SIZE.get(self.kind, 0.05)

    def validate(self) -> ArtifactConfig:
        """Raise :class:`CxrlensError` for settings that cannot make an artifact; return self."""
        if self.kind not in ARTIFACTS:
            raise CxrlensError(f"unknown artifact '{self.kind}'; choose one of: {', '.join(ARTIFACTS)}")
        bands = PADDING_SIDES if self.kind == "padding" else BANDS
        if self.where not in bands:
            raise CxrlensError(f"unknown band '{self.where}' for a {self.kind}; choose one of: {', '.join(bands)}")
        if not (0 < self.extent <= 1) or not math.isfinite(self.extent):
            raise CxrlensError(
                f"artifact size {self.extent} is not in (0, 1]: it is a share of the image's short side, so an "
                "artifact larger than the image cannot be planted; give e.g. --artifact-size 0.05"
            )
        if not (0 < self.contrast <= 4) or not math.isfinite(self.contrast):
            raise CxrlensError(f"artifact contrast {self.contrast} is not in (0, 4]; 1 = the image's bright level")
        if self.kind == "marker":
            if not self.text.strip() or not self.text.isprintable() or not self.text.isascii():
                raise CxrlensError(f"marker text {self.text!r} must be printable ASCII letters, e.g. L or PORTABLE")
            width = self.extent * text_aspect(self.text) + 2 * MARKER_MARGIN * self.extent
            if width > 1:
                raise CxrlensError(
                    f"marker '{self.text}' at size {self.extent} is {width:.2f}x as wide as an image's short side: "
                    "the artifact is larger than the image; lower --artifact-size or shorten --text"
                )
        return self

    def describe(self) -> str:
        what = f"'{self.text}' marker" if self.kind == "marker" else self.kind
        return f"{what} (size {self.extent:g} of the short side, {self.where}, contrast {self.contrast:g})"


MARKER_MARGIN = 0.25  # the marker's mask: its letters' box grown by this share of the letter height


@dataclass
class Planted:
    """An image with an artifact: ``image`` [H', W'] raw intensities, ``mask`` bool [H', W'], and the
    rows / columns of padding added on each side (``pad``: top, bottom, left, right; zeros unless
    the artifact is ``padding``) so masks of the original image can be carried over."""

    image: np.ndarray
    mask: np.ndarray
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)

    def carry(self, mask: np.ndarray) -> np.ndarray:
        """A mask of the original image, brought to the planted image (padded where bars were added)."""
        top, bottom, left, right = self.pad
        return np.pad(mask, ((top, bottom), (left, right))) if any(self.pad) else mask


# --- the artifacts -------------------------------------------------------------------------------


def _letters(text: str) -> np.ndarray:
    """The ink of ``text`` in Pillow's built-in bitmap font, cropped to its bounding box (bool)."""
    font = ImageFont.load_default_imagefont()
    _, _, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right + 2, bottom + 2))
    ImageDraw.Draw(canvas).text((1, 1), text, fill=255, font=font)
    ink = np.asarray(canvas) > 0
    rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def text_aspect(text: str) -> float:
    """Width / height of ``text``'s ink in the bitmap font."""
    ink = _letters(text)
    return ink.shape[1] / ink.shape[0]


def _levels(pixels: np.ndarray) -> tuple[float, float]:
    """The dark and bright clip levels preprocessing maps to 0 and 1."""
    defaults = Preprocess()
    low, high = np.percentile(pixels, [defaults.clip_low, defaults.clip_high])
    return float(low), float(max(high, low + 1.0))


def _place(shape: tuple[int, int], box: tuple[int, int], band: str, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``box`` (h, w) whose centre is drawn in ``band``, kept inside the image."""
    height, width = shape
    top, bottom, left, right = BANDS[band]
    cy, cx = rng.uniform(top, bottom) * height, rng.uniform(left, right) * width
    y = int(np.clip(round(cy - box[0] / 2), 0, height - box[0]))
    x = int(np.clip(round(cx - box[1] / 2), 0, width - box[1]))
    return y, x


def _pixels(share: float, short: int, what: str) -> int:
    n = round(share * short)
    if n < 1:
        raise CxrlensError(f"the {what} would be {share * short:.2f} px on a {short} px image; raise --artifact-size")
    return n


def _marker(pixels: np.ndarray, config: ArtifactConfig, rng: np.random.Generator) -> Planted:
    short = min(pixels.shape)
    height = _pixels(config.extent, short, "marker")
    ink = _letters(config.text)
    width = max(1, round(ink.shape[1] * height / ink.shape[0]))
    letters = np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST))
    margin = math.ceil(MARKER_MARGIN * height)
    box = (height + 2 * margin, width + 2 * margin)
    if box[0] > pixels.shape[0] or box[1] > pixels.shape[1]:
        raise CxrlensError(
            f"the '{config.text}' marker ({box[1]}x{box[0]} px) is larger than the {pixels.shape[1]}x"
            f"{pixels.shape[0]} image; lower --artifact-size or shorten --text"
        )
    y, x = _place(pixels.shape, box, config.where, rng)
    low, high = _levels(pixels)
    out = pixels.copy()
    region = out[y + margin : y + margin + height, x + margin : x + margin + width]
    region[letters > 127] = low + config.contrast * (high - low)
    mask = np.zeros(pixels.shape, dtype=bool)
    mask[y : y + box[0], x : x + box[1]] = True
    return Planted(out, mask)


def _patch(pixels: np.ndarray, config: ArtifactConfig, rng: np.random.Generator) -> Planted:
    diameter = _pixels(config.extent, min(pixels.shape), "patch")
    y, x = _place(pixels.shape, (diameter, diameter), config.where, rng)
    yy, xx = np.mgrid[:diameter, :diameter] + 0.5
    disc = (yy - diameter / 2) ** 2 + (xx - diameter / 2) ** 2 <= (diameter / 2) ** 2
    low, high = _levels(pixels)
    out = pixels.copy()
    mask = np.zeros(pixels.shape, dtype=bool)
    mask[y : y + diameter, x : x + diameter] = disc
    out[mask] = low + config.contrast * (high - low)
    return Planted(out, mask)


def _texture(pixels: np.ndarray, config: ArtifactConfig, rng: np.random.Generator) -> Planted:
    side = _pixels(config.extent, min(pixels.shape), "texture square")
    y, x = _place(pixels.shape, (side, side), config.where, rng)
    period = max(4.0, side / 3)  # >= 4 px so the grating survives down-sampling by 2
    phase = rng.uniform(0, 2 * np.pi, size=2)
    yy, xx = np.mgrid[:side, :side]
    grating = np.cos(2 * np.pi * yy / period + phase[0]) * np.cos(2 * np.pi * xx / period + phase[1])
    low, high = _levels(pixels)
    out = pixels.copy()
    region = out[y : y + side, x : x + side]
    region += config.contrast * (high - low) / 2 * grating.astype(out.dtype)
    np.clip(out, pixels.min(), pixels.max(), out=out)
    mask = np.zeros(pixels.shape, dtype=bool)
    mask[y : y + side, x : x + side] = True
    return Planted(out, mask)


def _padding(pixels: np.ndarray, config: ArtifactConfig) -> Planted:
    sides = PADDING_SIDES[config.where]
    height, width = pixels.shape
    bar_h = _pixels(config.extent, height, "padding bar") if set(sides) & set("tb") else 0
    bar_w = _pixels(config.extent, width, "padding bar") if set(sides) & set("lr") else 0
    pad = (bar_h * ("t" in sides), bar_h * ("b" in sides), bar_w * ("l" in sides), bar_w * ("r" in sides))
    # bars at the image's darkest value: preprocessing clips them to 0, exactly like its own zero padding
    out = np.pad(pixels, ((pad[0], pad[1]), (pad[2], pad[3])), constant_values=float(pixels.min()))
    mask = np.ones(out.shape, dtype=bool)
    mask[pad[0] : pad[0] + height, pad[2] : pad[2] + width] = False
    return Planted(out, mask, pad)


def plant(pixels: np.ndarray, config: ArtifactConfig, seed: int) -> Planted:
    """The image ``pixels`` [H, W] (raw intensities, as :func:`cxrlens.data.read_image` returns) with
    the artifact ``config`` added, and the artifact's mask; the same (image, config, seed) always gives
    the same result."""
    config.validate()
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise CxrlensError(f"plant needs a 2-D image of at least 2x2 pixels, got shape {pixels.shape}")
    rng = np.random.default_rng(seed)
    if config.kind == "marker":
        return _marker(pixels, config, rng)
    if config.kind == "patch":
        return _patch(pixels, config, rng)
    if config.kind == "texture":
        return _texture(pixels, config, rng)
    return _padding(pixels, config)


def image_seed(seed: int, key: str) -> int:
    """A per-image seed: the same image gets the same artifact whatever else is planted."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**32


# --- files ---------------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    """An image as lossless PNG: 8 bit when its values lie in [0, 255] (rounded), else 16 bit after an
    affine rescale (preprocessing clips at percentiles, so that rescale changes nothing downstream)."""
    if pixels.min() >= 0 and pixels.max() <= 255:
        img = Image.fromarray(np.rint(pixels).astype(np.uint8), mode="L")
    else:
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / max(high - low, 1e-12) * 65535
        img = Image.fromarray(np.rint(scaled).astype(np.uint16), mode="I;16")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _staging(out: Path) -> Path:
    """A fresh folder beside ``out`` (same depth, so relative paths stay valid after the rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "images").mkdir(parents=True)
    (stage / "masks").mkdir()
    return stage


def _publish(stage: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)


def planted_count(n: int, rate: float) -> int:
    """How many of ``n`` images get the artifact at ``rate``: round half up, so 0.5 of 5 is 3."""
    return int(math.floor(rate * n + 0.5))


@dataclass(frozen=True)
class PlantConfig:
    """A planted copy of a data set.

    out: folder to write; data: the data set (folder or manifest; '' = the bundled data/cxr3);
    cls: the class whose images carry the artifact; rate: the share p of that class's images in each
    planted split that get it; other_rate: the share q of the other images that get it too (real
    shortcuts are imperfect); seed: which images are chosen and where each artifact goes.
    """

    out: str
    data: str = ""
    cls: str = "COVID-19"
    artifact: ArtifactConfig = field(default_factory=ArtifactConfig)
    rate: float = 1.0
    other_rate: float = 0.0
    seed: int = 0
    taxonomy: str = "cxr3"
    planted_splits: tuple[str, ...] = ("train", "val")
    test_split: str = "test"

    def validate(self) -> PlantConfig:
        self.artifact.validate()
        for name, value in (("rate", self.rate), ("other rate", self.other_rate)):
            if not (0 <= value <= 1) or not math.isfinite(value):
                raise CxrlensError(f"{name} {value} is outside [0, 1]; it is the share of images that get the artifact")
        get_taxonomy(self.taxonomy).index(self.cls)
        return self


@dataclass
class PlantedDataset:
    """What :func:`plant_dataset` wrote: the folder, its manifests and the counts per split."""

    out: Path
    cls: str
    counts: dict[str, dict[str, int]]  # split -> {class, class_planted, other, other_planted}
    files: dict[str, str]

    @property
    def labels(self) -> Path:
        return self.out / "labels.csv"

    def test_set(self, version: str) -> Path:
        if version not in TEST_VERSIONS:
            raise CxrlensError(f"unknown test set '{version}'; choose one of: {', '.join(TEST_VERSIONS)}")
        return self.out / f"test_{version}.csv"

    @property
    def aligned_masks(self) -> Path:
        return self.out / "aligned_masks.csv"


def class_index(manifest: Manifest, cls: str) -> int:
    """The column of ``cls`` in the manifest's targets; an error when no image has that class."""
    index = manifest.taxonomy.index(cls)
    if not manifest.targets[:, index].any():
        present = [c for c, n in manifest.class_counts().items() if n]
        raise CxrlensError(
            f"{manifest.origin}: no image has class '{manifest.taxonomy.classes[index]}'; the data has "
            f"{', '.join(present)}"
        )
    return index


def _choose(manifest: Manifest, config: PlantConfig, index: int) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """Which rows get the artifact (bool [n]), exactly ``planted_count`` per split and group."""
    chosen = np.zeros(len(manifest), dtype=bool)
    counts = {}
    splits = manifest.frame["split"].to_numpy()
    in_class = manifest.targets[:, index] > 0.5
    for s, split in enumerate(config.planted_splits):
        entry = {}
        for g, (members, rate) in enumerate(((in_class, config.rate), (~in_class, config.other_rate))):
            rows = np.nonzero((splits == split) & members)[0]
            k = planted_count(len(rows), rate)
            rng = np.random.default_rng([config.seed, s, g])
            chosen[rng.permutation(rows)[:k]] = True
            name = "class" if g == 0 else "other"
            entry[name], entry[f"{name}_planted"] = int(len(rows)), int(k)
        counts[split] = entry
    return chosen, counts


def _file_name(path: str) -> str:
    return f"{Path(path).stem}-{zlib.crc32(path.encode()):08x}.png"


def _plant_file(path: str, config: PlantConfig, stage: Path, key: str) -> tuple[str, str]:
    """Plant one image file into ``stage``; returns the planted image's and its mask's paths."""
    planted = plant(read_image(path), config.artifact, image_seed(config.seed, key))
    name = _file_name(path)
    image_path, mask_path = stage / "images" / name, stage / "masks" / name
    atomic_write_bytes(image_path, png_bytes(planted.image))
    atomic_write_bytes(mask_path, mask_png_bytes(planted.mask))
    return str(image_path), str(mask_path)


def _relative(value: str, folder: Path) -> str:
    return os.path.relpath(value, folder) if value else ""


def _write_table(frame: pd.DataFrame, csv: Path, path_columns: tuple[str, ...]) -> None:
    frame = frame.copy()
    for column in path_columns:
        if column in frame:
            frame[column] = [_relative(v, csv.parent) for v in frame[column]]
    if "cls" not in frame and "finding" in frame:
        frame["cls"] = frame["finding"]
    atomic_write_text(csv, frame.to_csv(index=False))


def _data_key(path: str, manifest: Manifest) -> str:
    """A stable key for an image: its path relative to the data set (so seeds do not depend on where
    the repository lies)."""
    return os.path.relpath(path, Path(manifest.origin).parent)


def _settings(config: PlantConfig, manifest: Manifest) -> dict:
    return {**asdict(config), "data": str(manifest.origin), "out": str(Path(config.out).resolve())}


def plant_dataset(config: PlantConfig, progress: bool = False) -> PlantedDataset:
    """Write a planted copy of ``config.data`` to ``config.out`` (see the module docstring).

    Files: ``labels.csv`` (every image; planted ones point to ``images/*.png``; columns ``artifact``,
    ``artifact_mask`` and ``original_path`` added; the test split is clean), ``test_clean.csv``,
    ``test_aligned.csv``, ``test_swapped.csv`` and ``test_planted.csv`` (the test split only, the last
    with the artifact on every image), ``aligned_masks.csv`` (a mask folder CSV of the aligned test
    images that carry the artifact, column ``artifact``), ``masks/*.png`` and ``plant.json``. Nothing
    is left behind when something fails; a folder already planted with the same settings is reused.
    """
    config.validate()
    manifest = load_manifest(config.data or None, get_taxonomy(config.taxonomy))
    index = class_index(manifest, config.cls)
    present = set(manifest.frame["split"])
    for split in (*config.planted_splits, config.test_split):
        if split not in present:
            raise CxrlensError(f"{manifest.origin}: no '{split}' split to plant; make splits with `cxrlens split`")
    out = Path(config.out)
    settings = _settings(config, manifest)
    if (out / "plant.json").is_file():
        saved = json.loads((out / "plant.json").read_text())
        if saved.get("settings") == json.loads(json.dumps(settings)):
            return PlantedDataset(out, saved["class"], saved["counts"], saved["files"])
        raise CxrlensError(f"{out} holds a planted data set with other settings; choose another --out or delete it")
    chosen, counts = _choose(manifest, config, index)
    stage = _staging(out)
    try:
        record = _write_planted(manifest, config, index, chosen, stage, progress)
        record = {"settings": settings, "class": manifest.taxonomy.classes[index],
                  "counts": {**counts, **record["counts"]}, "files": {k: str(out / k) for k in record["files"]}}
        atomic_write_text(stage / "plant.json", json.dumps(record, indent=2))
        load_manifest(stage / "labels.csv", manifest.taxonomy)  # what we wrote reads back
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return PlantedDataset(out, record["class"], record["counts"], record["files"])


def _write_planted(manifest: Manifest, config: PlantConfig, index: int, chosen: np.ndarray, stage: Path,
                   progress: bool) -> dict:
    """Plant the chosen and the test images into ``stage`` and write the manifests there."""
    from cxrlens.io import progress_bar

    frame = manifest.frame.copy()
    is_test = (frame["split"] == config.test_split).to_numpy()
    in_class = manifest.targets[:, index] > 0.5
    planted_path = {}
    rows = np.nonzero(chosen | is_test)[0]
    for i in progress_bar(rows, desc=f"planting {config.artifact.kind}", enabled=progress, leave=False):
        path = frame["path"].iat[i]
        planted_path[i] = _plant_file(path, config, stage, _data_key(path, manifest))
    frame["original_path"] = frame["path"]
    frame["artifact"], frame["artifact_mask"] = 0, ""
    tables = _tables(frame, planted_path, chosen, is_test, in_class)
    for name, table in tables.items():
        _write_table(table, stage / name, ("path", "artifact_mask", "original_path"))
    aligned = tables["test_aligned.csv"]
    aligned = aligned[aligned["artifact"] == 1]
    masks = pd.DataFrame({"image": aligned["path"], "artifact": aligned["artifact_mask"]})
    for column in ("cls", "finding", "patient_group", "source"):
        if column in aligned:
            masks[column] = aligned[column].to_numpy()
    _write_table(masks, stage / "aligned_masks.csv", ("image", "artifact"))
    test_counts = {"class": int((is_test & in_class).sum()), "other": int((is_test & ~in_class).sum())}
    return {"counts": {config.test_split: test_counts}, "files": [*tables, "aligned_masks.csv"]}


def _tables(frame: pd.DataFrame, planted: dict[int, tuple[str, str]], chosen: np.ndarray, is_test: np.ndarray,
            in_class: np.ndarray) -> dict[str, pd.DataFrame]:
    """labels.csv (train/val planted, test clean) and the four versions of the test split."""

    def with_artifact(rows: np.ndarray) -> pd.DataFrame:
        table = frame.copy()
        for i in np.nonzero(rows)[0]:
            table.iat[i, table.columns.get_loc("path")] = planted[i][0]
            table.iat[i, table.columns.get_loc("artifact_mask")] = planted[i][1]
            table.iat[i, table.columns.get_loc("artifact")] = 1
        return table

    test = is_test
    return {
        "labels.csv": with_artifact(chosen & ~test),
        "test_clean.csv": frame[test],
        "test_aligned.csv": with_artifact(test & in_class)[test],
        "test_swapped.csv": with_artifact(test & ~in_class)[test],
        "test_planted.csv": with_artifact(test)[test],
    }


def _mask_row_labels(row: pd.Series, taxonomy_name: str) -> np.ndarray | None:
    taxonomy = get_taxonomy(taxonomy_name)
    for column in ("finding", "cls"):
        value = str(row.get(column, "") or "").strip()
        if value:
            try:
                return taxonomy.encode(value)
            except KeyError:
                continue
    return None


def _is_mask_column(values: pd.Series) -> bool:
    """Every non-empty value is an image file name (the rule of ``cxrlens.score.masks``)."""
    filled = [v.lower() for v in values if v.strip()]
    return bool(filled) and all(v.endswith((".png", ".bmp", ".tif", ".tiff", ".gif")) for v in filled)


def plant_mask_set(mask_dir: str | Path, out: str | Path, cls: str, artifact: ArtifactConfig, seed: int = 0,
                   taxonomy: str = "cxr3") -> Path:
    """A copy of a mask folder (``masks.csv`` + files, e.g. ``data/lungmasks``) where every image
    labelled ``cls`` carries the artifact (the aligned version), with a new mask column ``artifact``.
    Masks of a planted image are carried over (padded with it for the ``padding`` artifact).
    Returns the new ``masks.csv``. Nothing is left behind when something fails."""
    artifact.validate()
    index = get_taxonomy(taxonomy).index(cls)
    mask_dir, out = Path(mask_dir), Path(out)
    csv = mask_dir if mask_dir.suffix.lower() == ".csv" else mask_dir / "masks.csv"
    if not csv.is_file():
        raise CxrlensError(f"no masks.csv in {mask_dir}; give a mask folder like data/lungmasks")
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if "image" not in frame:
        raise CxrlensError(f"{csv}: no 'image' column")
    mask_columns = [c for c in frame.columns if c != "image" and _is_mask_column(frame[c])]
    stage = _staging(out)
    try:
        table = frame.copy()
        table["artifact"] = ""
        for i, row in frame.iterrows():
            for column in ["image", *mask_columns]:
                if row[column]:
                    table.at[i, column] = str((csv.parent / row[column]).resolve())
            labels = _mask_row_labels(row, taxonomy)
            if labels is None or labels[index] < 0.5:
                continue
            _plant_mask_row(table, i, csv.parent / row["image"], artifact, seed, stage, mask_columns)
        _write_table(table, stage / "masks.csv", ("image", "artifact", *mask_columns))
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out / "masks.csv"


def _plant_mask_row(table: pd.DataFrame, i: int, image: Path, artifact: ArtifactConfig, seed: int, stage: Path,
                    mask_columns: list[str]) -> None:
    planted = plant(read_image(image), artifact, image_seed(seed, image.name))
    name = _file_name(str(image))
    atomic_write_bytes(stage / "images" / name, png_bytes(planted.image))
    atomic_write_bytes(stage / "masks" / f"artifact-{name}", mask_png_bytes(planted.mask))
    table.at[i, "image"] = str(stage / "images" / name)
    table.at[i, "artifact"] = str(stage / "masks" / f"artifact-{name}")
    if not any(planted.pad):
        return
    for column in mask_columns:  # the bars changed the image's size: pad its masks the same way
        source = table.at[i, column]
        if source:
            with Image.open(source) as img:
                carried = planted.carry(np.asarray(img.convert("L")) > 0)
            target = stage / "masks" / f"{column}-{name}"
            atomic_write_bytes(target, mask_png_bytes(carried))
            table.at[i, column] = str(target)
