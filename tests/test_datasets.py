"""Data-set layouts: small replicas of NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, RSNA Pneumonia, VinDr-CXR,
COVIDx and Cohen in their exact file layouts, built from the real X-rays of data/cxr3 (renamed, converted to
PNG or written as DICOM) and, for NIH, the real table rows of those images (data/formats). Also: the
taxonomy presets across data sets, box masks in the scorecard, bad input, and the preprocessed cache."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CXR3, ROOT, dicom_bytes, make_run, run_cli
from PIL import Image

from cxrlens.data import Preprocess, XrayDataset, load_manifest, read_image, write_manifest
from cxrlens.datasets import FORMATS, ReadOptions, box_mask_set
from cxrlens.datasets.build import DataError
from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import CHEXPERT14, NIH14, VINDR
from cxrlens.taxonomy import CXR3 as CXR3_TAX

FORMATS_DIR = ROOT / "data" / "formats"
ROWS = pd.read_csv(CXR3 / "labels.csv", dtype=str, keep_default_na=False)
NIH_ROWS = ROWS[ROWS["source"] == "nih"].assign(name=lambda f: f["source_path"].map(os.path.basename))
NIH_ROWS = NIH_ROWS.set_index("name")
BIG = ("00010277_000.png", "00005869_001.png", "00011136_002.png")  # box images, written at NIH's 1024 px
SMALL_BOX = "00008365_000.png"  # a box image kept at 256 px: its boxes are scaled


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def xray(i: int, cls: str | None = None, split: str | None = None) -> Path:
    """The i-th cxr3 image (of a class / split), a real X-ray to rename into a replica."""
    rows = ROWS
    if cls:
        rows = rows[rows["cls"] == cls]
    if split:
        rows = rows[rows["split"] == split]
    return CXR3 / rows["path"].iat[i]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    """A DICOM file as the collections ship them (8-bit pixels stored in 8 bits, 16-bit in 16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(pixels, photometric=photometric, ViewPosition="PA"))


def rows_of(csv: Path, names: set[str]) -> str:
    """The header and the lines of a real table whose first field is one of ``names``, byte for byte."""
    lines = csv.read_text().splitlines()
    return "\n".join([lines[0]] + [line for line in lines[1:] if line.split(",")[0] in names]) + "\n"




def error_lines(err: str) -> list[str]:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in err, err
    return lines


# --- NIH ChestX-ray14 ------------------------------------------------------------------------------------


def nih_names() -> list[str]:
    """The replica's images: box images, and test-split images of both classes (for external validation)."""
    test = NIH_ROWS[NIH_ROWS["split"] == "test"].sort_index()
    picks = [*BIG, SMALL_BOX]
    picks += [n for n in test[test["cls"] == "pneumonia"].index if n not in picks][:3]
    picks += list(test[test["cls"] == "normal"].index[:3])
    picks += list(NIH_ROWS[NIH_ROWS["split"] == "val"].sort_index().index[:2])
    return picks


def build_nih(folder: Path) -> Path:
    """NIH's layout: Data_Entry_2017_v2020.csv, images/, train_val_list.txt, test_list.txt, BBox_List_2017.csv."""
    names = nih_names()
    (folder / "images").mkdir(parents=True)
    for name in names:
        img = Image.open(CXR3 / NIH_ROWS.loc[name, "path"]).convert("L")
        if name in BIG:  # the release's size, so the boxes' 1024 px coordinates apply as they are
            img = img.resize((1024, 1024), Image.Resampling.BICUBIC)
        img.save(folder / "images" / name)
    (folder / "Data_Entry_2017_v2020.csv").write_text(rows_of(FORMATS_DIR / "nih_data_entry_cxr3.csv", set(names)))
    (folder / "BBox_List_2017.csv").write_text(rows_of(FORMATS_DIR / "nih_bbox_cxr3.csv", set(names)))
    test = [n for n in names if NIH_ROWS.loc[n, "split"] == "test"]  # cxr3's split is by patient too
    (folder / "test_list.txt").write_text("\n".join(test) + "\n")
    (folder / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test) + "\n")
    return folder


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> Path:
    return build_nih(tmp_path_factory.mktemp("nih"))


