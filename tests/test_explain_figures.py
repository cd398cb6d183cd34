"""Overlays, grid figures and explain_images (files, JSON, atomic writes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlens.errors import CxrlensError
from cxrlens.explain import ExplainSettings, explain_images, grid_figure, overlay
from cxrlens.explain.figures import normalise
from cxrlens.models import create_model
from cxrlens.testing import trained_like

XRAYS = sorted((Path(__file__).resolve().parents[1] / "data" / "cxr3" / "images").glob("*.jpg"))[:4]


def xrays(size: int) -> torch.Tensor:
    """The first four vendored real X-rays, [4, 3, size, size] in [0, 1]."""
    grey = [np.asarray(Image.open(p).convert("L").resize((size, size)), dtype=np.float32) / 255 for p in XRAYS]
    return torch.from_numpy(np.stack(grey))[:, None].repeat(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CXRLENS_TEST_THREADS", "1")))  # tiny inputs; see tests/test_explain.py
    yield
    torch.set_num_threads(threads)


def test_overlay_unsigned_clips_outliers() -> None:
    image = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    attribution = np.zeros((32, 32), dtype=np.float32)
    attribution[4:8, 4:8] = 1.0
    attribution[0, 0] = 1000.0  # one outlier must not wash out the rest
    rgb = overlay(image, attribution, clip_percentile=99)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert normalise(attribution, clip_percentile=99)[5, 5] == 1.0
    assert not np.array_equal(rgb[5, 5], rgb[20, 20])


def test_overlay_signed_uses_a_diverging_map() -> None:
    image = np.full((16, 16), 0.5, dtype=np.float32)
    attribution = np.zeros((16, 16), dtype=np.float32)
    attribution[:, :8], attribution[:, 8:] = 1.0, -1.0
    attribution[8, 4] = 0.0
    rgb = overlay(image, attribution, signed=True, alpha=0.8).astype(int)
    assert rgb[0, 0, 0] > rgb[0, 0, 2]  # positive: red
    assert rgb[0, 15, 2] > rgb[0, 15, 0]  # negative: blue
    assert tuple(rgb[8, 4]) == (128, 128, 128)  # no attribution: the X-ray unchanged


def test_overlay_rejects_mismatched_shapes() -> None:
    with pytest.raises(CxrlensError, match="differs from image shape"):
        overlay(np.zeros((8, 8)), np.zeros((4, 4)))


def test_grid_figure_writes_png(tmp_path: Path) -> None:
    cell = np.zeros((16, 16, 3), dtype=np.uint8)
    path = grid_figure([[cell, cell], [cell, None]], ["resnet18", "densenet161"], ["saliency", "deeplift"],
                       tmp_path / "grid.png", title="x")
    assert Image.open(path).format == "PNG"
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left
    with pytest.raises(CxrlensError, match="labels"):
        grid_figure([[cell]], ["a", "b"], ["c"], tmp_path / "bad.png")


@pytest.mark.numerics
def test_explain_images_writes_maps_figures_and_summary(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = xrays(64)
    models = {"resnet18": trained_like(create_model("resnet18", num_classes=3), real[2:])}
    images = real[:2]
    classes = ["COVID-19", "Pneumonia", "No Finding"]
    summary = explain_images(
        models, images, classes, {"saliency": {}, "deeplift": {}, "occlusion": {"window": 32, "stride": 16}},
        ["COVID-19", 2], tmp_path, image_ids=["a.jpg", "b.jpg"],
    )
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    entry = saved["models"]["resnet18"]
    assert set(entry["predictions"]["a.jpg"]) == set(classes)
    assert set(entry["methods"]) == {"saliency", "deeplift", "occlusion"}
    # Completeness within float32 rounding: (n + L) u with n = 3 * 64 * 64 terms, L ~ 100 layers and
    # u = 6e-8 is 8e-4 of the sum of |attributions| (the channel-summed map's is a lower bound on it).
    deeplift_b = np.load(tmp_path / "maps" / "b.jpg" / "resnet18" / "deeplift.npy")
    assert abs(entry["methods"]["deeplift"]["delta"]["b.jpg"]["No Finding"]) <= 8e-4 * np.abs(deeplift_b[1]).sum()
    assert entry["methods"]["occlusion"]["params"] == {
        "window": 32, "stride": 16, "baseline": 0.0, "incremental": True, "approximate": False}
    maps = np.load(tmp_path / "maps" / "a.jpg" / "resnet18" / "deeplift.npy")
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert (tmp_path / "overlays" / "b.jpg" / "resnet18" / "saliency__No_Finding.png").is_file()
    for grid in saved["grids"]:
        assert Image.open(tmp_path / grid).format == "PNG"
    assert not list(tmp_path.rglob("*.tmp"))


def test_explain_images_rejects_bad_input_before_writing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = {"mine": create_model("resnet18", num_classes=3)}
    with pytest.raises(CxrlensError, match="occlusion window 64x64 is larger than the 40x40 image"):
        explain_images(models, torch.rand(1, 3, 40, 40), ["a", "b", "c"],
                       {"grad_cam": {}, "occlusion": {"window": 64}}, None, tmp_path / "out",
                       settings=ExplainSettings(figures=False))
    assert not (tmp_path / "out").exists()  # nothing half-written
    summary = explain_images(models, torch.rand(1, 3, 40, 40), ["a", "b", "c"], {"grad_cam": {}}, None, tmp_path,
                             settings=ExplainSettings(figures=False))
    assert summary["models"]["mine"]["methods"]["grad_cam"]["layer"] == "layer4"
    with pytest.raises(CxrlensError, match="unknown class 'Flu'"):
        explain_images(models, torch.rand(1, 3, 40, 40), ["a", "b", "c"], ["saliency"], ["Flu"], tmp_path)
    with pytest.raises(CxrlensError, match="unknown attribution method"):
        explain_images(models, torch.rand(1, 3, 40, 40), ["a", "b", "c"], ["lime"], None, tmp_path)
