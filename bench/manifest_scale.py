"""A 400,000-row data set: how long reading, checking and splitting its manifest takes, and how much memory.

Generates NIH ChestX-ray14's layout at 3.6 times its size: ``Data_Entry_2017_v2020.csv`` with 400,000 rows
(label combinations drawn from the real NIH rows in data/formats, ~3.5 images per patient),
``train_val_list.txt`` / ``test_list.txt`` by patient, a box table, and ``images/`` holding 400,000 empty
files (the manifest never decodes an image; the files exist so the missing-file check does its real work).
Then, each in a fresh process (so its peak memory is its own), it times:

* ``load nih``: ``load_manifest`` (read the table, check every label value, paths, the official split with
  its carved validation part, boxes, and that every image file exists);
* ``split``: ``patient_split`` (a new 70/15/15 split by patient, stratified by label pattern) and taking
  the training rows;
* ``write + load labels.csv``: the manifest written as our labels.csv (``cxrlens split``'s output) and read back.

Wall and CPU seconds are both printed: on a shared machine the wall time includes waiting for a core. The
peak memory is the process's (the split and write steps load the manifest first; their peak includes it).

Usage: python bench/manifest_scale.py [--rows 400000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _machine import cpu_name  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
REAL_ROWS = ROOT / "data" / "formats" / "nih_data_entry_cxr3.csv"
REAL_BOXES = ROOT / "data" / "formats" / "nih_bbox_cxr3.csv"


def generate(folder: Path, rows: int, seed: int = 0) -> None:
    """NIH's layout with ``rows`` images; labels drawn from the real rows' label combinations."""
    rng = np.random.default_rng(seed)
    real = pd.read_csv(REAL_ROWS, dtype=str)
    patients = rng.integers(1, int(rows / 3.5), size=rows)
    patients.sort()
    follow_up = pd.Series(patients).groupby(patients).cumcount().to_numpy()
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(patients, follow_up, strict=True)]
    picks = rng.integers(0, len(real), size=rows)
    frame = real.iloc[picks].reset_index(drop=True)
    frame["Image Index"], frame["Follow-up #"], frame["Patient ID"] = names, follow_up, patients
    frame.to_csv(folder / "Data_Entry_2017_v2020.csv", index=False)
    test_patients = set(rng.choice(np.unique(patients), size=len(np.unique(patients)) // 5, replace=False))
    in_test = np.isin(patients, list(test_patients))
    (folder / "test_list.txt").write_text("\n".join(np.asarray(names)[in_test]) + "\n")
    (folder / "train_val_list.txt").write_text("\n".join(np.asarray(names)[~in_test]) + "\n")
    boxes = pd.read_csv(REAL_BOXES, dtype=str, keep_default_na=False)
    boxes["Image Index"] = [names[i] for i in rng.integers(0, rows, size=len(boxes))]
    boxes.to_csv(folder / "BBox_List_2017.csv", index=False)
    images = folder / "images"
    images.mkdir()
    for name in names:
        with open(images / name, "wb"):
            pass


def measure(step: str, folder: Path) -> dict:
    """One step in this (fresh) process: seconds and peak memory above the imports."""
    from cxrlens.data import load_manifest, patient_split, write_manifest
    from cxrlens.taxonomy import NIH14

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu = time.perf_counter(), time.process_time()
    if step == "load nih":
        manifest = load_manifest(folder, NIH14)
        detail = f"{len(manifest):,} rows, splits {manifest.frame['split'].value_counts().to_dict()}, " \
                 f"{len(manifest.boxes)} boxes"
    elif step == "split":
        manifest = load_manifest(folder, NIH14)
        start, cpu = time.perf_counter(), time.process_time()
        split = patient_split(manifest, (0.7, 0.15, 0.15), ("train", "val", "test"))
        train = split.split("train")
        detail = f"{split.frame['patient_group'].nunique():,} patients; train {len(train):,} rows"
    else:
        manifest = load_manifest(folder, NIH14)
        start, cpu = time.perf_counter(), time.process_time()
        out = folder.parent / "manifest" / "labels.csv"  # beside the data set, as `cxrlens split --out` writes it
        out.parent.mkdir(exist_ok=True)
        write_manifest(manifest, out)
        back = load_manifest(out, NIH14)
        detail = f"{len(back):,} rows back"
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    return {"step": step, "seconds": round(seconds, 2), "cpu": round(cpu, 2), "peak_mb": round(peak_mb),
            "detail": detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--keep", help="generate into (or reuse) DIR/nih instead of a temporary folder")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        import cxrlens.data  # noqa: F401  imports are not the step's memory

        print(json.dumps(measure(args.step, Path(args.folder))))
        return
    workspace = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cxrlens-scale-"))
    folder = workspace / "nih"
    try:
        if not (folder / "Data_Entry_2017_v2020.csv").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            generate(folder, args.rows)
            print(f"generated {args.rows:,} rows and empty image files in {time.perf_counter() - started:.0f} s")
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"pandas {pd.__version__}; one thread; the machine is shared with other jobs")
        print("| step | wall s | CPU s | peak memory above imports (MB) | what |\n|---|---|---|---|---|")
        for step in ("load nih", "split", "write + load labels.csv"):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--step", step, "--folder", str(folder)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"| {result['step']} | {result['seconds']} | {result['cpu']} | {result['peak_mb']} | "
                  f"{result['detail']} |")
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    main()