def test_nih_layout_labels_official_split_and_boxes(nih):
    entry = pd.read_csv(nih / "Data_Entry_2017_v2020.csv", dtype=str)
    m = load_manifest(nih, NIH14)
    assert m.format == "nih" and len(m) == len(entry) == 12 and m.known is None
    for name, target in zip(m.frame["image"], m.targets, strict=True):
        expected = set(entry.set_index("Image Index").loc[name, "Finding Labels"].split("|"))
        assert {c for c, v in zip(NIH14.classes, target, strict=True) if v} == expected, name
    test_names = set((nih / "test_list.txt").read_text().split())
    assert set(m.frame.loc[m.frame["split"] == "test", "image"]) == test_names
    assert set(m.frame["split"]) <= {"train", "val", "test"} and "train" in set(m.frame["split"])
    groups = {s: set(m.frame.loc[m.frame["split"] == s, "patient_group"]) for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    # the same images in the study's classes: NIH's pneumonia and no-finding images, as cxr3 labels them
    study = load_manifest(nih)
    cls = study.frame["image"].map(NIH_ROWS["cls"])
    assert (study.targets[:, 1] == (cls == "pneumonia")).all() and (study.targets[:, 2] == (cls == "normal")).all()
    assert study.targets[:, 0].sum() == 0
    bbox = pd.read_csv(nih / "BBox_List_2017.csv")
    assert len(m.boxes) == len(bbox) == 8 and set(m.boxes["ref_w"]) == {1024.0}


def test_nih_boxes_become_masks_of_the_right_pixels(nih, tmp_path):
    m = load_manifest(nih, NIH14)
    folder = box_mask_set(m, tmp_path / "boxes", progress=False)
    masks = pd.read_csv(folder / "masks.csv", dtype=str, keep_default_na=False)
    assert len(masks) == 8 and (masks["lungs"] == "").all()  # 8 (image, finding) pairs of 8 boxes
    for row in masks.itertuples():
        image = (folder / row.image).resolve()
        box = m.boxes[(m.boxes["path"] == str(image)) & (m.boxes["finding"] == row.finding)].iloc[0]
        mask = grey(folder / row.opacity) > 0
        scale = mask.shape[1] / 1024  # 1 for the 1024 px images, 1/4 for the 256 px one
        x0, y0 = math.floor(box.x * scale), math.floor(box.y * scale)
        x1, y1 = math.ceil((box.x + box.w) * scale), math.ceil((box.y + box.h) * scale)
        assert mask.shape == read_image(image).shape
        assert mask[y0:y1, x0:x1].all() and mask.sum() == (x1 - x0) * (y1 - y0), row.image
    from cxrlens.score.masks import load_mask_set

    loaded = load_mask_set(folder, 64)
    assert loaded.present["opacity"].all() and not loaded.present["lungs"].any()
    assert not loaded.masks["outside_body"].any()  # no lungs drawn: the thorax is unknown, not everywhere


def test_box_masks_feed_the_scorecard(nih, tmp_path):
    """Pointing game and relevance mass inside NIH's pneumonia boxes, per finding, for a 64 px run."""
    from cxrlens.score import ScoreConfig, run_scorecard

    m = load_manifest(nih, NIH14)
    folder = box_mask_set(m, tmp_path / "boxes", progress=False)
    run = make_run(tmp_path / "r18", seed=0)
    config = ScoreConfig(masks=str(folder), methods=["saliency"], shortcut=False, steps=4, sanity_images=1,
                         sanity_steps=2, robustness_images=1, robustness_samples=2, bootstrap=50)
    card = run_scorecard([run], tmp_path / "card", config)
    images = card.images
    pneumonia = m.boxes[m.boxes["finding"] == "Pneumonia"]
    assert set(images["class"]) == {"Pneumonia"} and len(images) == len(pneumonia) == 3  # cxr3 scores pneumonia
    assert set(images["pointing_game"]) <= {0.0, 1.0}
    assert images["relevance_mass_accuracy"].between(0, 1).all() and images["lung_focus"].isna().all()
    for row in images.itertuples():  # the box lies where the image lies in the 64 px input
        box = pneumonia[pneumonia["path"].map(os.path.basename) == os.path.basename(row.image)].iloc[0]
        bound = (box.w / 16 + box.h / 16 + 2) / 64**2  # each edge moves at most 1 input px (1024 -> 64)
        assert abs(row.opacity_area - box.w * box.h / 1024**2) <= bound, row.image


def test_evaluate_a_cxr3_run_on_nih_external_validation(nih, tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "r18", seed=1)
    out = tmp_path / "eval"
    code, stdout, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(run), "--data", str(nih),
                                "--format", "nih", "--split", "test", "--out", str(out))
    assert code == 0, err
    predictions = pd.read_csv(out / "predictions.csv")
    m = load_manifest(nih).split("test")
    assert len(predictions) == len(m) == 7 and set(predictions["source"]) == {"nih"}
    truth = predictions[["true:COVID-19", "true:Pneumonia", "true:Normal"]].to_numpy()
    assert (truth == m.targets).all()
    assert "F1: COVID-19" in stdout


# --- CheXpert and MIMIC-CXR-JPG -----------------------------------------------------------------------

OBS = list(CHEXPERT14.classes)


def chexpert_row(path: str, view: str, ap_pa: str, **labels: str) -> dict:
    row = {"Path": path, "Sex": "Female", "Age": "68", "Frontal/Lateral": view, "AP/PA": ap_pa}
    return row | {o: labels.get(o.replace(" ", "_"), "") for o in OBS}


