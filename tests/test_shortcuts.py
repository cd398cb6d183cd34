"""Planted shortcuts: artifacts, planted data sets (exact counts), and the shortcut test end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CXR3, LUNGMASKS, XRAY, run_cli
from PIL import Image

from cxrlens.data import Preprocess, load_manifest, read_image
from cxrlens.errors import CxrlensError
from cxrlens.shortcuts import (
    ARTIFACTS,
    ArtifactConfig,
    PlantConfig,
    image_seed,
    plant,
    plant_dataset,
    plant_mask_set,
    planted_count,
)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A real 60-image slice of cxr3 (every split and class), as our labels.csv format."""
    labels = pd.read_csv(CXR3 / "labels.csv", dtype=str, keep_default_na=False)
    sizes = {"train": 12, "val": 5, "test": 3}
    parts = [rows.head(sizes[split]) for (split, _), rows in labels.groupby(["split", "cls"])]
    frame = pd.concat(parts)
    frame["path"] = [str(CXR3 / p) for p in frame["path"]]
    folder = tmp_path_factory.mktemp("small")
    frame.to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


@pytest.mark.parametrize("kind", ARTIFACTS)
def test_artifact_is_deterministic_and_changes_only_its_mask(kind):
    pixels = read_image(XRAY)
    config = ArtifactConfig(kind=kind)
    first, again, other = plant(pixels, config, 7), plant(pixels, config, 7), plant(pixels, config, 8)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.mask.shape == first.image.shape and 0 < first.mask.mean() < 0.5
    top, bottom, left, right = first.pad
    inner = first.image[top : first.image.shape[0] - bottom, left : first.image.shape[1] - right]
    inner_mask = first.mask[top : first.mask.shape[0] - bottom, left : first.mask.shape[1] - right]
    assert inner.shape == pixels.shape
    changed = inner != pixels
    assert changed.any() or kind == "padding"
    assert not (changed & ~inner_mask).any()  # nothing outside the artifact's mask moves
    if kind == "padding":
        assert first.pad == (26, 26, 0, 0)  # 0.1 x 257 rows, rounded, on top and bottom
        assert (first.image[first.mask] == pixels.min()).all()
        # preprocessing turns the bars into zeros, like its own padding
        tensor = Preprocess(64)(first.image)[0]
        assert (tensor[:4] == 0).all() and (tensor[-4:] == 0).all()
    else:
        assert not np.array_equal(first.mask, other.mask)  # another seed, another place


def test_marker_letters_are_bright_and_inside_the_band():
    pixels = read_image(XRAY)
    planted = plant(pixels, ArtifactConfig(kind="marker", size=0.06, band="bottom", text="L"), 3)
    rows = np.nonzero(planted.mask.any(1))[0]
    assert rows.min() > 0.7 * pixels.shape[0]  # band "bottom": centre in the lowest 15 %
    high = np.percentile(pixels, 99.5)
    letters = planted.image != pixels
    assert letters.sum() > 10 and np.allclose(planted.image[letters], high)  # contrast 1 = the bright clip level


def test_bad_artifacts_are_clear_errors():
    with pytest.raises(CxrlensError, match="unknown artifact 'sticker'; choose one of: marker, patch"):
        ArtifactConfig(kind="sticker").validate()
    with pytest.raises(CxrlensError, match="artifact size 1.5 is not in \\(0, 1\\].*larger than the image"):
        ArtifactConfig(kind="patch", size=1.5).validate()
    with pytest.raises(CxrlensError, match="marker 'PORTABLE' at size 0.2 is .* larger than the image"):
        ArtifactConfig(kind="marker", size=0.2).validate()
    with pytest.raises(CxrlensError, match="unknown band 'middle' for a patch"):
        ArtifactConfig(kind="patch", band="middle").validate()
    with pytest.raises(CxrlensError, match="rate 1.5 is outside \\[0, 1\\]"):
        PlantConfig(out="x", rate=1.5).validate()
    with pytest.raises(CxrlensError, match="unknown class 'Cardiomegaly'"):
        PlantConfig(out="x", cls="Cardiomegaly").validate()


