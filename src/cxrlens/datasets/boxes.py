"""Localisation ground truth from boxes (NIH, RSNA, VinDr-CXR) as a mask set the scorecard reads.

:func:`box_mask_set` writes ``masks.csv`` and one PNG per image and finding (the union of that finding's
boxes, filled) in the format of :mod:`cxrlens.score.masks`: the box mask goes in the ``opacity`` column, the
one the scorecard's localisation metrics score against (relevance mass and rank accuracy, pointing game),
and ``finding`` names the boxed finding, so the scorecard explains that finding's class on that row and
reports the metrics per finding. ``lungs`` is empty (nobody drew lungs on these images): lung focus and the
outside-the-body share are NaN for these rows.

Box coordinates refer to ``ref_w x ref_h`` pixels (NIH: the 1024 px release images; RSNA and VinDr: the
DICOM itself) and are scaled to the image file's size, so resized copies of a collection work too.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlens.errors import CxrlensError


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    from cxrlens.data import _is_dicom

    if path.lower().endswith((".dcm", ".dicom")) or _is_dicom(Path(path)):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    with Image.open(path) as img:
        return img.height, img.width


def box_mask(boxes: pd.DataFrame, height: int, width: int) -> np.ndarray:
    """uint8 [height, width], 255 inside any of ``boxes`` (x, y, w, h in ref_w x ref_h pixels; NaN: the
    image's own), 0 elsewhere. Pixels the box touches count as inside (edges rounded outwards)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for box in boxes.itertuples(index=False):
        sx = width / box.ref_w if box.ref_w == box.ref_w else 1.0  # NaN != NaN
        sy = height / box.ref_h if box.ref_h == box.ref_h else 1.0
        x0, y0 = max(0, math.floor(box.x * sx)), max(0, math.floor(box.y * sy))
        x1, y1 = min(width, math.ceil((box.x + box.w) * sx)), min(height, math.ceil((box.y + box.h) * sy))
        mask[y0:y1, x0:x1] = 255
    return mask


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "finding"


def box_mask_set(manifest, out: str | Path, findings: Sequence[str] | None = None, progress: bool = True) -> Path:
    """Write the boxes of ``manifest`` (a :class:`cxrlens.data.Manifest` read from NIH, RSNA or VinDr-CXR)
    as a mask folder: ``out/masks.csv`` (one row per image and boxed finding) and ``out/masks/*.png``.
    ``findings``: only these box findings. Returns the folder, ready for ``cxrlens score --masks``."""
    from tqdm.auto import tqdm

    from cxrlens.runs import atomic_write_text

    boxes = manifest.boxes
    if boxes is None or boxes.empty:
        raise CxrlensError(f"{manifest.origin}: no boxes; localisation boxes come with NIH (BBox_List_2017.csv), "
                           "RSNA (stage_2_train_labels.csv) and VinDr-CXR (annotations_*.csv)")
    if findings is not None:
        boxes = boxes[boxes["finding"].isin(findings)]
        if boxes.empty:
            raise CxrlensError(f"{manifest.origin}: no box of {', '.join(findings)}; the boxed findings are "
                               f"{', '.join(sorted(set(manifest.boxes['finding'])))}")
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = manifest.frame.drop_duplicates("path").set_index("path")
    records = []
    groups = list(boxes.groupby(["path", "finding"], sort=True))
    for n, ((path, finding), group) in enumerate(tqdm(groups, desc="box masks", disable=not progress or None)):
        height, width = image_size(path)
        name = f"masks/{n:06d}_{_slug(Path(path).stem)}_{_slug(finding)}.png"
        Image.fromarray(box_mask(group, height, width), mode="L").save(out / name)
        row = rows.loc[path]
        records.append({"image": os.path.relpath(path, out.resolve()), "lungs": "", "opacity": name,
                        "finding": finding, "boxes": len(group), "patient_group": row["patient_group"],
                        "source": row["source"], "split": row["split"]})
    atomic_write_text(out / "masks.csv", pd.DataFrame(records).to_csv(index=False))
    return out