def build_chexpert(folder: Path) -> Path:
    base = folder / "CheXpert-v1.0-small"
    train = [
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP",
                     No_Finding="1.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral", "",
                     No_Finding="1.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA",
                     Pneumonia="-1.0", Lung_Opacity="1.0", Edema="0.0", Support_Devices="1.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.jpg", "Frontal", "AP",
                     Pneumonia="1.0", Consolidation="-1.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg", "Frontal", "AP",
                     Pleural_Effusion="1.0", Cardiomegaly="0.0"),
    ]
    valid = [chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "PA",
                          **{o.replace(" ", "_"): "0.0" for o in OBS} | {"No_Finding": "1.0"})]
    for i, row in enumerate(train + valid):
        target = folder / row["Path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(xray(i).read_bytes())  # CheXpert-small ships JPEGs
    pd.DataFrame(train).to_csv(base / "train.csv", index=False)
    pd.DataFrame(valid).to_csv(base / "valid.csv", index=False)
    return folder


def classes_on(taxonomy, row) -> set[str]:
    return {c for c, v in zip(taxonomy.classes, row, strict=True) if v}


def test_chexpert_uncertainty_policies_views_and_split(tmp_path):
    folder = build_chexpert(tmp_path)
    m = load_manifest(folder, CHEXPERT14)  # --uncertain ignore, frontal views
    assert m.format == "chexpert" and len(m) == 5 and m.dropped == {"view not frontal": 1}
    assert m.frame["split"].tolist() == ["train"] * 4 + ["val"]
    assert m.frame["patient_group"].iat[1] == "chexpert:patient00002" and m.frame["view"].iat[1] == "PA"
    p2, p3 = 1, 2
    pneumonia, opacity, consolidation = (CHEXPERT14.classes.index(c) for c in
                                         ("Pneumonia", "Lung Opacity", "Consolidation"))
    assert not m.known[p2, pneumonia] and m.known[p2, opacity] and m.targets[p2, opacity] == 1
    assert m.targets[p3, pneumonia] == 1 and m.targets[p3, opacity] == 1  # Lung Opacity: Pneumonia's parent
    assert not m.known[p3, consolidation] and m.known.sum() == m.known.size - 2
    assert np.isnan(m.targets_or_nan()[p2, pneumonia])
    zeros = load_manifest(folder, CHEXPERT14, options=ReadOptions(uncertain="zeros"))
    assert zeros.known is None and zeros.targets[p2, pneumonia] == 0 and zeros.targets[p3, consolidation] == 0
    ones = load_manifest(folder, CHEXPERT14, options=ReadOptions(uncertain="ones"))
    assert ones.targets[p2, pneumonia] == 1 and ones.targets[p3, consolidation] == 1
    every = load_manifest(folder, CHEXPERT14, options=ReadOptions(views="all"))
    assert len(every) == 6 and "LATERAL" in set(every.frame["view"])
    # into the study's classes: an uncertain pneumonia is unknown for Pneumonia; known not normal, and COVID-19
    # negative (CheXpert's labels cover pneumonia, of which COVID-19 is one kind, and it predates COVID-19)
    study = load_manifest(folder)
    assert classes_on(CXR3_TAX, study.known[p2]) == {"COVID-19", "Normal"} and study.targets[p2].sum() == 0
    assert classes_on(CXR3_TAX, study.targets[p3]) == {"Pneumonia"} and study.known[p3].all()
    assert study.targets[3].sum() == 0 and study.known[3].all()  # effusion only: negative for all three


def test_chexpert_value_outside_the_documented_set(tmp_path):
    folder = build_chexpert(tmp_path)
    csv = folder / "CheXpert-v1.0-small" / "train.csv"
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.loc[2, "Edema"] = "2.0"
    frame.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train.csv: 1 label values outside the documented set \(row 4, column "
                                        r"'Edema': '2.0'\)"):
        load_manifest(folder, CHEXPERT14)


def build_mimic(folder: Path) -> Path:
    """MIMIC-CXR-JPG 2.x: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg and the gzipped tables."""
    images = [  # dicom_id, subject, study, ViewPosition, ViewCodeSequence_CodeMeaning, split
        ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "postero-anterior", "train"),
        ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "lateral", "train"),
        ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "", "antero-posterior", "validate"),
        ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "11000011", "51029426", "PA", "postero-anterior", "test"),
        ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "12000012", "52000012", "PA", "postero-anterior", "test"),
    ]
    meta = pd.DataFrame(images, columns=["dicom_id", "subject_id", "study_id", "ViewPosition",
                                         "ViewCodeSequence_CodeMeaning", "split"])
    for i, (dicom, subject, study, *_rest) in enumerate(images[:4]):  # the last image's file is missing
        target = folder / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(xray(i + 10).read_bytes())
    blank = dict.fromkeys(OBS, "")
    labels = pd.DataFrame([
        {"subject_id": "10000032", "study_id": "50414267", **blank, "Pneumonia": "1.0", "Edema": "-1.0"},
        {"subject_id": "10000032", "study_id": "53189527", **blank, "No Finding": "1.0"},
        {"subject_id": "12000012", "study_id": "52000012", **blank, "Pneumothorax": "1.0"},
    ])
    for name, frame in (("metadata", meta.drop(columns="split")), ("chexpert", labels),
                        ("split", meta[["dicom_id", "study_id", "subject_id", "split"]])):
        with gzip.open(folder / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as fh:
            frame.to_csv(fh, index=False)
    return folder


def test_mimic_labels_per_study_joined_to_images_and_official_split(tmp_path):
    folder = build_mimic(tmp_path)
    with pytest.raises(CxrlensError, match="image file missing: .*ea030e7a"):
        load_manifest(folder, CHEXPERT14)
    m = load_manifest(folder, CHEXPERT14, missing="skip")
    assert m.format == "mimic" and len(m) == 2 and len(m.missing) == 1
    assert m.dropped == {"study without a label row": 1, "view not frontal": 1}
    assert m.frame["split"].tolist() == ["train", "val"] and m.frame["view"].tolist() == ["PA", "AP"]
    assert classes_on(CHEXPERT14, m.targets[0]) == {"Pneumonia", "Lung Opacity"}
    assert not m.known[0, CHEXPERT14.classes.index("Edema")]
    assert classes_on(CHEXPERT14, m.targets[1]) == {"No Finding"} and m.known[1].all()
    assert set(m.frame["patient_group"]) == {"mimic:10000032"}


# --- RSNA Pneumonia and VinDr-CXR: DICOM, boxes --------------------------------------------------------

RSNA_IDS = ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00313ee0-9eaa-42f4-b0ab-c148ed3241cd",
            "00322d4d-1c29-4943-afc9-b6754be640eb", "003d8fa0-6bf1-40ed-b54c-ac657f8495c5")


