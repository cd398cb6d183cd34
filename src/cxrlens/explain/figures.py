"""Heat-map overlays and grid figures for attribution maps (matplotlib, Agg; no pyplot state).

* ``overlay(image, attribution, signed=False, clip_percentile=99)`` -> RGB uint8 [H, W, 3]: the
  X-ray in grey with the map blended on top, as in the study (magma, outliers clipped). Signed maps
  (DeepLIFT, IG, ...) use a diverging blue-white-red map with symmetric limits.
* ``grid_figure(cells, row_labels, col_labels, path)``: a labelled grid of overlays (models x
  methods, methods x classes, ...) saved as a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg  # drawn off-screen, pyplot never used
from matplotlib.figure import Figure

from cxrlens.errors import CxrlensError
from cxrlens.io import save_figure
from cxrlens.runs import atomic_write_bytes


def _as_2d(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3):  # [C, H, W]: grey image / channel-summed map
        array = array.mean(0)
    if array.ndim != 2:
        raise CxrlensError(f"{name} must be a 2-D array [height, width], got shape {list(array.shape)}")
    return np.nan_to_num(array)


def normalise(attribution: np.ndarray | torch.Tensor, signed: bool = False,
              clip_percentile: float = 99.0) -> np.ndarray:
    """Scale a map to [0, 1] (unsigned: |map|) or [-1, 1] (signed) by the given percentile of its
    absolute values, clipping the outliers above it."""
    values = _as_2d(attribution, "attribution")
    if not 0 < clip_percentile <= 100:
        raise CxrlensError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
    magnitude = np.abs(values)
    scale = float(np.percentile(magnitude, clip_percentile))
    if scale <= 0:
        scale = float(magnitude.max())
    if scale <= 0:
        return np.zeros_like(values)
    if signed:
        return np.clip(values / scale, -1, 1)
    return np.clip(magnitude / scale, 0, 1)


def overlay(
    image: np.ndarray | torch.Tensor,
    attribution: np.ndarray | torch.Tensor,
    signed: bool = False,
    clip_percentile: float = 99.0,
    alpha: float = 0.5,
    cmap: str | None = None,
) -> np.ndarray:
    """Blend an attribution map over a grey image in [0, 1]; returns RGB uint8 [H, W, 3].

    Unsigned maps show |attribution| with magma over the whole image; signed maps use a diverging
    map (default ``RdBu_r``) whose opacity grows with |attribution|, so unimportant regions show
    the X-ray unchanged.
    """
    grey = np.clip(_as_2d(image, "image"), 0, 1)
    norm = normalise(attribution, signed, clip_percentile)
    if norm.shape != grey.shape:
        raise CxrlensError(f"attribution shape {list(norm.shape)} differs from image shape {list(grey.shape)}")
    base = np.repeat(grey[..., None], 3, axis=2)
    if signed:
        colours = colormaps[cmap or "RdBu_r"]((norm + 1) / 2)[..., :3]
        weight = alpha * np.abs(norm)[..., None]
    else:
        colours = colormaps[cmap or "magma"](norm)[..., :3]
        weight = np.full((*norm.shape, 1), alpha, dtype=np.float32)
    blended = (1 - weight) * base + weight * colours
    return (np.clip(blended, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Save an RGB uint8 array as a PNG, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def grid_figure(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str | None = None,
    cell_inches: float = 2.2,
    dpi: int = 100,
) -> Path:
    """Save a grid of RGB images (rows x columns, ``None`` = empty cell) with labels as a PNG.

    Typical uses: models x methods for one class, or methods x classes for one model.
    """
    n_rows, n_cols = len(cells), max((len(row) for row in cells), default=0)
    if n_rows == 0 or n_cols == 0:
        raise CxrlensError("grid_figure needs at least one cell")
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise CxrlensError(
            f"grid_figure got {len(row_labels)} row and {len(col_labels)} column labels for a "
            f"{n_rows}x{n_cols} grid"
        )
    fig = Figure(figsize=(cell_inches * n_cols + 0.6, cell_inches * n_rows + (0.5 if title else 0.2)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            cell = cells[r][c] if c < len(cells[r]) else None
            if cell is not None:
                ax.imshow(cell, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(cell is not None)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)
