"""COVIDx CXR (Wang et al., COVID-Net): image lists with the collection each image came from.

Layout: ``train/``, ``val/``, ``test/`` image folders and ``train.txt``, ``val.txt``, ``test.txt``, one
space-separated line per image: ``patient_id filename label data_source``. Labels: ``positive`` /
``negative`` (COVIDx CXR-3 on: they speak about COVID-19 only, so other classes are unknown) or
``COVID-19`` / ``pneumonia`` / ``normal`` (before). ``data_source`` (the original collection) becomes the
``source`` column, so the per-source metrics and the shortcut detector see it. Without ``val.txt``, 1
patient in 8 of ``train`` (stable hash) becomes ``val``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.build import SHOWN, carve_val, join_paths, problem_line
from cxrlens.datasets.registry import ReadOptions, Table, register_format
from cxrlens.errors import CxrlensError

SPLITS = ("train", "val", "test")
LABELS = {"positive": "COVID-19", "negative": "", "covid-19": "COVID-19", "pneumonia": "Pneumonia",
          "normal": "No Finding"}


def _lists(source: Path) -> list[tuple[Path, str]]:
    folder = source if source.is_dir() else source.parent
    return [(folder / f"{split}.txt", split) for split in SPLITS
            if (folder / f"{split}.txt").is_file() and (folder / split).is_dir()]


def _parse(path: Path, split: str, problems: list[str]) -> pd.DataFrame:
    records, malformed = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            malformed.append(f"line {number}: '{line[:60]}'")
            continue
        if len(parts) == 3:  # early versions: no data_source
            patient, name, label, source = *parts, "unknown"
        else:  # a file name may hold spaces: the label and the source are the last two fields
            patient, name, label, source = parts[0], " ".join(parts[1:-2]), parts[-2], parts[-1]
        records.append((patient, f"{split}/{name}", label, source, split, number))
    if malformed:
        problems.append(problem_line(path, "lines without 'patient_id filename label data_source'", malformed,
                                     "fix those lines"))
    return pd.DataFrame(records, columns=["patient", "relative", "label", "source", "split", "_line"])


@register_format("covidx", detect=lambda source: bool(_lists(source)),
                 looks_for="train.txt/test.txt beside train/, test/ (COVIDx)")
def read_covidx(source: Path, options: ReadOptions) -> Table:
    """COVIDx CXR: train/val/test.txt image lists (patient, file, label, data_source) and image folders."""
    lists = _lists(source)
    if not lists:
        raise CxrlensError(f"{source}: no train.txt, val.txt or test.txt beside train/, val/, test/ folders (COVIDx)")
    folder = lists[0][0].resolve().parent
    problems: list[str] = []
    rows = pd.concat([_parse(path, split, problems) for path, split in lists], ignore_index=True)
    label = rows["label"].str.lower()
    wrong = np.flatnonzero(~label.isin(LABELS).to_numpy())
    if len(wrong):
        items = [f"{rows['split'].iat[i]}.txt line {rows['_line'].iat[i]}: '{rows['label'].iat[i]}'"
                 for i in wrong[:SHOWN]]
        problems.append(problem_line(folder, "labels outside the documented set", items,
                                     "the labels are positive, negative (CXR-3 on) or COVID-19, pneumonia, normal",
                                     len(wrong)))
    binary = label.isin({"positive", "negative"}).any()
    groups = "covidx:" + rows["source"] + ":" + rows["patient"]
    split = rows["split"] if "val" in set(rows["split"]) else carve_val(rows["split"], groups)
    frame = pd.DataFrame({
        "path": join_paths(folder, rows["relative"]), "finding": label.map(LABELS).fillna("").to_numpy(),
        "patient_group": groups.to_numpy(), "split": split.to_numpy(), "source": rows["source"].to_numpy(),
        "_line": 0,
    })
    vocabulary = ("COVID-19",) if binary else ("COVID-19", "Pneumonia", "No Finding")
    return Table(frame, folder, folder, root=folder, vocabulary=vocabulary, problems=problems)