def build_rsna(folder: Path) -> Path:
    """RSNA's layout; its images are NIH's, so cxr3's NIH X-rays are renamed into place as DICOM."""
    nih = NIH_ROWS.sort_index()
    for i, pid in enumerate(RSNA_IDS):
        write_dicom(folder / "stage_2_train_images" / f"{pid}.dcm", grey(CXR3 / nih["path"].iat[i]))
    labels = pd.DataFrame([
        (RSNA_IDS[0], "40", "60", "70", "90", "1"), (RSNA_IDS[0], "90", "70", "60", "100", "1"),
        (RSNA_IDS[1], "", "", "", "", "0"), (RSNA_IDS[2], "", "", "", "", "0"),
        (RSNA_IDS[3], "130.5", "40.25", "80", "120", "1"),
    ], columns=["patientId", "x", "y", "width", "height", "Target"])
    labels.to_csv(folder / "stage_2_train_labels.csv", index=False)
    classes = ["Lung Opacity", "Lung Opacity", "Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    pd.DataFrame({"patientId": labels["patientId"], "class": classes}).to_csv(
        folder / "stage_2_detailed_class_info.csv", index=False)
    return folder


def test_rsna_dicoms_labels_and_boxes(tmp_path):
    folder = build_rsna(tmp_path / "rsna")
    m = load_manifest(folder)
    assert m.format == "rsna" and len(m) == 4 and not m.has_split
    assert [classes_on(CXR3_TAX, t) for t in m.targets] == [{"Pneumonia"}, {"Normal"}, set(), {"Pneumonia"}]
    assert m.known is None  # RSNA speaks about pneumonia and normality: all three study classes are known
    nih = load_manifest(folder, NIH14)  # ... but not about NIH's other findings
    assert classes_on(NIH14, nih.known[2]) == {"Pneumonia", "No Finding"} and nih.targets[2].sum() == 0
    assert np.array_equal(read_image(m.frame["path"].iat[0]), grey(CXR3 / NIH_ROWS.sort_index()["path"].iat[0]))
    image, target = XrayDataset(m, 32)[0]
    assert image.shape == (3, 32, 32) and target.tolist() == [0, 1, 0]
    assert len(m.boxes) == 3 and m.boxes["ref_w"].isna().all()
    masks = pd.read_csv(box_mask_set(m, tmp_path / "boxes", progress=False) / "masks.csv")
    assert len(masks) == 2  # two images with pneumonia boxes
    union = grey(tmp_path / "boxes" / masks["opacity"].iat[0]) > 0  # two boxes on the first image
    assert union.sum() == 70 * 90 + 60 * 100 - 20 * 80  # overlapping in x 90..110, y 70..150
    fractional = grey(tmp_path / "boxes" / masks["opacity"].iat[1]) > 0
    assert fractional.sum() == (211 - 130) * (161 - 40) and fractional[40:161, 130:211].all()  # edges outwards