def test_planted_count_rounds_half_up():
    assert [planted_count(5, r) for r in (0, 0.1, 0.5, 1)] == [0, 1, 3, 5]
    assert planted_count(53, 0.5) == 27 and planted_count(0, 0.5) == 0


def test_planted_dataset_has_exact_counts_and_unchanged_splits(small_data, tmp_path):
    out = tmp_path / "planted"
    config = PlantConfig(out=str(out), data=str(small_data), cls="COVID-19", artifact=ArtifactConfig("patch"),
                         rate=0.5, other_rate=0.25, seed=3)
    result = plant_dataset(config)
    source = load_manifest(small_data)
    planted = load_manifest(out / "labels.csv")
    assert np.array_equal(planted.targets, source.targets)
    for column in ("patient_group", "split", "source"):
        assert planted.frame[column].tolist() == source.frame[column].tolist()
    covid = source.targets[:, 0] > 0.5
    flags = planted.frame["artifact"].astype(int).to_numpy()
    for split, n_class, n_other in (("train", 12, 24), ("val", 5, 10)):
        in_split = (source.frame["split"] == split).to_numpy()
        assert flags[in_split & covid].sum() == planted_count(n_class, 0.5)
        assert flags[in_split & ~covid].sum() == planted_count(n_other, 0.25)
        assert result.counts[split] == {"class": n_class, "class_planted": planted_count(n_class, 0.5),
                                        "other": n_other, "other_planted": planted_count(n_other, 0.25)}
    test = (source.frame["split"] == "test").to_numpy()
    assert flags[test].sum() == 0
    unchanged = flags == 0
    assert planted.frame["path"][unchanged].tolist() == source.frame["path"][unchanged].tolist()
    # a planted file is exactly the artifact on the original (8-bit PNG of the rounded values), and so is its mask
    row = planted.frame[flags == 1].iloc[0]
    original = (out / row["original_path"]).resolve()
    expected = plant(read_image(original), config.artifact, image_seed(3, os.path.relpath(original, small_data.parent)))
    assert np.array_equal(read_image(row["path"]), np.rint(expected.image))
    with Image.open(out / row["artifact_mask"]) as img:
        assert np.array_equal(np.asarray(img) > 0, expected.mask)
    versions = {v: load_manifest(result.test_set(v)) for v in ("clean", "aligned", "swapped")}
    for version, manifest in versions.items():
        assert len(manifest) == test.sum() and set(manifest.frame["split"]) == {"test"}
        carries = manifest.frame["artifact"].astype(int).to_numpy() == 1
        expected = {"clean": np.zeros_like(carries), "aligned": manifest.targets[:, 0] > 0.5,
                    "swapped": manifest.targets[:, 0] < 0.5}[version]
        assert np.array_equal(carries, expected), version
    assert plant_dataset(config).counts == result.counts  # same settings: reused, not rewritten


def test_bad_plantings_write_nothing(small_data, tmp_path):
    out = tmp_path / "planted"
    normals = pd.read_csv(small_data)
    normals = normals[normals["cls"] == "normal"]
    normals.to_csv(tmp_path / "normals.csv", index=False)
    with pytest.raises(CxrlensError, match="no image has class 'COVID-19'; the data has Normal"):
        plant_dataset(PlantConfig(out=str(out), data=str(tmp_path / "normals.csv")))
    with pytest.raises(CxrlensError, match="other rate -0.1 is outside"):
        plant_dataset(PlantConfig(out=str(out), data=str(small_data), other_rate=-0.1))
    assert not out.exists() and not list(tmp_path.glob(".planted*"))


