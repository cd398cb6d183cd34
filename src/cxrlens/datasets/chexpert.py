"""CheXpert (Irvin et al. 2019) and MIMIC-CXR-JPG (Johnson et al. 2019): the 14 CheXpert observations.

Label values (both): ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank not mentioned (read as
negative, as the CheXpert paper's baselines do). ``--uncertain`` chooses the paper's policy for ``-1.0``:
``ignore`` (U-Ignore: the label is unknown, left out of the loss and the metrics), ``zeros`` (U-Zeros),
``ones`` (U-Ones). Any other value is an error naming the file, row and column.

* ``chexpert``: ``CheXpert-v1.0-small/train.csv`` and ``valid.csv`` (or the full-size ``CheXpert-v1.0/``),
  ``Path`` relative to the folder holding ``CheXpert-v1.0-small/``; the patient is the ``patientNNNNN`` part
  of the path; ``train.csv`` -> ``train``, ``valid.csv`` (the official validation set) -> ``val``. The view
  is ``AP/PA`` for frontal films, ``LATERAL`` otherwise.
* ``mimic``: ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (one row per image) joined by ``subject_id, study_id`` to
  ``mimic-cxr-2.0.0-chexpert.csv(.gz)`` (or ``-negbio``; labels are per study) and by ``dicom_id`` to
  ``mimic-cxr-2.0.0-split.csv(.gz)`` (train / validate / test); images in
  ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``. Images of a study without a label row are left out (counted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.build import check_values, first_file, join_flags, join_paths, read_csv
from cxrlens.datasets.registry import ReadOptions, Table, register_format
from cxrlens.errors import CxrlensError

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
POSITIVE, NEGATIVE, UNCERTAIN = {"1.0", "1"}, {"0.0", "0", ""}, {"-1.0", "-1"}
CHEXPERT_SPLITS = (("train.csv", "train"), ("valid.csv", "val"))


def observation_labels(frame: pd.DataFrame, path: Path, policy: str, lines: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(finding, uncertain) token strings per row under the uncertainty ``policy``, and the problem line
    for values outside the documented set (None when every value is documented)."""
    problem = check_values(path, frame, OBSERVATIONS, POSITIVE | NEGATIVE | UNCERTAIN, lines)
    positive = np.stack([frame[c].isin(POSITIVE).to_numpy() for c in OBSERVATIONS], axis=1)
    unsure = np.stack([frame[c].isin(UNCERTAIN).to_numpy() for c in OBSERVATIONS], axis=1)
    if policy == "ones":
        positive |= unsure
    if policy != "ignore":
        unsure[:] = False
    return join_flags(OBSERVATIONS, positive), join_flags(OBSERVATIONS, unsure), problem


# --- CheXpert ----------------------------------------------------------------------------------------


def _chexpert_tables(source: Path) -> list[tuple[Path, str]]:
    """The CheXpert tables below ``source`` (a table file, the CheXpert-v1.0* folder or its parent)."""
    if source.is_file():
        split = dict(CHEXPERT_SPLITS).get(source.name, "")
        columns = set(pd.read_csv(source, nrows=0).columns) if source.suffix == ".csv" else set()
        return [(source, split)] if {"Path", "Frontal/Lateral"} <= columns else []
    for base in [source, *sorted(source.glob("CheXpert-v1.0*"))]:
        tables = [(base / name, split) for name, split in CHEXPERT_SPLITS if (base / name).is_file()]
        if tables and {"Path", "Frontal/Lateral"} <= set(pd.read_csv(tables[0][0], nrows=0).columns):
            return tables
    return []


def _view(frame: pd.DataFrame) -> np.ndarray:
    frontal = frame["Frontal/Lateral"].str.strip().str.lower() == "frontal"
    ap_pa = frame["AP/PA"] if "AP/PA" in frame else pd.Series("", index=frame.index)
    return np.where(frontal, ap_pa.where(ap_pa.str.strip() != "", "FRONTAL"), "LATERAL")


@register_format("chexpert", detect=lambda source: bool(_chexpert_tables(source)),
                 looks_for="CheXpert-v1.0*/train.csv, valid.csv (CheXpert)")