def test_box_masks_command(tmp_path, monkeypatch, capsys):
    folder = build_rsna(tmp_path / "rsna")
    code, out, err = run_cli(monkeypatch, capsys, "box-masks", "--data", str(folder), "--out", str(tmp_path / "m"),
                             "--taxonomy", "cxr3")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "m" / "masks.csv")) == 2 and "box masks written to" in out
    code, _, err = run_cli(monkeypatch, capsys, "box-masks", "--data", str(CXR3), "--out", str(tmp_path / "n"))
    [line] = error_lines(err)
    assert code == 2 and "no boxes; localisation boxes come with NIH" in line and not (tmp_path / "n").exists()


VINDR_TRAIN = ("000434271f63a053c4128a0ba6352c7f", "00053190460d56c53cc3e57321387478")
VINDR_TEST = "002a34c58c5b758217ed1f584ccbcfe9"


def vindr_labels(image_id: str, rater: str | None, **positive: int) -> dict:
    row = {"image_id": image_id} | ({"rad_ID": rater} if rater else {})
    return row | {c: positive.get(c.replace(" ", "_").replace("/", "_"), 0) for c in VINDR.classes}


def build_vindr(folder: Path) -> Path:
    """VinDr-CXR's layout: 16-bit DICOMs (one MONOCHROME1), three radiologists per training image."""
    for i, (part, image_id, photometric) in enumerate((("train", VINDR_TRAIN[0], "MONOCHROME1"),
                                                       ("train", VINDR_TRAIN[1], "MONOCHROME2"),
                                                       ("test", VINDR_TEST, "MONOCHROME2"))):
        pixels = grey(xray(i, "pneumonia")).astype(np.uint16) * 16  # 12-bit values, as the scanners store
        write_dicom(folder / part / f"{image_id}.dicom", 4095 - pixels if photometric == "MONOCHROME1" else pixels,
                    photometric)
    (folder / "annotations").mkdir()
    a, b = VINDR_TRAIN
    pd.DataFrame([
        vindr_labels(a, "R8", Pneumonia=1, Nodule_Mass=1, Lung_Opacity=1),
        vindr_labels(a, "R9", Pneumonia=1, Lung_Opacity=1),
        vindr_labels(a, "R10", No_finding=1),
        *[vindr_labels(b, r, No_finding=1) for r in ("R8", "R9", "R10")],
    ]).to_csv(folder / "annotations" / "image_labels_train.csv", index=False)
    pd.DataFrame([vindr_labels(VINDR_TEST, None, Pneumothorax=1)]).to_csv(
        folder / "annotations" / "image_labels_test.csv", index=False)
    columns = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    pd.DataFrame([(a, "R8", "Nodule/Mass", 20, 30, 60, 70), (a, "R8", "Lung Opacity", 100, 80, 180, 200),
                  (a, "R9", "Lung Opacity", 110, 90, 190, 210), (a, "R10", "No finding", "", "", "", ""),
                  *[(b, r, "No finding", "", "", "", "") for r in ("R8", "R9", "R10")]],
                 columns=columns).to_csv(folder / "annotations" / "annotations_train.csv", index=False)
    pd.DataFrame([(VINDR_TEST, "R11", "Pneumothorax", 10, 10, 80, 120)], columns=columns).to_csv(
        folder / "annotations" / "annotations_test.csv", index=False)
    return folder


def test_vindr_radiologists_majority_or_any_and_boxes(tmp_path):
    folder = build_vindr(tmp_path)
    m = load_manifest(folder, VINDR)  # --raters majority
    assert m.format == "vindr" and len(m) == 3
    assert classes_on(VINDR, m.targets[0]) == {"Pneumonia", "Lung Opacity"}  # 2 of 3; Nodule/Mass 1 of 3
    assert classes_on(VINDR, m.targets[1]) == {"No finding"} and classes_on(VINDR, m.targets[2]) == {"Pneumothorax"}
    assert m.frame["split"].iat[2] == "test" and set(m.frame["split"][:2]) <= {"train", "val"}
    assert sorted(m.boxes["finding"]) == ["Lung Opacity", "Lung Opacity", "Pneumothorax"]  # the majority's boxes
    anyone = load_manifest(folder, VINDR, options=ReadOptions(raters="any"))
    assert classes_on(VINDR, anyone.targets[0]) == {"Pneumonia", "Lung Opacity", "Nodule/Mass"}  # not No finding
    assert len(anyone.boxes) == 4
    # the MONOCHROME1 film reads as the original picture (bone bright), up to an offset the clipping removes
    pixels, original = read_image(m.frame["path"].iat[0]), grey(xray(0, "pneumonia")).astype(np.float32) * 16
    assert np.array_equal(pixels - pixels.min(), original - original.min())
    study = load_manifest(folder)  # the study's classes: pneumonia and no finding exist in VinDr's labels
    assert [classes_on(CXR3_TAX, t) for t in study.targets] == [{"Pneumonia"}, {"Normal"}, set()]


