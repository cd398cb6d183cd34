"""One home for the small output helpers every stage shares: unique names, strict JSON, PNG figures.

* :func:`unique_names` — distinct display / file names for runs that share a folder name
  (``r18``, ``r18-2``, ``r18-3``);
* :func:`to_jsonable`, :func:`json_text`, :func:`write_json` — strict JSON (RFC 8259 has no NaN or
  infinity: both become ``null``), numpy scalars and arrays, paths and tuples converted, written
  atomically;
* :func:`figure_png`, :func:`save_figure` — a matplotlib :class:`~matplotlib.figure.Figure` (the
  object-oriented API: no pyplot state, no ``matplotlib.use``) as PNG bytes or an atomically written
  PNG file.

Atomic writes themselves (temporary file + rename) live in :mod:`cxrlens.runs`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrlens.runs import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def unique_names(names: Iterable[str]) -> list[str]:
    """The names in order, a repeated one suffixed ``-2``, ``-3``, ... (skipping suffixes already taken)."""
    given = list(names)
    taken = set(given)
    seen: set[str] = set()
    out = []
    for name in given:
        candidate, k = name, 2
        while candidate in seen or (candidate != name and candidate in taken):
            candidate, k = f"{name}-{k}", k + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def to_jsonable(value: Any) -> Any:
    """``value`` with only JSON types: numpy scalars and arrays, tuples, sets and paths converted;
    NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # a torch tensor, without importing torch
        return to_jsonable(value.tolist())
    return value


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`to_jsonable`); raises on anything else not serialisable."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path``, atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, json_text(obj, indent))
    return path


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes (drawn off-screen; the figure holds no global state to close)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib Figure as a PNG file, atomically; returns the path."""
    return atomic_write_bytes(path, figure_png(fig, dpi))


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm progress bar, drawn on a terminal only (tqdm's ``disable=None``): a log or a pipe gets no
    carriage-return noise, and an error stays the one line on stderr."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, **kwargs)