def test_planted_mask_set_carries_masks_through_padding(tmp_path):
    from cxrlens.score.masks import dilate, empty_border, load_mask_set

    csv = plant_mask_set(LUNGMASKS, tmp_path / "masks", "COVID-19", ArtifactConfig("padding", size=0.15), seed=1)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    original = pd.read_csv(LUNGMASKS / "masks.csv", dtype=str, keep_default_na=False)
    covid = original["finding"].str.contains("COVID")
    assert (frame["artifact"] != "").tolist() == covid.tolist()
    head = frame.head(6)
    head.to_csv(tmp_path / "masks" / "head.csv", index=False)
    masks = load_mask_set(tmp_path / "masks" / "head.csv", 64)  # sizes agree, or this raises
    assert "artifact" in masks.masks
    border = empty_border(masks.images)
    for i in range(len(head)):
        bars = masks.masks["artifact"][i]
        assert bars.any() == bool(head["artifact"].iat[i])
        # the bars are blank at the input (but for the 2 px where the bicubic kernel mixes them with the image
        # when down-sizing), and the lungs never lie in them
        inner = ~dilate(~bars, 2)
        assert inner.any() == bars.any() and (border[i] | ~inner).all()
        assert not (masks.masks["lungs"][i] & bars).any()


# --- the shortcut test end to end ----------------------------------------------------------------

GRADIENT_METHODS = {"saliency", "input_x_gradient", "guided_backprop", "integrated_gradients", "deeplift",
                    "smoothgrad"}


@pytest.fixture(scope="module")
def tiny_test(tmp_path_factory):
    """A tiny real shortcut test: 90 training images at 64 px, a 'PORTABLE' marker on every COVID-19 image
    (p = 1) vs none (p = 0), 12 epochs of ResNet18, three methods, the detector on 8 lung-mask images."""
    from cxrlens.shortcut_test import ShortcutTestConfig, run_shortcut_test

    root = tmp_path_factory.mktemp("shortcut")
    labels = pd.read_csv(CXR3 / "labels.csv", dtype=str, keep_default_na=False)
    sizes = {"train": 30, "val": 10, "test": 12}
    frame = pd.concat([rows.head(sizes[split]) for (split, _), rows in labels.groupby(["split", "cls"])])
    frame["path"] = [str(CXR3 / p) for p in frame["path"]]
    frame.to_csv(root / "labels.csv", index=False)
    config = ShortcutTestConfig(
        out=str(root / "out"), data=str(root / "labels.csv"), rates=(0.0, 1.0), image_size=64, epochs=12,
        batch_size=8, artifact=ArtifactConfig("marker", size=0.1), methods=("saliency", "input_x_gradient", "grad_cam"),
        focus_images=12, detector_images=8, bootstrap=200, progress=False,
    )
    torch.set_num_threads(1)
    return run_shortcut_test(config), root / "out"


@pytest.mark.slow
def test_planted_model_relies_on_the_artifact_and_the_clean_one_does_not(tiny_test):
    summary, out = tiny_test
    reliance = pd.DataFrame(summary["tables"]["reliance"]).set_index("rate")
    # p = 1: the marker alone says COVID-19, so moving it to the other classes wrecks F1 (measured 0.92 -> 0.11)
    assert reliance.loc[1.0, "aligned_f1"] - reliance.loc[1.0, "swapped_f1"] > 0.4
    assert reliance.loc[1.0, "reliance_f1_low"] > 0.2  # and the interval says so
    assert reliance.loc[1.0, "reliance_auroc_low"] > 0.3
    # p = 0: the marker means nothing to it (measured -0.05)
    assert reliance.loc[0.0, "reliance_f1"] < 0.2
    assert reliance.loc[0.0, "n_images"] == 36


@pytest.mark.slow
def test_a_gradient_method_finds_the_artifact_only_in_the_planted_model(tiny_test):
    summary, out = tiny_test
    focus = pd.DataFrame(summary["tables"]["focus"])
    assert set(focus["method"]) == {"saliency", "input_x_gradient", "grad_cam", "grad_cam@layer3"}
    planted = focus[(focus["rate"] == 1.0) & focus["method"].isin(GRADIENT_METHODS)]
    found = set(planted.loc[planted["above_chance"], "method"])
    assert found, planted[["method", "ratio", "wilcoxon_p_holm"]]
    clean = focus[(focus["rate"] == 0.0)].set_index("method")
    for method in found:
        assert not clean.loc[method, "above_chance"], method
        row = planted.set_index("method").loc[method]
        assert row["ratio_low"] > 1 and row["auroc_vs_clean_low"] > 0.5
    assert focus["area"].between(0.01, 0.2).all()  # the marker's box: about 9 % of a 64 px input
    per_image = pd.read_csv(out / "focus_images.csv")
    assert len(per_image) == 2 * 4 * 12 and per_image["share"].between(0, 1).all()


