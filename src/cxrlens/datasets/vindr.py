"""VinDr-CXR (Nguyen et al. 2022): 18,000 PA DICOMs, 17 radiologists, 28 image labels, boxes.

Layout: ``train/<image_id>.dicom``, ``test/<image_id>.dicom``; ``annotations/image_labels_train.csv``
(``image_id, rad_ID`` + 28 one-hot labels; three radiologists per training image) and
``annotations/annotations_train.csv`` (``image_id, rad_id, class_name, x_min, y_min, x_max, y_max``: one row
per radiologist and finding; ``No finding`` rows have no box); the same ``_test`` tables (one consensus
row per image). Values other than 0/1, or label names outside the documented 28, are errors.

The radiologists disagree, so ``--raters`` chooses: ``majority`` (a label is positive when more than half of
an image's radiologists give it; the boxes kept are those of the labels so decided) or ``any`` (one
radiologist is enough; every box kept; ``No finding`` only when nobody found anything). Split: ``test`` as
released; from ``train`` 1 image in 8 (stable hash) becomes ``val``. VinDr has no patient ids: every image
is its own group. Boxes are in DICOM pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.build import SHOWN, carve_val, check_values, join_flags, join_paths, problem_line, read_csv
from cxrlens.datasets.registry import ReadOptions, Table, register_format
from cxrlens.errors import CxrlensError

LOCAL = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
         "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
         "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
         "Pulmonary fibrosis", "Rib fracture", "Other lesion")
GLOBAL = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
LABELS = LOCAL + GLOBAL
SPELLINGS = {"Other disease": "Other diseases"}  # both occur in the releases
ID_COLUMNS = {"image_id", "rad_id", "rad_ID"}
PARTS = ("train", "test")


def _tables(folder: Path, part: str) -> tuple[Path, Path]:
    return folder / "annotations" / f"image_labels_{part}.csv", folder / "annotations" / f"annotations_{part}.csv"


def _is_vindr(source: Path) -> bool:
    return source.is_dir() and any(_tables(source, part)[0].is_file() for part in PARTS)


def _image_labels(csv: Path, raters: str, problems: list[str]) -> pd.DataFrame:
    """One row per image: finding tokens after combining the radiologists."""
    rows = read_csv(csv, ["image_id"], "VinDr image label table")
    columns = [c for c in rows.columns if c not in ID_COLUMNS]
    unknown = [c for c in columns if SPELLINGS.get(c, c) not in LABELS]
    if unknown:
        problems.append(problem_line(csv, "label columns outside VinDr-CXR's 28 labels", [repr(c) for c in unknown],
                                     f"the labels are {', '.join(LABELS)}"))
        columns = [c for c in columns if c not in unknown]
    problem = check_values(csv, rows, columns, {"0", "1", "0.0", "1.0"})
    problems += [problem] if problem else []
    votes = pd.DataFrame({c: rows[c].isin({"1", "1.0"}) for c in columns}).astype(np.int32)
    votes["image_id"] = rows["image_id"].to_numpy()
    grouped = votes.groupby("image_id", sort=False)
    count, positive = grouped.size().to_numpy()[:, None], grouped.sum()[columns].to_numpy()
    decided = positive * 2 > count if raters == "majority" else positive > 0
    names = [SPELLINGS.get(c, c) for c in columns]
    if "No finding" in names:  # "no finding" from one radiologist does not stand beside another's finding
        nothing = names.index("No finding")
        decided[:, nothing] &= ~np.delete(decided, nothing, axis=1).any(axis=1)
    return pd.DataFrame({"image_id": grouped.size().index, "finding": join_flags(names, decided),
                         "raters": count[:, 0]})


def _boxes(csv: Path, images: pd.DataFrame, raters: str, problems: list[str]) -> pd.DataFrame | None:
    if not csv.is_file():
        return None
    rows = read_csv(csv, ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"), "VinDr annotation table")
    rows["class_name"] = rows["class_name"].replace(SPELLINGS)
    problem = check_values(csv, rows, ["class_name"], LABELS)
    problems += [problem] if problem else []
    rows = rows[rows["class_name"].isin(LOCAL)]  # "No finding" rows have no box
    coords = rows[["x_min", "y_min", "x_max", "y_max"]].apply(pd.to_numeric, errors="coerce")
    broken = (coords.isna().any(axis=1) | (coords["x_max"] <= coords["x_min"])
              | (coords["y_max"] <= coords["y_min"])).to_numpy()
    if broken.any():
        lines = (rows.index[broken] + 2).tolist()
        problems.append(problem_line(csv, "boxes without x_min < x_max and y_min < y_max",
                                     [f"row {line}" for line in lines[:SHOWN]], "fix those rows", len(lines)))
    boxes = pd.DataFrame({
        "image_id": rows["image_id"].to_numpy(), "finding": rows["class_name"].to_numpy(),
        "x": coords["x_min"].to_numpy(), "y": coords["y_min"].to_numpy(),
        "w": (coords["x_max"] - coords["x_min"]).to_numpy(), "h": (coords["y_max"] - coords["y_min"]).to_numpy(),
        "ref_w": np.nan, "ref_h": np.nan,
    })[~broken]
    findings = images.set_index("image_id")["finding"].str.split("|")
    if raters == "majority":  # only boxes of the labels the majority gave
        decided = [f in (findings.get(i) or ()) for i, f in zip(boxes["image_id"], boxes["finding"], strict=True)]
        boxes = boxes[np.asarray(decided, dtype=bool)]
    return boxes


@register_format("vindr", detect=_is_vindr, looks_for="annotations/image_labels_train.csv (VinDr-CXR)")
def read_vindr(source: Path, options: ReadOptions) -> Table:
    """VinDr-CXR: annotations/image_labels_{train,test}.csv, annotations_{train,test}.csv, DICOMs."""
    folder = source.resolve()
    if not _is_vindr(folder):
        raise CxrlensError(f"{source}: no annotations/image_labels_train.csv or _test.csv (VinDr-CXR)")
    problems: list[str] = []
    parts, boxes = [], []
    for part in PARTS:
        labels_csv, boxes_csv = _tables(folder, part)
        if not labels_csv.is_file():
            continue
        images = _image_labels(labels_csv, options.raters, problems)
        images["path"] = join_paths(folder / part, images["image_id"] + ".dicom")
        images["split"] = part
        found = _boxes(boxes_csv, images, options.raters, problems)
        if found is not None:
            found["path"] = found["image_id"].map(images.set_index("image_id")["path"])
            boxes.append(found.dropna(subset=["path"]))
        parts.append(images)
    frame = pd.concat(parts, ignore_index=True)
    frame["patient_group"] = "vindr:" + frame["image_id"]
    frame["split"] = carve_val(frame["split"], frame["patient_group"]).to_numpy()
    frame["source"], frame["view"] = "vindr", "PA"
    box_table = pd.concat(boxes, ignore_index=True).drop(columns="image_id") if boxes else None
    return Table(frame, folder, folder / "annotations", root=folder, vocabulary=LABELS, boxes=box_table,
                 problems=problems)
