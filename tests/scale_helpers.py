"""Helpers of the data-set-scale tests: tiny real data sets and a realistic untrained run, on disk.

Processes started by ``cxrlens.distributed.launch`` load everything by path, so the tests build real
files: a labels.csv of real cxr3 test X-rays, a labels.csv of real lung-mask X-rays, and a run folder
whose ResNet18 has BatchNorm set as after training (``cxrlens.testing.trained_like``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from conftest import CXR3, LUNGMASKS, one_thread  # noqa: F401  (re-exported for the scale tests)

SIZE = 64  # px: every stage at its smallest realistic size


def cxr3_labels(folder: Path, per_class: int = 4) -> Path:
    """labels.csv of the first ``per_class`` test images of each class (absolute paths), in file order."""
    frame = pd.read_csv(CXR3 / "labels.csv", dtype=str, keep_default_na=False)
    test = frame[frame["split"] == "test"]
    pick = pd.concat([test[test["cls"] == c].head(per_class) for c in ("covid", "pneumonia", "normal")]).sort_index()
    pick = pick.assign(path=[str(CXR3 / p) for p in pick["path"]])
    path = folder / "labels.csv"
    pick.to_csv(path, index=False)
    return path


def lungmask_labels(folder: Path, n: int = 8) -> Path:
    """labels.csv (path + finding) of the first ``n`` images of data/lungmasks, in its order."""
    frame = pd.read_csv(LUNGMASKS / "masks.csv", dtype=str, keep_default_na=False).head(n)
    path = folder / "lungmasks.csv"
    pd.DataFrame({"path": [str(LUNGMASKS / p) for p in frame["image"]], "finding": frame["finding"]}).to_csv(
        path, index=False)
    return path


def trained_like_run(folder: Path, labels: Path, seed: int = 0) -> Path:
    """A run folder (resnet18, 64 px) whose BatchNorm looks trained, calibrated on the images of ``labels``."""
    from cxrlens.data import load_image_tensor
    from cxrlens.models import create_model
    from cxrlens.runs import TrainConfig, save_model_weights
    from cxrlens.testing import trained_like

    paths = pd.read_csv(labels)["path"]
    images = torch.stack([load_image_tensor(p, SIZE) for p in paths])
    torch.manual_seed(seed)
    model = trained_like(create_model("resnet18", 3), images, seed=seed)
    folder.mkdir(parents=True)
    TrainConfig(model="resnet18", image_size=SIZE, out=str(folder), data=str(labels)).save(folder)
    save_model_weights(model, folder / "best.safetensors")
    return folder




def store_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every chunk file of a map store, by relative path."""
    return {str(p.relative_to(folder)): np.load(p) for p in sorted((folder / "maps").rglob("*.npy"))}
