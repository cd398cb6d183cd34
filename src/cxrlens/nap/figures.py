"""NAP figures (matplotlib's object-oriented Figure API; saved by :func:`cxrlens.io.save_figure`):
groups x top feature maps of a layer, the mean input per group, and the share of dead maps."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from cxrlens.nap.profile import NapResult


def _as_image(a: np.ndarray) -> np.ndarray:
    """A per-map array [h, w] or [L] (or [1, 1]) as something imshow draws."""
    return a if a.ndim == 2 else a.reshape(1, -1)


def _mosaic(cells: list[list[np.ndarray]]) -> tuple[np.ndarray, list[float], list[float]]:
    """Tile equally shaped 2-D cells into one array with NaN gaps (one imshow is far faster than a
    subplot per cell); returns the array and the cell centres along x and y for tick labels."""
    h, w = cells[0][0].shape
    gap = max(1, round(max(h, w) / 10))
    rows, cols = len(cells), len(cells[0])
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = cell
    xs = [c * (w + gap) + (w - 1) / 2 for c in range(cols)]
    ys = [r * (h + gap) + (h - 1) / 2 for r in range(rows)]
    return out, xs, ys


def _bwr():
    import matplotlib

    return matplotlib.colormaps["bwr"].with_extremes(bad="#d9d9d9")  # grey gaps between cells


def plot_layer_grid(result: NapResult, layer: str) -> Figure:
    """Groups x top feature maps of contrastive NAPs, 'bwr' with symmetric limits per map.

    Each column (map) is scaled by its own largest |value| over the groups, so white is the mean of
    the groups and full red / blue is that map's extreme; the limits are written under the columns."""
    nap = result.layers[layer]
    rows = [i for i, c in enumerate(result.counts) if c > 0]
    cols = list(nap.top_maps)
    fig = Figure(figsize=(1.1 * max(len(cols), 1) + 2.4, 1.1 * len(rows) + 1.4))
    ax = fig.add_axes((0.2, 0.14, 0.78, 0.7))
    weighted = f", activation x d({result.gradient_class})/d act" if result.gradient_class else ""
    fig.suptitle(
        f"{result.model} {layer}: contrastive NAPs, top {len(cols)} maps by mean |contrast|{weighted}\n"
        f"(blue < mean of groups < red, symmetric limits per map; {nap.dead.sum()}/{nap.dead.size} maps dead)",
        fontsize=8,
    )
    if not cols or not rows:
        ax.text(0.5, 0.5, "no live feature map", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    limits = []
    for m in cols:
        column = np.abs(nap.contrastive[rows, m])
        limit = float(np.nanmax(column)) if np.isfinite(column).any() else 0.0
        limits.append(limit if limit > 0 else 1.0)
    cells = [[_as_image(nap.contrastive[g, m]) / lim for m, lim in zip(cols, limits, strict=True)] for g in rows]
    mosaic, xs, ys = _mosaic(cells)
    ax.imshow(mosaic, cmap=_bwr(), vmin=-1, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xticks(xs, [f"map {m}\n±{lim:.2g}" for m, lim in zip(cols, limits, strict=True)], fontsize=7)
    ax.set_yticks(ys, [f"{result.groups[g]}\n(n={result.counts[g]})" for g in rows], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def plot_inputs(result: NapResult) -> Figure:
    """Mean input image per group (grey) and its contrast to the mean of the groups ('bwr')."""
    cols = [i for i, c in enumerate(result.counts) if c > 0]
    means = result.input_mean[cols].mean(axis=1)  # over colour channels (grey images repeated x3)
    contrast = result.input_contrast[cols].mean(axis=1)
    limit = float(np.nanmax(np.abs(contrast))) or 1.0
    fig = Figure(figsize=(2.0 * len(cols) + 1.0, 4.6))
    fig.suptitle(f"{result.model}: mean input per group and its difference to the mean of the groups", fontsize=8)
    labels = [f"{result.groups[g]} (n={result.counts[g]})" for g in cols]
    for row, (images, cmap, vmin, vmax, name) in enumerate((
        (means, "gray", float(np.nanmin(means)), float(np.nanmax(means)), "mean input"),
        (contrast, _bwr(), -limit, limit, f"contrast\n(±{limit:.2g})"),
    )):
        ax = fig.add_axes((0.1, 0.5 - 0.43 * row, 0.88, 0.38))
        mosaic, xs, ys = _mosaic([list(images)])
        ax.imshow(mosaic, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks(xs, labels if row == 0 else [""] * len(xs), fontsize=7)
        ax.xaxis.set_ticks_position("top")
        ax.set_yticks(ys, [name], fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    return fig


def plot_dead_shares(results: Mapping[str, NapResult]) -> Figure:
    """Bars of the share of dead feature maps per layer, one colour per model."""
    total = sum(len(r.layers) for r in results.values())
    fig = Figure(figsize=(max(4.0, 0.45 * total + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    x, ticks = 0, []
    for k, (name, result) in enumerate(results.items()):
        shares = [nap.dead_share * 100 for nap in result.layers.values()]
        positions = np.arange(x, x + len(shares))
        ax.bar(positions, shares, color=f"C{k % 10}", label=name)
        ticks += list(zip(positions, result.layers, strict=True))
        x += len(shares) + 1
    ax.set_xticks([p for p, _ in ticks], [n for _, n in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("dead feature maps (%)")
    ax.set_ylim(0, max(5.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7)
    ax.set_title("Feature maps constant over every image", fontsize=9)
    return fig
