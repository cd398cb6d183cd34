"""The CLI end to end on real images: evaluate, ensemble, split; and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import CXR3, run_cli

from cxrlens.runs import TrainConfig
from cxrlens.train import train


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (1, 2):
        config = TrainConfig(
            model="resnet18",
            out=str(root / f"r{seed}"),
            epochs=1,
            image_size=48,
            max_images=24,
            seed=seed,
            accelerator="cpu",
        )
        dirs.append(train(config, progress=False))
    return dirs


def test_evaluate_writes_metrics_and_plots(tiny_runs, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(tiny_runs[0]), "--out", str(tmp_path / "e"))
    assert code == 0, err
    assert out.startswith("F1: COVID-19")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_images"] == 157
    assert sum(m["tp"] + m["fn"] for m in metrics["classes"].values()) == 53 + 105 + 52
    assert set(metrics["by_source"]) == {"nih", "cohen", "hannover", "actualmed", "figure1"}
    for name in ("metrics.md", "predictions.csv", "confusion.png", "roc.png"):
        assert (tmp_path / "e" / name).stat().st_size > 100
    assert (tmp_path / "e" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_on_external_folder_data(tiny_runs, tmp_path, monkeypatch, capsys):
    """External validation: a hospital's folder-per-class images without a split column (images the run has
    not seen: copies of its training images would be refused as leaks)."""
    frame = pd.read_csv(CXR3 / "labels.csv").query("split == 'test'")
    for cls, folder in (("covid", "COVID"), ("normal", "Normal")):
        (tmp_path / "ext" / folder).mkdir(parents=True)
        for p in frame.loc[frame["cls"] == cls, "path"].head(3):
            shutil.copy(CXR3 / p, tmp_path / "ext" / folder)
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "evaluate",
        "--run",
        str(tiny_runs[0]),
        "--data",
        str(tmp_path / "ext"),
        "--out",
        str(tmp_path / "e"),
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n_images"] == 6


def test_ensemble_both_votes(tiny_runs, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "ensemble",
        "--runs",
        str(tiny_runs[0]),
        "--runs",
        str(tiny_runs[1]),
        "--out",
        str(tmp_path / "ens"),
    )
    assert code == 0, err
    for vote in ("soft", "majority"):
        assert json.loads((tmp_path / "ens" / vote / "metrics.json").read_text())["n_images"] == 157


def test_split_command_writes_patient_split(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "split",
        "--data",
        str(CXR3),
        "--out",
        str(tmp_path / "labels.csv"),
        "--fractions",
        "0.6,0.4",
        "--names",
        "train,test",
    )
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "labels.csv")
    assert set(frame["split"]) == {"train", "test"}
    assert not set(frame.loc[frame.split == "train", "patient_group"]) & set(
        frame.loc[frame.split == "test", "patient_group"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--run", "/nonexistent/run"], "is not a run folder (no config.json)"),
        (["train", "--model", "vgg16", "--out", "{tmp}/x"], "unknown model 'vgg16'"),
        (["train", "--weights", "{tmp}/none.pth", "--out", "{tmp}/x", "--epochs", "1"], "weights file not found"),
        (["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/x"], "data not found"),
        (["train", "--model", "inception_v3", "--image-size", "64", "--out", "{tmp}/x"], "at least 75 px"),
        (["evaluate", "--run", "{run}", "--split", "holdout"], "split 'holdout' does not occur"),
        (["evaluate", "--run", "{run}", "--threshold", "1.5"], "--threshold must lie in (0, 1)"),
        (["ensemble", "--runs", "{run}"], "an ensemble needs at least two runs"),
    ],
)
def test_bad_input_gets_one_clear_line(args, message, tiny_runs, tmp_path, monkeypatch, capsys):
    args = [a.format(tmp=tmp_path, run=tiny_runs[0]) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert not (tmp_path / "x" / "best.safetensors").exists()


def test_missing_checkpoint_and_corrupt_image(tiny_runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_runs[0], run)
    (run / "best.safetensors").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(run))
    assert code == 2 and "checkpoint missing: " in err and "best.safetensors" in err
    # a manifest pointing at a corrupt image: the error names the file, nothing half-written
    frame = pd.read_csv(CXR3 / "labels.csv").head(4)
    frame["path"] = [str(CXR3 / p) for p in frame["path"]]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    frame.loc[2, "path"] = str(tmp_path / "bad.jpg")
    frame.to_csv(tmp_path / "labels.csv", index=False)
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "evaluate",
        "--run",
        str(tiny_runs[0]),
        "--data",
        str(tmp_path / "labels.csv"),
        "--split",
        "all",
        "--out",
        str(tmp_path / "e"),
    )
    assert code == 2 and "cannot read image" in err and "bad.jpg" in err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_nap_command(tiny_runs, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "nap",
        "--run",
        str(tiny_runs[0]),
        "--out",
        str(tmp_path / "nap"),
        "--layers",
        "layer3,layer4",
        "--groups",
        "covid=COVID-19;other=Pneumonia & ~COVID-19",
    )
    assert code == 0, err
    stats = json.loads((tmp_path / "nap" / "nap_stats.json").read_text())
    model = stats["models"]["r1"]
    assert list(model["layers"]) == ["layer3", "layer4"]
    assert [g["name"] if isinstance(g, dict) else g for g in model["groups"]][:2] == ["covid", "other"]
    assert (tmp_path / "nap" / "nap_r1_layer4.png").is_file() and "dead feature maps" in out