def read_chexpert(source: Path, options: ReadOptions) -> Table:
    """CheXpert: train.csv and valid.csv of CheXpert-v1.0-small (or the full-size release)."""
    tables = _chexpert_tables(source)
    if not tables:
        raise CxrlensError(f"{source}: no CheXpert-v1.0*/train.csv or valid.csv with 'Path' and 'Frontal/Lateral'")
    parts, problems = [], []
    for csv, split in tables:
        csv = csv.resolve()
        rows = read_csv(csv, ("Path", "Frontal/Lateral", *OBSERVATIONS), "CheXpert table")
        # Path starts with the CheXpert-v1.0* folder: it is relative to that folder's parent
        first = Path(rows["Path"].iat[0]).parts[0] if len(rows) else csv.parent.name
        root = csv.parent.parent if first == csv.parent.name else csv.parent
        finding, uncertain, problem = observation_labels(rows, csv, options.uncertain)
        problems += [problem] if problem else []
        patient = rows["Path"].str.extract(r"(patient\d+)", expand=False).fillna(rows["Path"])
        parts.append(pd.DataFrame({
            "path": join_paths(root, rows["Path"]), "finding": finding, "uncertain": uncertain,
            "patient_group": ("chexpert:" + patient).to_numpy(), "split": split, "source": "chexpert",
            "view": _view(rows), "sex": rows["Sex"].to_numpy() if "Sex" in rows else "",
            "age": rows["Age"].to_numpy() if "Age" in rows else "",
        }))
    frame = pd.concat(parts, ignore_index=True)
    origin = tables[0][0].resolve().parent
    return Table(frame, origin, origin, root=root.resolve(), vocabulary=OBSERVATIONS, problems=problems)


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------------

MIMIC = "mimic-cxr-2.0.0-"
VIEW_CODES = {"postero-anterior": "PA", "antero-posterior": "AP", "lateral": "LATERAL", "left lateral": "LL",
              "right lateral": "RL"}


def _mimic_files(source: Path) -> dict[str, Path | None]:
    folder = source if source.is_dir() else source.parent
    return {kind: first_file(folder, [f"{MIMIC}{name}.csv.gz", f"{MIMIC}{name}.csv"])
            for kind, name in (("metadata", "metadata"), ("chexpert", "chexpert"), ("negbio", "negbio"),
                               ("split", "split"))}


def _mimic_views(meta: pd.DataFrame) -> pd.Series:
    view = meta["ViewPosition"] if "ViewPosition" in meta else pd.Series("", index=meta.index)
    if "ViewCodeSequence_CodeMeaning" in meta:  # fills the ~15,000 images without a ViewPosition
        coded = meta["ViewCodeSequence_CodeMeaning"].str.strip().str.lower().map(VIEW_CODES).fillna("")
        view = view.where(view.str.strip() != "", coded)
    return view


@register_format("mimic", detect=lambda source: _mimic_files(source)["metadata"] is not None,
                 looks_for="mimic-cxr-2.0.0-metadata.csv(.gz) (MIMIC-CXR-JPG)")
def read_mimic(source: Path, options: ReadOptions) -> Table:
    """MIMIC-CXR-JPG: metadata, CheXpert (or NegBio) labels per study, the official split."""
    files = _mimic_files(source)
    labels_csv = files["chexpert"] or files["negbio"]
    if files["metadata"] is None or labels_csv is None:
        raise CxrlensError(f"{source}: MIMIC-CXR-JPG needs {MIMIC}metadata.csv(.gz) and {MIMIC}chexpert.csv(.gz) "
                           f"(or -negbio) in one folder")
    folder = files["metadata"].resolve().parent
    keep = {"dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning"}
    meta = read_csv(files["metadata"], ("dicom_id", "subject_id", "study_id"), "MIMIC metadata table",
                    usecols=lambda c: c in keep)
    labels = read_csv(labels_csv, ("subject_id", "study_id", *OBSERVATIONS), "MIMIC label table")
    labels["_label_line"] = np.arange(len(labels)) + 2
    rows = meta.merge(labels, on=["subject_id", "study_id"], how="inner")
    finding, uncertain, problem = observation_labels(rows, labels_csv, options.uncertain,
                                                     rows["_label_line"].to_numpy())
    subject = rows["subject_id"].str.strip()
    relative = "files/p" + subject.str[:2] + "/p" + subject + "/s" + rows["study_id"].str.strip() + "/" \
        + rows["dicom_id"].str.strip() + ".jpg"
    split = pd.Series("", index=rows.index)
    if files["split"] is not None:
        official = read_csv(files["split"], ("dicom_id", "split"), "MIMIC split table")
        named = official.set_index("dicom_id")["split"].str.strip().replace({"validate": "val"})
        split = rows["dicom_id"].map(named).fillna("")
    frame = pd.DataFrame({
        "path": join_paths(folder, relative), "finding": finding, "uncertain": uncertain,
        "patient_group": ("mimic:" + subject).to_numpy(), "split": split.to_numpy(), "source": "mimic",
        "view": _mimic_views(rows).to_numpy(), "study": rows["study_id"].to_numpy(),
    })
    return Table(frame, folder, labels_csv.resolve(), root=folder, vocabulary=OBSERVATIONS,
                 dropped={"study without a label row": len(meta) - len(rows)}, problems=[problem] if problem else [])