def test_vindr_bad_values_are_one_line_each(tmp_path):
    folder = build_vindr(tmp_path)
    labels = folder / "annotations" / "image_labels_train.csv"
    frame = pd.read_csv(labels, dtype=str)
    frame.loc[1, "Pneumonia"] = "2"
    frame.to_csv(labels, index=False)
    boxes = folder / "annotations" / "annotations_train.csv"
    boxes.write_text(boxes.read_text().replace("Nodule/Mass", "Fracture"))
    with pytest.raises(DataError) as caught:
        load_manifest(folder, VINDR)
    assert len(caught.value.lines) == 2
    assert "image_labels_train.csv: 1 label values outside the documented set (row 3, column 'Pneumonia': '2')" \
        in caught.value.lines[0]
    assert "annotations_train.csv: 1 label values outside the documented set (row 2, column 'class_name': " \
           "'Fracture')" in caught.value.lines[1]


# --- COVIDx and Cohen -----------------------------------------------------------------------------------


def build_covidx(folder: Path, binary: bool = True) -> Path:
    """COVIDx CXR's image lists: patient_id filename label data_source (a file name with a space too)."""
    lines = {"train": [("101", "covid-a.png", "positive", "cohen"), ("7", "rsna b.png", "negative", "rsna"),
                       ("8", "normal-c.png", "negative", "sirm")],
             "test": [("102", "covid-d.png", "positive", "actualmed")]}
    if not binary:
        lines = {split: [(p, f, {"covid-a.png": "COVID-19", "covid-d.png": "COVID-19", "rsna b.png": "pneumonia"}
                          .get(f, "normal"), s) for p, f, _, s in rows] for split, rows in lines.items()}
    cls = {"covid-a.png": "covid", "covid-d.png": "covid", "rsna b.png": "pneumonia", "normal-c.png": "normal"}
    for split, rows in lines.items():
        for i, (_, name, _, _) in enumerate(rows):
            (folder / split).mkdir(parents=True, exist_ok=True)
            Image.open(xray(i, cls[name])).convert("L").save(folder / split / name)
        (folder / f"{split}.txt").write_text("\n".join(" ".join(r) for r in rows) + "\n")
    return folder


def test_covidx_labels_and_data_source(tmp_path):
    m = load_manifest(build_covidx(tmp_path / "v3"))
    assert m.format == "covidx" and len(m) == 4
    assert set(m.frame["source"]) == {"cohen", "rsna", "sirm", "actualmed"}  # the shortcut risk, kept in sight
    assert m.frame["patient_group"].iat[1] == "covidx:rsna:7" and m.frame["path"].iat[1].endswith("train/rsna b.png")
    assert classes_on(CXR3_TAX, m.targets[0]) == {"COVID-19", "Pneumonia"}  # positive: COVID-19 and its parent
    assert classes_on(CXR3_TAX, m.known[0]) == {"COVID-19", "Pneumonia"}  # a positive says nothing of Normal
    assert classes_on(CXR3_TAX, m.known[1]) == {"COVID-19"} and m.targets[1].sum() == 0  # negative: only COVID
    assert set(m.frame["split"]) <= {"train", "val", "test"} and m.frame["split"].iat[3] == "test"
    nih = load_manifest(tmp_path / "v3", NIH14)  # COVID-19-negative says nothing about NIH's pneumonia
    assert len(nih) == 2 and nih.dropped == {"no label of taxonomy nih14": 2}
    early = load_manifest(build_covidx(tmp_path / "v1", binary=False))
    assert early.known is None
    assert [classes_on(CXR3_TAX, t) for t in early.targets] == [{"COVID-19", "Pneumonia"}, {"Pneumonia"},
                                                                 {"Normal"}, {"COVID-19", "Pneumonia"}]
    (tmp_path / "v3" / "test.txt").write_text("102 covid-d.png maybe actualmed\n")
    with pytest.raises(DataError, match=r"1 labels outside the documented set \(test.txt line 1: 'maybe'\)"):
        load_manifest(tmp_path / "v3")


