"""RSNA Pneumonia Detection Challenge (2018): 26,684 frontal DICOMs from NIH ChestX-ray14, with boxes.

Layout: ``stage_2_train_labels.csv`` (``patientId, x, y, width, height, Target``; one row per box, one row
with empty coordinates for an image without one), ``stage_2_detailed_class_info.csv`` (``patientId, class``:
``Lung Opacity``, ``Normal``, ``No Lung Opacity / Not Normal``) and ``stage_2_train_images/<patientId>.dcm``.

Labels: ``Target`` 1 -> ``Pneumonia`` (the challenge's lung opacity); class ``Normal`` -> ``No Finding``;
``No Lung Opacity / Not Normal`` -> no positive class (negative for pneumonia and for no finding). RSNA
speaks only about pneumonia and normality, so other classes of a taxonomy are unknown. The boxes
(DICOM pixel coordinates) are localisation ground truth for pneumonia. No official split (the test
labels were never released): make one with ``cxrlens split``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.build import check_values, join_paths, read_csv
from cxrlens.datasets.registry import ReadOptions, Table, register_format
from cxrlens.errors import CxrlensError

LABELS_CSV, CLASSES_CSV, IMAGES = "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv", "stage_2_train_images"
CLASSES = {"Lung Opacity": "Pneumonia", "Normal": "No Finding", "No Lung Opacity / Not Normal": ""}


def _folder(source: Path) -> Path:
    return source.parent if source.is_file() else source


def _boxes(rows: pd.DataFrame, path_of: pd.Series, csv: Path, problems: list[str]) -> pd.DataFrame:
    marked = rows[rows["Target"] == "1"]
    coords = marked[["x", "y", "width", "height"]].apply(pd.to_numeric, errors="coerce")
    broken = coords.isna().any(axis=1) | (coords["width"] <= 0) | (coords["height"] <= 0)
    if broken.any():
        lines = marked["_line"][broken].tolist()
        problems.append(f"{csv}: {int(broken.sum())} rows with Target 1 lack a box with width, height > 0 "
                        f"(row {', row '.join(map(str, lines[:3]))}); fix those rows")
    return pd.DataFrame({
        "path": marked["patientId"].map(path_of).to_numpy(), "finding": "Pneumonia",
        "x": coords["x"].to_numpy(), "y": coords["y"].to_numpy(), "w": coords["width"].to_numpy(),
        "h": coords["height"].to_numpy(), "ref_w": np.nan, "ref_h": np.nan,
    })[~broken.to_numpy()].reset_index(drop=True)


@register_format("rsna", detect=lambda source: (_folder(source) / LABELS_CSV).is_file(),
                 looks_for=f"{LABELS_CSV} (RSNA Pneumonia)")
def read_rsna(source: Path, options: ReadOptions) -> Table:
    """RSNA Pneumonia: stage_2_train_labels.csv, stage_2_detailed_class_info.csv, DICOMs, boxes."""
    folder = _folder(source).resolve()
    csv = folder / LABELS_CSV
    if not csv.is_file():
        raise CxrlensError(f"{folder}: no {LABELS_CSV} (RSNA Pneumonia Detection Challenge)")
    rows = read_csv(csv, ("patientId", "x", "y", "width", "height", "Target"), "RSNA label table")
    rows["_line"] = np.arange(len(rows)) + 2
    problems = [p for p in (check_values(csv, rows, ["Target"], {"0", "1"}),) if p]
    per_image = rows.groupby("patientId", sort=False).agg(target=("Target", "max"), _line=("_line", "first"))
    vocabulary: tuple[str, ...] = ("Pneumonia",)
    finding = np.where(per_image["target"] == "1", "Pneumonia", "")
    if (folder / CLASSES_CSV).is_file():
        classes = read_csv(folder / CLASSES_CSV, ("patientId", "class"), "RSNA class table")
        problems += [p for p in (check_values(folder / CLASSES_CSV, classes, ["class"], CLASSES),) if p]
        named = classes.drop_duplicates("patientId").set_index("patientId")["class"].map(CLASSES).fillna("")
        finding = np.where(finding == "", per_image.index.map(named).fillna(""), finding)
        vocabulary = ("Pneumonia", "No Finding")
    ids = per_image.index.to_series()
    paths = pd.Series(join_paths(folder / IMAGES, ids + ".dcm"), index=ids.index)
    frame = pd.DataFrame({
        "path": paths.to_numpy(), "finding": finding, "patient_group": ("rsna:" + ids).to_numpy(),
        "source": "rsna", "_line": per_image["_line"].to_numpy(),
    })
    boxes = _boxes(rows, paths, csv, problems)
    return Table(frame, csv, csv, root=folder, vocabulary=vocabulary, boxes=boxes, problems=problems)
