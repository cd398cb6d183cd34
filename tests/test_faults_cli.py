"""The CLI's fault corpus (issue 10): every bad input or option ends with exit status 2, exactly one
``error:`` line naming the file or option and the fix, no traceback, and nothing written; undefined
metrics are shown as such. (Training faults: tests/test_faults_train.py; the web app's:
tests/test_serve_faults.py.)"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import XRAY, assert_one_error_line, dicom_bytes, make_run, png_with_size, run_cli
from PIL import Image

from cxrlens.data import MAX_PIXELS, Preprocess, load_image_tensor, read_image
from cxrlens.evaluate import compute_metrics, detail_markdown, markdown_table, write_evaluation


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "r18", seed=0)


def _bad_images(folder: Path) -> dict[str, Path]:
    with warnings.catch_warnings():  # pydicom warns, rightly, while writing the NaN slope
        warnings.simplefilter("ignore")
        return _write_bad_images(folder)


def _write_bad_images(folder: Path) -> dict[str, Path]:
    files = {
        "truncated.jpg": XRAY.read_bytes()[:600],
        "empty.png": b"",
        "renamed.png": b"name,finding\nthis is a CSV file, not an image\n",
        "bomb.png": png_with_size(12_000, 9_000),  # 108 MP declared in 70 bytes: Pillow's guard fires
        "bomb-75mp.png": png_with_size(10_000, 7_500),  # between our cap and Pillow's: ours fires
        "nan-slope.dcm": dicom_bytes(np.full((32, 32), 900), RescaleSlope="NaN"),
        "bomb.dcm": dicom_bytes(np.zeros((4, 4)), rows=9_000, cols=9_000),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.mark.parametrize(
    ("image", "fragments"),
    [
        ("truncated.jpg", ["truncated.jpg", "replace the file"]),
        ("empty.png", ["empty.png", "replace the file"]),
        ("renamed.png", ["renamed.png", "replace the file"]),
        ("bomb.png", ["bomb.png", "108 megapixels is over the limit of 50 megapixels", "downscale"]),
        ("bomb-75mp.png", ["bomb-75mp.png", "10000x7500 pixels is over the limit of 50 megapixels"]),
        ("nan-slope.dcm", ["nan-slope.dcm", "non-finite pixel values", "RescaleSlope"]),
        ("bomb.dcm", ["bomb.dcm", "9000x9000 pixels is over the limit"]),
    ],
)
def test_explain_refuses_bad_images_before_writing(image, fragments, run, tmp_path, monkeypatch, capsys):
    bad = _bad_images(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--run", str(run), "--image", str(bad[image]),
                           "--out", str(tmp_path / "out"), "--methods", "saliency")
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--output", "prob"], ["output must be one of sigmoid, logit, got 'prob'"]),
        (["--max-batch", "0"], ["max_batch must be a positive int, got 0"]),
        (["--max-batch", "big"], ["Invalid value for '--max-batch'", "see `cxrlens explain --help`"]),
        (["--methods", "lime"], ["unknown attribution method 'lime'; choose one of: occlusion"]),
        (["--targets", "Flu"], ["unknown class 'Flu'"]),
        (["--methods", "occlusion"], ["occlusion window 50x50 is larger than the 32x32 image"]),
    ],
)
def test_explain_refuses_bad_options_before_writing(args, fragments, tmp_path, monkeypatch, capsys):
    small = make_run(tmp_path / "r18-32", seed=0, size=32)
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--run", str(small), "--image", str(XRAY),
                           "--out", str(tmp_path / "out"), *args)
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_method_failing_on_one_model_fails_the_command(run, tmp_path, monkeypatch, capsys):
    """A model whose registered Grad-CAM layer does not exist: saliency is written, grad_cam fails, and
    so does the command (it used to print 'explained 1 image(s)' and exit 0)."""
    import cxrlens.models

    spec = cxrlens.models.MODELS["resnet18"]
    monkeypatch.setitem(cxrlens.models.MODELS, "resnet18", replace(spec, gradcam_layer="layer9"))
    code, out, err = run_cli(monkeypatch, capsys, "explain", "--run", str(run), "--image", str(XRAY),
                             "--out", str(tmp_path / "out"), "--methods", "saliency,grad_cam")
    assert_one_error_line(code, err, "1 method run(s) failed", "r18 / grad_cam: unknown layer 'layer9'",
                          str(tmp_path / "out"))
    assert "explained" not in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "error" in summary["models"]["r18"]["methods"]["grad_cam"]
    assert (tmp_path / "out" / "maps" / XRAY.stem / "r18" / "saliency.npy").is_file()


@pytest.mark.parametrize(
    "args",
    [["nosuch"], ["train", "--image-size", "big"], ["train", "--bogus", "1"], ["explain", "--out", "x"],
     ["evaluate", "--run"]],
)
def test_command_line_mistakes_are_one_line(args, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_error_line(code, err, "see `cxrlens")


def test_corrupt_weights_are_one_line(run, tmp_path, monkeypatch, capsys):
    broken = shutil.copytree(run, tmp_path / "broken")
    (broken / "best.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(broken), "--out", str(tmp_path / "e"))
    assert_one_error_line(code, err, "best.safetensors")
    assert not (tmp_path / "e").exists()


def test_ensemble_refuses_images_a_run_was_trained_on(run, tmp_path, monkeypatch, capsys):
    """External data holding a copy of a training image, renamed: refused, or recorded once with
    --allow-leaks although both runs were trained on it."""
    import pandas as pd
    from conftest import CXR3

    frame = pd.read_csv(CXR3 / "labels.csv")
    external = tmp_path / "hospital"
    for folder, cls in {"COVID": "covid", "Normal": "normal"}.items():
        (external / folder).mkdir(parents=True)
        for path in frame[(frame["split"] == "test") & (frame["cls"] == cls)]["path"].head(2):
            shutil.copy(CXR3 / path, external / folder)
    shutil.copy(CXR3 / frame[frame["split"] == "train"]["path"].iloc[0], external / "COVID" / "renamed.jpg")
    other = make_run(tmp_path / "r18-b", seed=1)
    args = ["ensemble", "--runs", str(run), "--runs", str(other), "--data", str(external), "--split", "all",
            "--out", str(tmp_path / "ens")]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_error_line(code, err, "renamed.jpg", "--allow-leaks")
    assert not (tmp_path / "ens").exists()
    code, out, err = run_cli(monkeypatch, capsys, *args, "--allow-leaks")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ens" / "soft" / "metrics.json").read_text())
    assert len(metrics["leaks_allowed"]) == 1 and "renamed.jpg" in metrics["leaks_allowed"][0]


# --- undefined metrics -------------------------------------------------------------------------------

def _no_normal_positives() -> tuple[np.ndarray, np.ndarray]:
    """Six COVID-19 images (as on a source that has only COVID-19): 'Normal' has no positive image."""
    targets = np.array([[1, 1, 0]] * 6, dtype=float)
    probs = np.array([[0.9, 0.8, 0.7], [0.8, 0.6, 0.2], [0.3, 0.9, 0.1],
                      [0.7, 0.7, 0.6], [0.9, 0.4, 0.3], [0.6, 0.9, 0.4]])
    return probs, targets


def test_undefined_metrics_are_nan_and_left_out_of_averages() -> None:
    probs, targets = _no_normal_positives()
    m = compute_metrics(probs, targets, ["COVID-19", "Pneumonia", "Normal"], 0.51)
    normal = m["classes"]["Normal"]
    assert normal["support"] == 0 and normal["fp"] == 2
    assert math.isnan(normal["recall"]) and math.isnan(normal["f1"]) and math.isnan(normal["auroc"])
    assert normal["precision"] == 0.0 and normal["specificity"] == pytest.approx(4 / 6)  # both defined
    assert math.isnan(m["classes"]["COVID-19"]["specificity"])  # no negative image
    defined = [m["classes"][c]["f1"] for c in ("COVID-19", "Pneumonia")]
    assert m["macro"]["f1"] == pytest.approx(np.mean(defined))  # not dragged down by a 0 for Normal
    table = detail_markdown(m, "one source")
    assert "| Normal | 0.000 | n/a | 0.667 | n/a | n/a | 0 |" in table
    assert "n/a" in markdown_table({"model": m}, ["COVID-19", "Pneumonia", "Normal"]).splitlines()[2]


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    import pandas as pd

    probs, targets = _no_normal_positives()
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "source": ["hannover"] * 6})
    write_evaluation(tmp_path, "t", probs, targets, frame, ["COVID-19", "Pneumonia", "Normal"], 0.51)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in metrics.json")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["by_source"]["hannover"]["classes"]["Normal"]["f1"] is None


# --- large images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_large_images_are_decoded_reduced(suffix: str, tmp_path: Path) -> None:
    """A 6,400 x 4,800 X-ray (31 MP, under the cap) for a 128 px model is decoded at a long side of at
    least 4 x 128 px, not in full; the model's input is then the same picture (a box-filtered
    reduction before the bicubic resize differs from the full decode by interpolation only)."""
    small = Image.open(XRAY).convert("L")
    big = small.resize((6400, 4800), Image.Resampling.BICUBIC)
    path = tmp_path / f"big{suffix}"
    big.save(path, quality=95)
    reduced = read_image(path, target_size=128)
    assert 512 <= max(reduced.shape) < 6400 // 4
    assert read_image(path).shape == (4800, 6400)  # without a target size: in full, as before
    assert 6400 * 4800 < MAX_PIXELS
    tensor = load_image_tensor(path, 128)
    assert tensor.shape == (3, 128, 128)
    # Against the full decode, resized the same way: interpolation differences only, far below the
    # X-ray's contrast (a misplaced or mis-scaled reduction would differ by tenths).
    reference = Preprocess(128)(read_image(path))[0].numpy()
    assert np.abs(tensor[0].numpy() - reference).mean() < 0.02