def test_cohen_early_and_hierarchical_findings(tmp_path):
    (tmp_path / "images").mkdir()
    findings = ["COVID-19, ARDS", "Streptococcus", "Pneumonia/Viral/COVID-19", "No Finding", "todo",
                "Pneumonia/Bacterial/Klebsiella", "COVID-19"]
    views = ["PA", "AP", "AP Supine", "PA", "PA", "L", "Axial"]
    modality = ["X-ray"] * 6 + ["CT"]
    names = [f"img{i}.jpg" for i in range(len(findings))]
    for i, name in enumerate(names):
        (tmp_path / "images" / name).write_bytes(xray(i).read_bytes())
    meta = pd.DataFrame({"patientid": [str(i) for i in range(len(names))], "offset": "", "sex": "M", "age": "50",
                         "finding": findings, "view": views, "modality": modality, "folder": "images",
                         "filename": names})
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    m = load_manifest(tmp_path)
    assert m.format == "cohen"
    assert m.dropped == {"not an X-ray": 1, "view not frontal": 1, "no label of taxonomy cxr3": 1}  # CT, L, todo
    assert [classes_on(CXR3_TAX, t) for t in m.targets] == [{"COVID-19", "Pneumonia"}, {"Pneumonia"},
                                                            {"COVID-19", "Pneumonia"}, {"Normal"}]
    nih = load_manifest(tmp_path, NIH14)  # COVID-19 and the kinds of pneumonia read as NIH's Pneumonia
    assert [classes_on(NIH14, t) for t in nih.targets] == [{"Pneumonia"}, {"Pneumonia"}, {"Pneumonia"},
                                                           {"No Finding"}]
    meta.loc[0, "filename"] = "../../escape.jpg"
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"metadata.csv: 1 image paths outside the data folder \(row 2: "):
        load_manifest(tmp_path)


# --- bad input through the command line -----------------------------------------------------------------


def test_bad_layouts_and_rows_give_one_error_line_each(nih, tmp_path, monkeypatch, capsys):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("not a data set")
    code, _, err = run_cli(monkeypatch, capsys, "check-data", "--data", str(tmp_path / "odd"))
    [line] = error_lines(err)
    assert code == 2 and "no labels.csv, metadata.csv or class folders" in line
    for looked in ("Data_Entry_2017*.csv", "CheXpert-v1.0*/train.csv", "mimic-cxr-2.0.0-metadata.csv",
                   "stage_2_train_labels.csv", "annotations/image_labels_train.csv", "train.txt"):
        assert looked in line, looked
    code, _, err = run_cli(monkeypatch, capsys, "check-data", "--data", str(nih), "--format", "chexpert")
    assert code == 2 and "no CheXpert-v1.0*/train.csv" in error_lines(err)[0]
    # a label outside NIH's set and a path outside the folder: two lines; a missing image: a third kind
    broken = build_nih(tmp_path / "nih")
    entry = broken / "Data_Entry_2017_v2020.csv"
    text = entry.read_text().replace(",Pneumonia,", ",Pneumonitis,", 1).replace(BIG[1], "../../" + BIG[1], 1)
    entry.write_text(text)
    code, _, err = run_cli(monkeypatch, capsys, "check-data", "--data", str(broken), "--taxonomy", "nih14")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 2
    assert "1 rows with labels outside NIH's 14 findings and 'No Finding'" in lines[0] and "'Pneumonitis'" in lines[0]
    assert "1 image paths outside the data folder (row " in lines[1]
    build_nih(tmp_path / "nih2")
    (tmp_path / "nih2" / "images" / BIG[2]).unlink()
    code, _, err = run_cli(monkeypatch, capsys, "split", "--data", str(tmp_path / "nih2"), "--out",
                           str(tmp_path / "labels.csv"))
    [line] = error_lines(err)
    assert code == 2 and f"image file missing: {tmp_path / 'nih2' / 'images' / BIG[2]}" in line
    assert "--skip-missing" in line
    code, out, err = run_cli(monkeypatch, capsys, "split", "--data", str(tmp_path / "nih2"), "--out",
                             str(tmp_path / "labels.csv"), "--skip-missing")
    assert code == 0 and "1 rows with a missing image left out" in out


def test_unknown_option_values_are_errors():
    with pytest.raises(CxrlensError, match="unknown data format 'dicomdir'; choose auto or one of: labels"):
        load_manifest(CXR3, options=ReadOptions(format="dicomdir"))
    with pytest.raises(CxrlensError, match="--uncertain must be one of ignore, zeros, ones"):
        load_manifest(CXR3, options=ReadOptions(uncertain="maybe"))
    assert list(FORMATS)[:3] == ["labels", "cohen", "folders"] and "vindr" in FORMATS


def test_any_manifest_written_by_split_reads_back_with_unknown_labels(tmp_path):
    covidx = load_manifest(build_covidx(tmp_path / "v3"))
    write_manifest(covidx, tmp_path / "labels.csv")
    back = load_manifest(tmp_path / "labels.csv")
    assert back.format == "labels" and (back.targets == covidx.targets).all()
    assert (back.known == covidx.known).all() and back.frame["source"].tolist() == covidx.frame["source"].tolist()


