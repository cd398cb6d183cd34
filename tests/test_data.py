"""Data: readers for every format, manifests, taxonomy, patient-level splits, preprocessing."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CXR3, dicom_bytes
from PIL import Image

from cxrlens.data import (
    Preprocess,
    XrayDataset,
    load_manifest,
    patient_kfold,
    patient_split,
    read_image,
    read_image_bytes,
    write_manifest,
)
from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import CXR3 as CXR3_TAXONOMY
from cxrlens.taxonomy import PAPER14


def test_taxonomy_derives_parents():
    assert CXR3_TAXONOMY.encode("COVID-19").tolist() == [1, 1, 0]
    assert CXR3_TAXONOMY.encode("Infiltration|Pneumonia").tolist() == [0, 1, 0]  # NIH extra words ignored
    assert CXR3_TAXONOMY.encode("No Finding").tolist() == [0, 0, 1]
    on = {c for c, v in zip(PAPER14.classes, PAPER14.encode("COVID-19"), strict=True) if v}
    assert on == {"COVID-19", "Viral Pneumonia", "Pneumonia"}
    on = {c for c, v in zip(PAPER14.classes, PAPER14.encode("Streptococcus"), strict=True) if v}
    assert on == {"Streptococcus", "Bacterial Pneumonia", "Pneumonia"}
    on = {c for c, v in zip(PAPER14.classes, PAPER14.encode("Pneumonia/Viral/COVID-19"), strict=True) if v}
    assert on == {"COVID-19", "Viral Pneumonia", "Pneumonia"}
    with pytest.raises(KeyError):
        CXR3_TAXONOMY.encode("Cardiomegaly")


def test_cxr3_manifest_matches_its_readme(cxr3_manifest):
    m = cxr3_manifest
    assert len(m) == 1059
    assert m.class_counts() == {"COVID-19": 353, "Pneumonia": 706, "Normal": 353}
    labels = pd.read_csv(CXR3 / "labels.csv")
    # derived targets equal the hand-typed 0/1 columns of the file
    assert (m.targets == labels[["covid", "pneumonia", "normal"]].to_numpy()).all()
    assert m.frame["split"].value_counts().to_dict() == {"train": 743, "val": 159, "test": 157}


def _groups_per_split(frame):
    return {s: set(frame.loc[frame["split"] == s, "patient_group"]) for s in set(frame["split"])}


def test_given_split_is_patient_disjoint(cxr3_manifest):
    groups = _groups_per_split(cxr3_manifest.frame)
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])


def test_new_splits_and_folds_are_patient_disjoint_and_stratified(cxr3_manifest):
    new = patient_split(cxr3_manifest, (0.6, 0.4), ("train", "test"), seed=1701)
    groups = _groups_per_split(new.frame)
    assert not groups["train"] & groups["test"]
    share = (new.frame["split"] == "train").mean()
    assert 0.55 < share < 0.65
    for i in range(3):  # every class is in both splits in about the same share
        cls_rows = new.targets[:, i] == 1
        assert 0.5 < (new.frame["split"][cls_rows] == "train").mean() < 0.7
    folds = patient_kfold(cxr3_manifest, 5, seed=1701)
    assert sum(f.sum() for f in folds) == len(cxr3_manifest)
    group_folds = [set(cxr3_manifest.frame["patient_group"][f]) for f in folds]
    for a in range(5):
        for b in range(a + 1, 5):
            assert not group_folds[a] & group_folds[b]


def test_split_that_does_not_occur_is_a_clear_error(cxr3_manifest):
    with pytest.raises(CxrlensError, match="split 'holdout' does not occur; the splits are: test, train, val"):
        cxr3_manifest.split("holdout")


def test_readers_png_jpeg_8_and_16_bit_rgba(tmp_path):
    ramp = (np.arange(64 * 48).reshape(48, 64) % 251).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(ramp).save(tmp_path / "a.jpg", quality=100)
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    rgba = np.stack([ramp, ramp, ramp, np.full_like(ramp, 255)], -1)
    rgba[:, :10, 3] = 0  # transparent strip goes on black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), ramp.astype(np.float32))
    assert np.abs(read_image(tmp_path / "a.jpg") - ramp).mean() < 2
    sixteen = read_image(tmp_path / "a16.png")
    assert sixteen.max() > 255 and np.array_equal(sixteen, ramp.astype(np.float32) * 257)
    rgba_grey = read_image(tmp_path / "rgba.png")
    assert (rgba_grey[:, :10] == 0).all() and np.allclose(rgba_grey[:, 10:], ramp[:, 10:], atol=1)
    # 8- and 16-bit versions of one picture preprocess to the same tensor
    p = Preprocess(32)
    assert np.allclose(p(read_image(tmp_path / "a.png")), p(sixteen), atol=1e-4)


def _write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0):
    path.write_bytes(dicom_bytes(pixels.astype(np.uint16), photometric=photometric, RescaleSlope=slope,
                                 RescaleIntercept=intercept))


def test_dicom_monochrome1_inverted_and_rescaled(tmp_path):
    pixels = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 3
    _write_dicom(tmp_path / "m2.dcm", pixels, slope=2.0, intercept=-100.0)
    _write_dicom(tmp_path / "m1", pixels, photometric="MONOCHROME1")  # no suffix: sniffed from content
    assert np.array_equal(read_image(tmp_path / "m2.dcm"), pixels * 2.0 - 100.0)
    inverted = read_image(tmp_path / "m1")
    assert np.array_equal(inverted, pixels.max() + pixels.min() - pixels.astype(np.float32))
    assert np.array_equal(read_image_bytes((tmp_path / "m1").read_bytes()), inverted)


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(CxrlensError, match="broken.png"):
        read_image(bad)
    with pytest.raises(CxrlensError, match="image not found: .*nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(CxrlensError, match="not a readable"):
        read_image_bytes(b"GIF89a not really", "up.gif")


def test_preprocess_keeps_aspect_and_zero_pads():
    wide = np.tile(np.linspace(0, 1000, 200, dtype=np.float32), (100, 1))  # 100 x 200
    out = Preprocess(64, 0, 100)(wide)[0].numpy()
    assert out.shape == (64, 64)
    assert (out[:16] == 0).all() and (out[48:] == 0).all()  # padding above and below
    assert out[16:48].max() == pytest.approx(1.0, abs=0.01) and out[16:48, -1].min() > 0.95
    assert out[16:48, 0].max() < 0.05


def test_crop_to_content_trims_bars_and_fills_the_square():
    tall = np.tile(np.linspace(10, 1000, 100, dtype=np.float32), (200, 1))  # 200 x 100, content everywhere
    barred = np.pad(tall, ((0, 0), (30, 30)), constant_values=10.0)  # black bars left and right: 200 x 160
    crop = Preprocess(64, 0, 100, fit="crop")
    out = crop(barred)[0].numpy()
    assert out.shape == (64, 64)
    # bars trimmed, short side (100) to 64, the long side centre-cropped: the full intensity ramp spans the width
    assert out[:, 0].max() < 0.05 and out[:, -1].min() > 0.95
    assert torch.equal(crop(barred), crop(tall))
    assert (out[:, 1:] > 0).all()  # no padding: only the ramp's darkest column is 0
    assert crop.label == "64px-crop" and Preprocess(64).label == "64px"
    with pytest.raises(CxrlensError, match="unknown fit 'stretch'; choose one of: pad, crop"):
        Preprocess(64, fit="stretch")


def _sample_rows(n_per_class=2):
    frame = pd.read_csv(CXR3 / "labels.csv", dtype=str)
    return pd.concat([frame[frame["cls"] == c].head(n_per_class) for c in ("covid", "pneumonia", "normal")])


def test_cohen_metadata_format(tmp_path):
    rows = _sample_rows()
    (tmp_path / "images").mkdir()
    for p in rows["path"]:
        shutil.copy(CXR3 / p, tmp_path / "images")
    findings = {
        "covid": "Pneumonia/Viral/COVID-19",
        "pneumonia": "Pneumonia/Bacterial/Streptococcus",
        "normal": "No Finding",
    }
    meta = pd.DataFrame(
        {
            "patientid": [str(i // 2) for i in range(len(rows))],
            "finding": [findings[c] for c in rows["cls"]],
            "view": ["PA", "AP", "L", "AP Supine", "PA", "AP"],
            "filename": [p.split("/")[-1] for p in rows["path"]],
        }
    )
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    m = load_manifest(tmp_path)
    assert len(m) == 5  # the lateral view is dropped
    assert m.targets.tolist()[0] == [1, 1, 0] and m.targets.tolist()[-1] == [0, 0, 1]
    paper = load_manifest(tmp_path / "metadata.csv", PAPER14)
    assert paper.targets[2, PAPER14.classes.index("Streptococcus")] == 1
    # a missing file is reported with its line in metadata.csv, although the lateral view was dropped
    meta.loc[len(meta)] = ["9", "COVID-19", "PA", "lost.png"]
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(CxrlensError, match=r"metadata.csv, row 8: image file missing: .*lost.png"):
        load_manifest(tmp_path)


def test_class_folder_format_with_split_folders(tmp_path):
    rows = _sample_rows()
    names = {"covid": "COVID", "pneumonia": "Viral Pneumonia", "normal": "Normal"}
    for i, (p, c) in enumerate(zip(rows["path"], rows["cls"], strict=True)):
        folder = tmp_path / ("train" if i % 2 else "test") / names[c]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(CXR3 / p, folder)
    m = load_manifest(tmp_path)
    assert len(m) == 6 and set(m.frame["split"]) == {"train", "test"}
    assert m.class_counts() == {"COVID-19": 2, "Pneumonia": 4, "Normal": 2}
    (tmp_path / "train" / "Fracture").mkdir()
    shutil.copy(CXR3 / rows["path"].iloc[0], tmp_path / "train" / "Fracture")
    with pytest.raises(CxrlensError, match="Fracture: folder name is not a class"):
        load_manifest(tmp_path)


def test_bad_manifests_name_file_and_row(tmp_path):
    rows = _sample_rows(1)
    rows["path"] = [str(CXR3 / p) for p in rows["path"]]
    bad_label = rows.copy()
    bad_label.loc[bad_label.index[1], "cls"] = "fracture"
    bad_label.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(CxrlensError, match=r"labels.csv, row 3: unknown label 'fracture'"):
        load_manifest(tmp_path / "labels.csv")
    missing = rows.copy()
    missing.loc[missing.index[2], "path"] = str(tmp_path / "gone.jpg")
    missing.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(CxrlensError, match=r"m.csv, row 4: image file missing: .*gone.jpg"):
        load_manifest(tmp_path / "m.csv")
    rows.rename(columns={"path": "file"}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(CxrlensError, match="cols.csv: unrecognised columns"):
        load_manifest(tmp_path / "cols.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrlensError, match="no labels.csv"):
        load_manifest(tmp_path / "empty")


def test_written_manifest_reads_back(tmp_path, cxr3_manifest):
    sample = cxr3_manifest.head(20)
    write_manifest(sample, tmp_path / "labels.csv")
    back = load_manifest(tmp_path / "labels.csv")
    assert (back.targets == sample.targets).all() and list(back.frame["path"]) == list(sample.frame["path"])


def test_dataset_yields_three_channel_tensors(cxr3_manifest):
    ds = XrayDataset(cxr3_manifest.head(3), 48)
    image, target = ds[0]
    assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1
    assert target.shape == (3,)
    assert image.sum() > 0 and (image[0] == image[2]).all()