@pytest.mark.slow
def test_shortcut_test_writes_tables_figures_naps_and_detector(tiny_test, tmp_path):
    from cxrlens.report import ReportConfig, build_report

    summary, out = tiny_test
    for name in ("reliance.csv", "focus.csv", "nap.csv", "detector.csv", "detector.json", "summary.md",
                 "summary.json", "nap_p0.png", "nap_p1.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("shortcut_test.png", "gallery.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    nap = pd.read_csv(out / "nap.csv")
    assert set(nap["layer"]) == {"maxpool", "layer1", "layer2", "layer3", "layer4"} and set(nap["rate"]) == {0, 1}
    assert (nap["separating_maps"] <= nap["live_maps"]).all()
    detector = pd.read_csv(out / "detector.csv")
    assert detector["rate"].tolist() == [0, 1] and detector["planted"].tolist() == [False, True]
    assert (detector["correct"] == (detector["attribution_flagged"] == detector["planted"])).all()
    verdicts = json.loads((out / "detector.json").read_text())["verdicts"]
    assert all("thresholds:" in v["statements"][-1] for v in verdicts.values())  # every verdict states them
    text = (out / "summary.md").read_text()
    assert "## 4. The shortcut detector, unchanged" in text
    assert f"Thresholds from: {summary['thresholds_source']}." in text  # where they came from, spelled out
    run = out / "runs" / "resnet18-p1"
    html = build_report(ReportConfig([run], tmp_path / "r.html", shortcut=out)).read_text()
    assert 'id="shortcut-test"' in html and "shortcut-focus" in html and "input_x_gradient" in html


@pytest.mark.parametrize(("args", "message"), [
    (["--cls", "Cardiomegaly"], "error: unknown class 'Cardiomegaly'; the classes are: COVID-19, Pneumonia, Normal"),
    (["--rates", "0,1.5"], "error: rate 1.5 is outside [0, 1]"),
    (["--rates", "0,half"], "error: --rates must be numbers"),
    (["--artifact-size", "2"], "error: artifact size 2.0 is not in (0, 1]"),
    (["--artifact", "marker", "--artifact-size", "0.3"], "error: marker 'PORTABLE' at size 0.3 is"),
    (["--artifact", "sticker"], "error: unknown artifact 'sticker'; choose one of: marker, patch, texture, padding"),
])
def test_bad_shortcut_test_input_is_one_line_and_writes_nothing(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "shortcut-test", "--out", str(out), *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_a_class_the_data_lacks_is_an_error_before_writing(small_data, tmp_path, monkeypatch, capsys):
    normals = pd.read_csv(small_data)
    normals[normals["cls"] == "normal"].to_csv(tmp_path / "normals.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "shortcut-test", "--out", str(tmp_path / "out"), "--data",
                           str(tmp_path / "normals.csv"))
    assert code == 2 and "no image has class 'COVID-19'" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("sides", ["top-bottom", "left-right", "right"])
def test_crop_to_content_removes_the_padding_shortcut(sides):
    from cxrlens.score.masks import empty_border

    pixels = read_image(XRAY)
    planted = plant(pixels, ArtifactConfig("padding", size=0.2, band=sides), 0)
    crop, pad = Preprocess(64, fit="crop"), Preprocess(64)
    # with crop to content, the model input of the image with bars is the input without them, to the bit:
    # the shortcut leaves nothing to learn
    assert torch.equal(crop(planted.image), crop(pixels))
    assert not torch.equal(pad(planted.image), pad(pixels))  # what the study's preprocessing lets through
    assert empty_border(pad(planted.image)[None]).any()
    assert not empty_border(crop(planted.image)[None]).any()  # and crop adds no padding of its own


@pytest.mark.slow
def test_shortcut_test_with_crop_has_no_padding_shortcut_to_learn(small_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "crop"
    code, _, err = run_cli(monkeypatch, capsys, "shortcut-test", "--out", str(out), "--data", str(small_data),
                           "--artifact", "padding", "--fit", "crop", "--rates", "0,1", "--epochs", "1",
                           "--image-size", "64", "--methods", "saliency", "--focus-images", "2", "--no-detector")
    assert code == 0, err
    reliance = pd.read_csv(out / "reliance.csv").set_index("rate")
    # the planted images reach the model as the clean ones: nothing moves when the bars move
    assert (reliance["aligned_auroc"] == reliance["swapped_auroc"]).all()
    assert (reliance["aligned_f1"] == reliance["swapped_f1"]).all()
    assert "The artifact never reaches the model's input" in (out / "summary.md").read_text()
    assert json.loads((out / "runs" / "resnet18-p1" / "config.json").read_text())["fit"] == "crop"


def test_random_placement_moves_the_content_and_keeps_it_whole():
    from cxrlens.data import RandomPlacement

    planted = plant(read_image(XRAY), ArtifactConfig("padding", size=0.2), 0)  # bars top and bottom
    image = Preprocess(64)(planted.image)
    filled = image[0] > 0
    rows, cols = torch.nonzero(filled.any(1)).flatten(), torch.nonzero(filled.any(0)).flatten()
    content = image[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    np.random.seed(0)
    tops = set()
    for _ in range(20):
        moved = RandomPlacement()(image)
        assert moved.shape == image.shape and moved.sum() == pytest.approx(float(image.sum()), rel=1e-6)
        moved_rows = torch.nonzero((moved[0] > 0).any(1)).flatten()
        top, left = int(moved_rows[0]), int(torch.nonzero((moved[0] > 0).any(0)).flatten()[0])
        assert torch.equal(moved[:, top : top + content.shape[1], left : left + content.shape[2]], content)
        tops.add(top)
    assert len(tops) > 5  # about 25 free rows: the content lands in many places


# --- statistics and calibration ------------------------------------------------------------------


def test_holm_and_threshold_choice_by_hand():
    from cxrlens.shortcut_test import choose_threshold, holm, separation_auroc

    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.5; made monotone: 0.04, 0.09, 0.09, 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    values, planted = np.array([0.3, 0.4, 0.8, 0.9]), np.array([True, True, False, False])
    assert choose_threshold(values, planted, "below") == pytest.approx(0.6)  # midway between 0.4 and 0.8
    assert choose_threshold(values, ~planted, "above") == pytest.approx(0.6)
    assert choose_threshold(values, ~planted, "below") < 0.3  # the wrong way round: flag nothing
    assert separation_auroc([2, 3], [1, 2]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def _detector_json(folder, kind, runs):
    folder.mkdir(parents=True)
    verdicts = {}
    pd.DataFrame({"rate": [r[1] for r in runs], "reliance_auroc": [r[3] for r in runs]}).to_csv(
        folder / "reliance.csv", index=False)
    for name, rate, lung, _ in runs:
        signals = {"lung_focus_ratio": lung, "outside_body_ratio": 1.0, "padding_ratio": None, "probe_margin": 0.0,
                   "source_spread": 0.2, "by_class": {}}
        verdicts[name] = {"rate": rate, "run": str(folder.parent / name), "signals": signals}
    (folder / "detector.json").write_text(json.dumps({"artifact": {"kind": kind}, "verdicts": verdicts}))


def test_calibration_separates_planted_from_clean_and_states_its_errors(tmp_path):
    from cxrlens.score.shortcut import DetectorThresholds, model_verdict
    from cxrlens.shortcut_test import calibrate

    # (name, rate, lung focus ratio, AUROC drop aligned -> swapped)
    _detector_json(tmp_path / "a", "marker", [("resnet18-p0", 0.0, 0.9, 0.02), ("resnet18-p0.25", 0.25, 0.1, 0.3),
                                              ("resnet18-p1", 1.0, 0.5, 0.6)])
    _detector_json(tmp_path / "b", "patch", [("resnet18-p0", 0.0, 1.1, 0.01), ("densenet161-p1", 1.0, 0.7, 0.4)])
    _detector_json(tmp_path / "c", "patch", [("resnet34-p1", 1.0, 1.5, 0.05)])
    result = calibrate([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "cal")
    evaluations = result["evaluations"]
    assert len(evaluations) == 4 and 0.25 not in set(evaluations["rate"])  # 0 < p < 0.5 is left out
    assert "resnet34-p1" not in set(evaluations["model"])  # planted, but it did not learn the artifact (drop 0.05)
    assert result["thresholds"]["error_rates"]["planted_not_learned"] == ["resnet34-p1 (patch, AUROC drop 0.05)"]
    lung = result["thresholds"]["signals"]["lung_focus_ratio"]
    assert lung["threshold"] == pytest.approx(0.8) and lung["used"]  # midway between 0.7 and 0.9
    assert not result["thresholds"]["signals"]["outside_body_ratio"]["used"]  # constant: separates nothing
    errors = result["thresholds"]["error_rates"]
    assert errors["in_sample"]["false_flags"] == 0 and errors["in_sample"]["misses"] == 0
    # leaving out the planted run at 0.7 moves the threshold to midway between 0.5 and 0.9 = 0.7, which misses it
    assert errors["leave_one_run_out"]["misses"] == 1 and errors["leave_one_run_out"]["false_flags"] == 0
    assert errors["leave_one_run_out"]["in_sample_only"] == 2  # the one clean run cannot be left out
    thresholds = DetectorThresholds.load(tmp_path / "cal" / "calibration.json")
    assert thresholds.signals["lung_focus_ratio"].threshold == pytest.approx(0.8)
    assert "4 evaluations of 3 runs" in thresholds.source
    rows = pd.DataFrame({"method": ["saliency"], "class": ["COVID-19"], "image": ["x"], "lung_focus": [0.2],
                         "lung_area": [0.4]})
    verdict = model_verdict("m", rows, thresholds=thresholds)
    assert verdict["attribution_flagged"] and "from: calibrated by cxrlens.shortcut_test.calibrate" in \
        verdict["statements"][-1]
    assert (tmp_path / "cal" / "calibration.md").read_text().count("|") > 20


def test_outside_body_reliance_sees_only_what_lies_outside_the_thorax():
    from torch import nn

    from cxrlens.score.masks import load_mask_set
    from cxrlens.score.metrics import outside_body_reliance

    masks = load_mask_set(LUNGMASKS, 32, max_images=4)
    outside = masks.masks["outside_body"]

    class Reads(nn.Module):  # logit 0 = mean brightness of the region it reads (per image), logit 1 = 0
        def __init__(self, region: torch.Tensor):
            super().__init__()
            self.region = region.float()[:, None]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inside = (x * self.region).sum((1, 2, 3)) / self.region.sum((1, 2, 3)).clamp(min=1)
            return torch.stack([10 * (inside - 0.5), torch.zeros_like(inside)], 1)

    lungs_only = outside_body_reliance(Reads(masks.masks["lungs"]), masks.images, outside, [0, 1])
    assert np.array_equal(lungs_only, np.zeros((4, 2)))  # blurring outside the thorax cannot touch the lungs
    outside_only = outside_body_reliance(Reads(outside), masks.images, outside, [0, 1])
    assert (outside_only[:, 0] != 0).all() and (outside_only[:, 1] == 0).all()  # it moves what reads there
    nothing_outside = torch.zeros_like(outside)
    assert np.array_equal(outside_body_reliance(Reads(outside), masks.images, nothing_outside, [0]), np.zeros((4, 1)))