def test_views_option_keeps_chosen_views(tmp_path):
    rows = ROWS.head(6).copy()
    rows["path"] = [str(CXR3 / p) for p in rows["path"]]
    rows["view"] = ["PA", "AP", "LATERAL", "LL", "", "AP Supine"]
    rows.to_csv(tmp_path / "labels.csv", index=False)
    assert len(load_manifest(tmp_path)) == 4  # frontal keeps images whose view is not recorded
    assert len(load_manifest(tmp_path, options=ReadOptions(views="lateral"))) == 2
    assert load_manifest(tmp_path, options=ReadOptions(views="PA,ap supine")).frame["view"].tolist() == [
        "PA", "AP SUPINE"]
    assert len(load_manifest(tmp_path, options=ReadOptions(views="all"))) == 6


# --- unknown labels in the loss and the metrics -----------------------------------------------------------


def test_unknown_labels_are_left_out_of_loss_and_metrics():
    import torch
    import torch.nn.functional as F

    from cxrlens.evaluate import compute_metrics
    from cxrlens.train import known_bce

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=generator)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    known = torch.ones_like(targets, dtype=torch.bool)
    known[1, 1] = known[4, 0] = known[5, 2] = False
    with_nan = targets.masked_fill(~known, float("nan"))
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.allclose(known_bce(logits, with_nan), expected, rtol=1e-6)  # float32 sums of 15 terms
    assert torch.equal(known_bce(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))
    probs = torch.sigmoid(logits).numpy()
    metrics = compute_metrics(probs, with_nan.numpy(), ["a", "b", "c"], 0.5)
    for i, name in enumerate("abc"):  # each class on its known images alone
        keep = known[:, i].numpy()
        alone = compute_metrics(probs[keep][:, [i]], targets.numpy()[keep][:, [i]], [name], 0.5)["classes"][name]
        assert metrics["classes"][name] == pytest.approx(alone, nan_ok=True)


# --- the preprocessed image cache -----------------------------------------------------------------------


def test_image_cache_is_reused_keyed_on_settings_and_refreshed_when_a_file_changes(tmp_path):
    import shutil

    from cxrlens.datasets.cache import ImageCache

    paths = [str(tmp_path / f"x{i}.jpg") for i in range(3)]
    for i, path in enumerate(paths):
        shutil.copy(xray(i), path)
    cache = ImageCache(tmp_path / "cache", Preprocess(32))
    assert cache.build(paths, progress=False) == 3 and cache.build(paths, progress=False) == 0
    again = ImageCache(tmp_path / "cache", Preprocess(32))  # another process: the index on disk
    assert again.dir == cache.dir and again.build(paths, progress=False) == 0
    for i, (shard, slot) in enumerate(again.locate(paths)):
        exact = Preprocess(32)(read_image(paths[i]))
        assert (again.tensor(shard, slot) - exact).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding
    for other in (Preprocess(48), Preprocess(32, clip_high=99.0)):  # other settings: another cache, built anew
        other_cache = ImageCache(tmp_path / "cache", other)
        assert other_cache.dir != cache.dir and other_cache.build(paths, progress=False) == 3
    shutil.copy(xray(5), paths[1])  # a changed file is decoded again, the others are not
    os.utime(paths[1], ns=(1, 1))
    assert again.build(paths, progress=False) == 1
    shard, slot = again.locate([paths[1]])[0]
    assert (again.tensor(shard, slot) - Preprocess(32)(read_image(paths[1]))).abs().max() <= 0.5 / 255 + 1e-6


def test_training_loaders_read_from_the_cache(tmp_path):
    from cxrlens.runs import TrainConfig
    from cxrlens.train import make_loaders

    manifest = load_manifest(CXR3)
    small = manifest.select(manifest.frame.index.isin(
        [*manifest.frame.index[manifest.frame["split"] == "train"][:6],
         *manifest.frame.index[manifest.frame["split"] == "val"][:3]]))
    config = TrainConfig(image_size=32, batch_size=3, augment=False, cache=str(tmp_path / "cache"))
    train, val = make_loaders(config, small, progress=False)
    assert train.dataset.images.disk_cache is not None and val.dataset.disk_cache is not None
    cached = torch_stack_batches(val)
    plain = torch_stack_batches(make_loaders(TrainConfig(image_size=32, batch_size=3, augment=False), small,
                                             progress=False)[1])
    assert cached.shape == plain.shape == (3, 3, 32, 32)
    assert (cached - plain).abs().max() <= 0.5 / 255 + 1e-3  # uint8 vs float16 (1e-3: float16 at 1.0)


def torch_stack_batches(loader):
    import torch

    return torch.cat([images for images, _ in loader])


def test_saved_targets_are_used_for_their_own_taxonomy_only(tmp_path):
    nih = load_manifest(build_nih(tmp_path / "nih"), NIH14)
    write_manifest(nih, tmp_path / "labels.csv")
    assert (load_manifest(tmp_path / "labels.csv", NIH14).targets == nih.targets).all()
    study = load_manifest(tmp_path / "labels.csv")  # another taxonomy: NIH's findings, read afresh
    assert (study.targets == load_manifest(tmp_path / "nih").targets).all()
