"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal PNGs of 30,805 patients.

Layout: ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``) with ``Image Index, Finding Labels,
Follow-up #, Patient ID, Patient Age, Patient Gender, View Position, ...``; images in ``images/`` (the NIH
release) or ``images_001/images/`` ... ``images_012/images/`` (the Kaggle copy). ``Finding Labels`` is
``|``-separated from the 14 findings or ``No Finding``; any other value is an error.

Official split by patient: ``test_list.txt`` -> ``test``; ``train_val_list.txt`` -> ``train``, with 1
patient in 8 (a stable hash of the patient id) carved out as ``val``, since NIH gives no validation split.
``BBox_List_2017.csv`` (``Image Index, Finding Label, Bbox [x,y,w,h]``, in the 1024 px images'
coordinates) becomes the manifest's boxes: localisation ground truth for 880 images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.build import SHOWN, carve_val, first_file, join_paths, problem_line, read_csv
from cxrlens.datasets.registry import ReadOptions, Table, register_format
from cxrlens.errors import CxrlensError

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
LABELS = (*FINDINGS, "No Finding")
BOX_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax")
ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "Data_Entry_2017*.csv")
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
BOX_REFERENCE = 1024  # BBox_List_2017.csv's coordinates are those of the 1024 x 1024 release images


def _entry_file(source: Path) -> Path | None:
    if source.is_file():
        return source if source.name.startswith("Data_Entry_2017") else None
    return first_file(source, ENTRY_FILES)


def _image_paths(folder: Path, names: pd.Series) -> list[str]:
    """images/<name>, or where the Kaggle copy's images_NNN/images/ folders hold it."""
    kaggle = sorted(folder.glob("images_*/images"))
    if (folder / "images").is_dir() or not kaggle:
        return join_paths(folder / "images", names)
    where: dict[str, str] = {}
    for part in kaggle:
        with os.scandir(part) as entries:
            where.update({e.name: e.path for e in entries})
    return [os.path.normpath(where.get(n, str(folder / "images" / n))) for n in names]


def _bad_labels(entry: Path, labels: pd.Series, lines: np.ndarray) -> str | None:
    allowed = set(LABELS)
    bad = {u for u in labels.unique() if not u or any(t not in allowed for t in u.split("|"))}
    if not bad:
        return None
    wrong = np.flatnonzero(labels.isin(bad).to_numpy())
    items = [f"row {lines[i]}: '{labels.iat[i]}'" for i in wrong[:SHOWN]]
    return problem_line(entry, "rows with labels outside NIH's 14 findings and 'No Finding'", items,
                        f"the labels are {', '.join(LABELS)}, separated by '|'; fix those rows", len(wrong))


def _official_split(folder: Path, names: pd.Series, groups: pd.Series) -> pd.Series:
    train_val, test = folder / "train_val_list.txt", folder / "test_list.txt"
    if not (train_val.is_file() and test.is_file()):
        return pd.Series("", index=names.index)
    official = dict.fromkeys(train_val.read_text().split(), "train") | dict.fromkeys(test.read_text().split(), "test")
    split = [official.get(name, "") for name in names.tolist()]
    return carve_val(pd.Series(split, index=names.index, dtype=object), groups)


def _boxes(folder: Path, path_of: dict[str, str], problems: list[str]) -> pd.DataFrame | None:
    csv = first_file(folder, ["BBox_List_2017.csv"])
    if csv is None:
        return None
    raw = read_csv(csv, what="NIH box table")
    if raw.shape[1] < 6 or list(raw.columns[:2]) != ["Image Index", "Finding Label"]:
        raise CxrlensError(f"{csv}: not NIH's box table (expected 'Image Index, Finding Label, Bbox [x,y,w,h]')")
    boxes = pd.DataFrame({"image": raw.iloc[:, 0], "finding": raw.iloc[:, 1]})
    for i, axis in enumerate(("x", "y", "w", "h")):
        boxes[axis] = pd.to_numeric(raw.iloc[:, 2 + i], errors="coerce")
    lines = np.arange(len(boxes)) + 2
    wrong = np.flatnonzero(~boxes["finding"].isin(BOX_FINDINGS).to_numpy())
    if len(wrong):
        items = [f"row {lines[i]}: '{boxes['finding'].iat[i]}'" for i in wrong[:SHOWN]]
        problems.append(problem_line(csv, "boxes with a finding outside the documented set", items,
                                     f"the box findings are {', '.join(BOX_FINDINGS)}", len(wrong)))
    broken = np.flatnonzero(boxes[["x", "y", "w", "h"]].isna().any(axis=1).to_numpy() | (boxes["w"] <= 0).to_numpy()
                            | (boxes["h"] <= 0).to_numpy())
    if len(broken):
        items = [f"row {lines[i]}" for i in broken[:SHOWN]]
        problems.append(problem_line(csv, "boxes whose x, y, w, h are not numbers with w, h > 0", items,
                                     "fix those rows", len(broken)))
    boxes["path"] = boxes["image"].map(path_of)
    boxes = boxes.dropna(subset=["path"])  # boxes of images the entry table does not list
    boxes["ref_w"] = boxes["ref_h"] = float(BOX_REFERENCE)
    return boxes[["path", "finding", "x", "y", "w", "h", "ref_w", "ref_h"]].reset_index(drop=True)


@register_format("nih", detect=lambda source: _entry_file(source) is not None,
                 looks_for="Data_Entry_2017*.csv (NIH ChestX-ray14)")
def read_nih(source: Path, options: ReadOptions) -> Table:
    """NIH ChestX-ray14: Data_Entry_2017*.csv, images/, official split lists, BBox_List_2017.csv."""
    entry = _entry_file(source)
    if entry is None:
        raise CxrlensError(f"{source}: no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv (NIH ChestX-ray14)")
    entry = entry.resolve()
    folder = entry.parent
    rows = read_csv(entry, ENTRY_COLUMNS, "NIH Data_Entry table")
    lines = np.arange(len(rows)) + 2
    names = rows["Image Index"].str.strip()
    problems = [p for p in (_bad_labels(entry, rows["Finding Labels"], lines),) if p]
    groups = "nih:" + rows["Patient ID"].str.strip().str.lstrip("0")
    frame = pd.DataFrame({
        "path": _image_paths(folder, names),
        "finding": rows["Finding Labels"].to_numpy(),
        "patient_group": groups.to_numpy(),
        "split": _official_split(folder, names, groups).to_numpy(),
        "source": "nih",
        "view": rows["View Position"].to_numpy(),
        "image": names.to_numpy(),
        "age": rows["Patient Age"].to_numpy() if "Patient Age" in rows else "",
        "sex": rows["Patient Gender"].to_numpy() if "Patient Gender" in rows else "",
        "_line": lines,
    })
    boxes = _boxes(folder, dict(zip(frame["image"], frame["path"], strict=True)), problems)
    return Table(frame, entry, entry, root=folder, vocabulary=LABELS, boxes=boxes, problems=problems)
