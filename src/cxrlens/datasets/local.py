"""Our own layouts and Cohen's: ``labels.csv``, Cohen's ``metadata.csv``, a folder per class.

* ``labels``: our ``labels.csv`` (``path`` + ``cls``, ``finding`` or ``label``; optional ``patient_group`` /
  ``patient_id``, ``split``, ``source``, ``view``; ``label:<class>`` columns as :func:`cxrlens.data.write_manifest`
  writes them), as in ``data/cxr3``. Paths are relative to the CSV's folder and may lie anywhere.
* ``cohen``: Cohen et al.'s COVID-19 image data collection ``metadata.csv`` (``patientid, finding, view,
  filename`` and ``folder``, images in ``images/``), X-rays only. Findings in both of its formats: the
  early flat one (``COVID-19``, ``Streptococcus``, ``COVID-19, ARDS``) and the later hierarchical one
  (``Pneumonia/Viral/COVID-19``). Rows whose finding names no class of the taxonomy (``todo``, ``Unknown``)
  are left out, as the study did.
* ``folders``: a folder per class (``COVID/``, ``Normal/``, ``Viral Pneumonia/``), optionally below split
  folders (``train/COVID/...``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.build import join_flags, join_paths, read_csv
from cxrlens.datasets.registry import ReadOptions, Table, register_format
from cxrlens.errors import CxrlensError

LABEL_COLUMNS = ("cls", "finding", "label")
COHEN_COLUMNS = ("patientid", "finding", "filename")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _header(path: Path) -> list[str]:
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except Exception:
        return []


def _csv_in(source: Path, name: str) -> Path | None:
    if source.is_dir():
        return source / name if (source / name).is_file() else None
    return source if source.suffix.lower() == ".csv" else None


def _is_labels(source: Path) -> bool:
    csv = _csv_in(source, "labels.csv")
    if csv is None:
        return False
    columns = set(_header(csv))
    return "path" in columns and bool(columns & set(LABEL_COLUMNS))


def _is_cohen(source: Path) -> bool:
    csv = _csv_in(source, "metadata.csv")
    return csv is not None and set(COHEN_COLUMNS) <= set(_header(csv))


@register_format("labels", detect=_is_labels, looks_for="labels.csv with path + cls/finding", priority=10)
def read_labels(source: Path, options: ReadOptions) -> Table:
    """Our labels.csv: path + cls or finding, optional patient_group, split, source, view."""
    from cxrlens.data import LABEL_PREFIX

    csv = (source / "labels.csv" if source.is_dir() else source).resolve()
    rows = read_csv(csv, ["path"], "manifest")
    label_column = next((c for c in LABEL_COLUMNS if c in rows), None)
    if label_column is None:
        raise CxrlensError(f"{csv}: no 'cls', 'finding' or 'label' column; our labels.csv names each image's class")
    # cxr3's cls (covid/pneumonia/normal) is the cleanest label; NIH findings carry extra words
    rows["finding"] = rows["cls" if "cls" in rows else label_column]
    empty = (rows["path"].str.strip() == "").to_numpy()
    if empty.any():
        raise CxrlensError(f"{csv}, row {int(np.argmax(empty)) + 2}: empty 'path'")
    rows["_line"] = np.arange(len(rows)) + 2
    rows["path"] = join_paths(csv.parent, rows["path"])
    table = Table(rows, csv, csv, root=None, label_sep=None, strict=True)
    encoded = [c for c in rows.columns if c.startswith(LABEL_PREFIX)]
    if encoded:  # written by write_manifest: the targets as they were, unknown ones included
        names = tuple(c[len(LABEL_PREFIX):] for c in encoded)
        positive = np.stack([rows[c].eq("1").to_numpy() for c in encoded], axis=1)
        unknown = np.stack([rows[c].eq("").to_numpy() for c in encoded], axis=1)
        table.encoded = (names, join_flags(names, positive), join_flags(names, unknown))
    return table


@register_format("cohen", detect=_is_cohen, looks_for="metadata.csv with patientid, finding, filename",
                 priority=11)
def read_cohen(source: Path, options: ReadOptions) -> Table:
    """Cohen et al.'s COVID-19 image data collection: metadata.csv, X-rays in images/."""
    csv = (source / "metadata.csv" if source.is_dir() else source).resolve()
    rows = read_csv(csv, COHEN_COLUMNS, "Cohen metadata table")
    rows["_line"] = np.arange(len(rows)) + 2
    dropped = {}
    if "modality" in rows:
        xray = rows["modality"].str.upper().isin({"X-RAY", "XRAY", "CR", "DX", ""}).to_numpy()
        dropped["not an X-ray"] = int((~xray).sum())
        rows = rows[xray]
    folder = rows["folder"] if "folder" in rows else pd.Series("images", index=rows.index)
    folder = folder.where(folder.str.strip() != "", "images")
    rows["path"] = join_paths(csv.parent, (f + "/" + n for f, n in zip(folder, rows["filename"], strict=True)))
    rows["patient_group"] = "cohen:" + rows["patientid"].astype(str)
    rows["source"] = "cohen"
    rows["view"] = rows["view"] if "view" in rows else ""
    return Table(rows.reset_index(drop=True), csv, csv, root=csv.parent, label_sep=None, keep_negatives=False,
                 dropped=dropped)


@register_format("folders", detect=lambda source: source.is_dir(),
                 looks_for="class folders with images (COVID/*.png, train/Normal/*.png)", priority=100)
def read_class_folders(source: Path, options: ReadOptions) -> Table:
    """A folder per class, optionally below train/, val/, test/ folders."""
    from cxrlens.data import IMAGE_SUFFIXES
    from cxrlens.datasets.registry import FORMATS

    root = source.resolve()
    records = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue
        split = SPLIT_FOLDERS.get(parts[0].lower(), "") if len(parts) >= 3 else ""
        records.append({"path": str(path), "finding": parts[-2], "split": split, "source": root.name})
    if not records:
        looked = ", ".join(f.looks_for for f in FORMATS.values() if f.name != "folders")
        raise CxrlensError(
            f"{root}: no labels.csv, metadata.csv or class folders with images (e.g. {root}/COVID/*.png); "
            f"no other known layout either (looked for {looked}); name the format with --format"
        )
    return Table(pd.DataFrame(records), root, root, root=root, label_sep=None, strict=True)
