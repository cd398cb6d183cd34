"""Faults around training and evaluation, on real images: a kill at any instant loses nothing, a resumed run
is the run it continues, leaks and missing files are caught before anything is written, and every bad input
ends with exit status 2, exactly one `error:` line, no traceback and nothing left behind."""

from __future__ import annotations

import csv
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import CXR3, assert_one_error_line, one_thread, run_cli
from safetensors.torch import load_file

import cxrlens

DRIVER = Path(__file__).with_name("train_fault_driver.py")
SRC = Path(cxrlens.__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 48 training images, batch 8
TINY = ["--epochs", "2", "--image-size", "64", "--accelerator", "cpu"]








def real_rows(per_class: dict[str, int], split: str = "train") -> pd.DataFrame:
    """The first rows of cxr3's ``split`` per class, with absolute paths (for manifests in tmp folders)."""
    frame = pd.read_csv(CXR3 / "labels.csv")
    frame = frame[frame["split"] == split]
    rows = pd.concat([frame[frame["cls"] == c].head(n) for c, n in per_class.items()])
    return rows.assign(path=[str(CXR3 / p) for p in rows["path"]])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """48 training and 6 validation images of cxr3 (16 and 2 per class)."""
    path = tmp_path_factory.mktemp("tiny") / "labels.csv"
    train = real_rows({"covid": 16, "pneumonia": 16, "normal": 16})
    val = real_rows({"covid": 2, "pneumonia": 2, "normal": 2}, "val")
    pd.concat([train, val]).to_csv(path, index=False)
    return path


def subprocess_env(fault: str = "", at: int = 0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    return {**env, "CXRLENS_FAULT": fault, "CXRLENS_FAULT_AT": str(at)}


def cli_subprocess(*args: str, fault: str = "", at: int = 0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DRIVER), *args], env=subprocess_env(fault, at), capture_output=True, text=True,
        timeout=240, **kwargs,
    )


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """The tiny run (2 epochs), never interrupted."""
    from cxrlens.runs import TrainConfig
    from cxrlens.train import train

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    config = TrainConfig(data=str(tiny_data), out=str(run_dir), epochs=2, image_size=64, accelerator="cpu")
    with one_thread():
        return train(config, progress=False)


def resume_in_this_process(monkeypatch, capsys, run_dir: Path) -> None:
    with one_thread():
        code, _, err = run_cli(monkeypatch, capsys, "train", "--out", str(run_dir), "--resume")
    assert code == 0, err


# --- 1. a killed training loses nothing ------------------------------------------------------------


@pytest.mark.slow  # a subprocess (about 5 s to import torch and Lightning) and a few epochs
@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_run(tiny_data, reference_run, tmp_path, monkeypatch,
                                                                     capsys):
    """SIGKILL at a random step of the second (last) epoch, with --checkpoint-every 4 (saves at steps 4 and 8,
    and at the epoch ends 6 and 12); --resume then finishes a run identical to one never interrupted: same
    weights bit for bit (same data order, augmentation, optimiser, scheduler and RNG), the same history
    without duplicated rows, the same thresholds."""
    run_dir = tmp_path / "run"
    step = random.Random().randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 1)  # 7..11
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "train", "--data", str(tiny_data), "--out", str(run_dir), *TINY,
             "--checkpoint-every", "4"],
            env=subprocess_env("pause", step), stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        try:
            for line in proc.stdout:
                if f"PAUSED AT STEP {step}" in line:
                    break
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (step, (tmp_path / "stderr.txt").read_text()[-3000:])
    assert [int(r["epoch"]) for r in history(run_dir)] == [0], step  # epoch 1 was not finished
    checkpoint = torch.load(run_dir / "resume.ckpt", map_location="cpu", weights_only=True, mmap=True)
    position = [1, 2] if step >= 8 else [1, 0]  # 2 batches into epoch 1 (step 8's save), or its start
    assert checkpoint["callbacks"]["RunFolderWriter"]["position"] == position, step
    del checkpoint

    resume_in_this_process(monkeypatch, capsys, run_dir)
    assert history(run_dir) == history(reference_run), step
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(run_dir / name, reference_run / name)
    assert json.loads((run_dir / "thresholds.json").read_text()) == json.loads(
        (reference_run / "thresholds.json").read_text()
    )
    assert not list(run_dir.glob(".*")), "temporary files left behind"


@pytest.mark.slow  # a subprocess (about 5 s to import torch and Lightning) and a few epochs
@pytest.mark.timeout(300)
def test_death_while_writing_a_checkpoint_resumes_from_the_previous_epoch(tiny_data, reference_run, tmp_path,
                                                                          monkeypatch, capsys):
    """The process dies half-way through writing the second epoch's checkpoint (the writer is patched to
    write half the bytes, then SIGKILL itself): the first epoch's checkpoint is intact and the run resumes
    from it, ending identical to the uninterrupted run."""
    run_dir = tmp_path / "run"
    result = cli_subprocess("train", "--data", str(tiny_data), "--out", str(run_dir), *TINY, fault="tear", at=2)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    torn = list(run_dir.glob(".resume.ckpt.*.tmp"))
    assert len(torn) == 1 and 0 < torn[0].stat().st_size < (run_dir / "resume.ckpt").stat().st_size
    checkpoint = torch.load(run_dir / "resume.ckpt", map_location="cpu", weights_only=True, mmap=True)
    assert checkpoint["callbacks"]["RunFolderWriter"]["position"] == [1, 0]  # the end of epoch 0
    del checkpoint

    resume_in_this_process(monkeypatch, capsys, run_dir)
    assert history(run_dir) == history(reference_run)
    assert_same_weights(run_dir / "last.safetensors", reference_run / "last.safetensors")
    assert_same_weights(run_dir / "best.safetensors", reference_run / "best.safetensors")
    assert not list(run_dir.glob(".*")), "temporary files left behind"


# --- 2. --resume takes the saved settings ----------------------------------------------------------


def test_resume_refuses_other_settings_and_names_each(reference_run, monkeypatch, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()}
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "--out", str(reference_run), "--resume", "--epochs", "8",
        "--image-size", "224", "--no-augment", "--max-images", "20",
    )
    assert_one_error_line(code, err, "--image-size 224 (saved: 64)", "--augment False (saved: True)",
                          "--max-images 20 (saved: None)")
    assert "--epochs 8" not in err  # the one setting a resume may change
    # the same values as saved are no difference; a finished run needs more epochs to go on
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", str(reference_run), "--resume", "--image-size", "64")
    assert_one_error_line(code, err, "has finished its 2 epochs; pass a larger --epochs")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", str(reference_run), "--resume", "--epochs", "1")
    assert_one_error_line(code, err, "has trained 2 epochs already; --epochs 1 is not more")
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()} == before  # nothing touched


def test_fresh_run_into_a_run_folder_is_refused(reference_run, tiny_data, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", str(tiny_data), "--out", str(reference_run))
    assert_one_error_line(code, err, "already holds a run; use --resume")


# --- 3. leaks, conflicts and missing files -----------------------------------------------------------


def leaky_manifest(tmp_path: Path, kind: str) -> Path:
    """A small manifest of real rows with one leak or conflict of ``kind``."""
    train = real_rows({"covid": 4, "pneumonia": 4, "normal": 4})
    val = real_rows({"covid": 2, "normal": 2}, "val")
    test = real_rows({"covid": 2, "normal": 2}, "test")
    if kind == "path":  # one image in train as COVID-19 and in test as normal
        leak = train.iloc[[0]].assign(split="test", cls="normal", patient_group="someone else")
        test = pd.concat([test, leak])
    elif kind == "pixels":  # a byte copy under another name, in the test split
        copy = tmp_path / "copy-of-a-training-image.jpg"
        shutil.copy(train["path"].iloc[1], copy)
        test = pd.concat([test, train.iloc[[1]].assign(split="test", path=str(copy), patient_group="another")])
    elif kind == "patient":  # a second film of a training patient, in the validation split
        val = val.copy()
        val.iloc[0, val.columns.get_loc("patient_group")] = train["patient_group"].iloc[2]
    path = tmp_path / f"{kind}.csv"
    pd.concat([train, val, test]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("path", ["1 leak(s) between splits and 1 image(s) with conflicting labels",
                  "the same file in row 2 (train), row 22 (test)", "row 22 (test, Normal)"]),
        ("pixels", ["1 leak(s) between splits", "the same pixels in row 3 (train), row 22 (test)"]),
        ("patient", ["1 leak(s) between splits", "in row 4 (train), row 14 (val)"]),
    ],
)
def test_leaks_are_refused_before_anything_is_written(kind, fragments, tmp_path, monkeypatch, capsys):
    manifest = leaky_manifest(tmp_path, kind)
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", str(manifest), "--out", str(out), *TINY)
    assert_one_error_line(code, err, *fragments, "--allow-leaks")
    assert not out.exists()


def test_allowed_leaks_and_skipped_files_are_recorded(tmp_path, monkeypatch, capsys):
    manifest = pd.read_csv(leaky_manifest(tmp_path, "path"))
    gone = manifest.iloc[[5, 9]]["path"].tolist()
    manifest.loc[[5, 9], "path"] = [str(tmp_path / "not-downloaded" / Path(p).name) for p in gone]
    manifest.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "labels.csv"), "--out", str(out), "--epochs", "1", "--image-size", "64",
            "--accelerator", "cpu", "--no-augment"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_error_line(code, err, "2 of 21 image files are missing (row 7: ", "row 11: ", "--skip-missing")
    assert not out.exists()
    code, _, err = run_cli(monkeypatch, capsys, *args, "--skip-missing")
    assert_one_error_line(code, err, "the same file in row 2 (train), row 22 (test)")  # the leak is still refused
    code, _, err = run_cli(monkeypatch, capsys, *args, "--skip-missing", "--allow-leaks")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["allow_leaks"] and config["skip_missing"]
    assert config["skipped"] == [f"row 7: {tmp_path / 'not-downloaded' / Path(gone[0]).name}",
                                 f"row 11: {tmp_path / 'not-downloaded' / Path(gone[1]).name}"]
    assert len(config["leaks"]) == 2 and "row 22 (test, Normal)" in " ".join(config["leaks"])
    # 10 training images (12 less the 2 missing) in batches of 8 with the last partial batch dropped: 1 step
    assert [int(r["step"]) for r in history(out)] == [1]


def test_evaluate_refuses_images_the_run_was_trained_on(reference_run, tiny_data, tmp_path, monkeypatch, capsys):
    """External data holding a training image (a copy under another name) cannot pass for held-out data."""
    frame = pd.read_csv(tiny_data)
    external = tmp_path / "hospital"
    for folder, (cls, split) in {"COVID": ("covid", "test"), "Normal": ("normal", "test")}.items():
        (external / folder).mkdir(parents=True)
        for path in real_rows({cls: 3}, split)["path"]:
            shutil.copy(path, external / folder)
    shutil.copy(frame["path"].iloc[0], external / "COVID" / "renamed.jpg")  # a training image of the run
    args = ["evaluate", "--run", str(reference_run), "--data", str(external), "--split", "all", "--out",
            str(tmp_path / "eval")]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_error_line(code, err, "the same pixels in row ", "(train), COVID/renamed.jpg (evaluated: hospital)")
    assert not (tmp_path / "eval").exists()
    code, _, err = run_cli(monkeypatch, capsys, *args, "--allow-leaks")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 7 and "renamed.jpg" in metrics["leaks_allowed"][0]


def test_check_data_prints_and_writes_the_audit(tmp_path, monkeypatch, capsys):
    """Counts per split, sizes and depths, a duplicate, a near-duplicate (reported, not refused), a missing and
    an unreadable file; --out writes audit.json and audit.md."""
    from PIL import Image

    train = real_rows({"covid": 3, "normal": 3})
    test = real_rows({"covid": 2, "normal": 2}, "test")
    near = tmp_path / "brighter.png"  # the first training image, a little brighter: other pixels, same look
    with Image.open(train["path"].iloc[0]) as img:
        Image.eval(img.convert("L"), lambda v: min(255, v + 3)).save(near)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    extra = pd.concat([
        train.iloc[[1]],  # listed twice in train: a duplicate, not a leak
        test.iloc[[0]].assign(path=str(near), patient_group="p-near"),
        test.iloc[[1]].assign(path=str(tmp_path / "broken.jpg"), patient_group="p-broken"),
        test.iloc[[2]].assign(path=str(tmp_path / "never-downloaded.jpg"), patient_group="p-gone"),
    ])
    pd.concat([train, test, extra]).to_csv(tmp_path / "labels.csv", index=False)
    code, out, err = run_cli(monkeypatch, capsys, "check-data", "--data", str(tmp_path / "labels.csv"), "--out",
                             str(tmp_path / "audit"))
    assert code == 0, err
    assert "train: 7 images (COVID-19 4, Pneumonia 4, Normal 3)" in out
    assert "missing files: 1" in out and "unreadable files: 1" in out and "leaks between splits: 0" in out
    assert "duplicates within a split: 1" in out and "near-duplicates: 1" in out
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["near_duplicates_across_splits"] == 1
    assert audit["near_duplicates"][0].startswith("row 2 (train) and row 13 (test) look alike (hash distance ")
    assert audit["depths"] == {"8-bit grey": 12} and audit["sizes"]["height"]["min"] == 256
    assert "broken.jpg" in audit["unreadable"][0] and audit["missing"] == [
        f"row 15: {tmp_path / 'never-downloaded.jpg'}"]
    assert "## Near-duplicates (1 across splits; reported, not refused): 1" in (
        tmp_path / "audit" / "audit.md").read_text()


def test_check_data_on_the_vendored_set_finds_no_leak(monkeypatch, capsys):
    """data/cxr3's README promises patient-disjoint splits without duplicates; the audit agrees."""
    code, out, err = run_cli(monkeypatch, capsys, "check-data")
    assert code == 0, err
    assert "1059 images, 816 patients" in out
    for finding in ("missing files", "unreadable files", "leaks between splits", "conflicting labels",
                    "duplicates within a split", "near-duplicates"):
        assert f"{finding}: 0" in out


# --- 4. broken files, bad options, a full disk ----------------------------------------------------------


@pytest.fixture
def run_copy(reference_run, tmp_path) -> Path:
    """The reference run's small files and best weights (what evaluate reads), in a folder of its own."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "thresholds.json", "best.safetensors"):
        shutil.copy(reference_run / name, copy / name)
    return copy


@pytest.mark.parametrize(
    ("file", "content", "fragments"),
    [
        ("config.json", {"image_size": "big"}, ["config.json: image_size: input should be a valid integer",
                                                "(got 'big')", "fix the value or train the run again"]),
        ("config.json", {"epochs": 0, "schedule": "linear"}, ["epochs: input should be greater than or equal to 1",
                                                              "schedule: input should be 'cosine' or 'constant'"]),
        ("config.json", "{not json", ["config.json: broken JSON"]),
        ("thresholds.json", "[1, 2", ["thresholds.json: broken"]),
        ("thresholds.json", {"thresholds": [0.5, "high", 0.5]}, ["'thresholds' must be 3 numbers in [0, 1]"]),
        ("thresholds.json", {"thresholds": [0.5, 0.5]}, ["'thresholds' must be 3 numbers in [0, 1]"]),
    ],
)
def test_broken_run_files_are_one_line(file, content, fragments, run_copy, monkeypatch, capsys):
    path = run_copy / file
    if isinstance(content, dict):
        content = json.dumps({**json.loads(path.read_text()), **content}) if file == "config.json" else json.dumps(
            content)
    path.write_text(content)
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(run_copy), "--out", str(run_copy / "e"))
    assert_one_error_line(code, err, *fragments)
    assert not (run_copy / "e").exists()


def test_evaluate_into_an_output_that_cannot_be_created(reference_run, tiny_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(reference_run), "--split", "val",
                           "--out", str(tmp_path / "a-file" / "eval"))
    assert_one_error_line(code, err, "cannot create the folder", "a-file/eval: Not a directory", "choose another --out")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--image-size", "8"], ["--image-size: input should be greater than or equal to 16 (got 8)"]),
        (["--schedule", "linear", "--lr", "0"], ["--lr: input should be greater than 0", "--schedule: input"]),
        (["--checkpoint-every", "-1"], ["--checkpoint-every: input should be greater than or equal to 0"]),
        (["--out", "{file}/run"], ["cannot create the folder", "Not a directory", "choose another --out"]),
        (["--resume"], ["nothing to resume in", "(no resume.ckpt)"]),
        (["--data", "{tmp}/corrupt.csv"], ["cannot read image", "bad.jpg", "replace the file or remove its row"]),
    ],
)
def test_bad_training_input_creates_nothing(args, fragments, tmp_path, tiny_data, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    frame = pd.read_csv(tiny_data)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    frame.loc[3, "path"] = str(tmp_path / "bad.jpg")
    frame.to_csv(tmp_path / "corrupt.csv", index=False)
    args = [a.format(tmp=tmp_path, file=tmp_path / "a-file") for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                           *TINY, *args)
    assert_one_error_line(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing else


def _tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def _limit_file_size():  # runs in the child before exec: writes past 4 MB fail with EFBIG instead of a signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


@pytest.mark.slow  # a subprocess (about 5 s to import torch and Lightning) and a few epochs
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["full tmpfs (ENOSPC)", "file-size limit (EFBIG)"])
def test_a_full_disk_is_one_line_and_a_failed_fresh_run_leaves_nothing(fault, tiny_data, tmp_path):
    """Writing the first weights fails: on a 5 MB tmpfs (ENOSPC; needs unprivileged user namespaces) or under
    a 4 MB file-size limit (EFBIG). Either way: one line, exit 2, and the run folder is gone."""
    out = tmp_path / "disk" / "run"
    train = [sys.executable, str(DRIVER), "train", "--data", str(tiny_data), "--out", str(out), "--epochs", "1",
             "--image-size", "64", "--accelerator", "cpu"]
    if fault.startswith("full tmpfs"):
        if not _tmpfs_available():
            pytest.skip("unprivileged user namespaces are not available to mount a small tmpfs")
        (tmp_path / "disk").mkdir()
        # the tmpfs lives as long as the namespace: list what the run left on it before leaving
        script = 'mount -t tmpfs -o size=5m tmpfs "$1" && shift && "$@"; c=$?; echo "LEFT:$(ls -A "$DISK")"; exit $c'
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                   str(tmp_path / "disk"), *train]
        result = subprocess.run(command, env={**subprocess_env(), "DISK": str(tmp_path / "disk")},
                                capture_output=True, text=True, timeout=240)
        assert result.stdout.splitlines()[-1:] == ["LEFT:"], result.stdout[-2000:]
        reason = "no space left on the device"
    else:
        result = cli_subprocess(*train[2:], preexec_fn=_limit_file_size)
        assert not out.exists()
        reason = "file too large"
    assert_one_error_line(result.returncode, result.stderr, "cannot write", reason,
                          "free some space or choose another output folder")


def test_cohen_metadata_with_files_not_in_the_download(tmp_path, monkeypatch, capsys):
    """Cohen's metadata.csv lists images its download lacks: an error with the count and the first rows,
    and --skip-missing leaves them out (here on the way to a split, which Cohen's format lacks)."""
    rows = real_rows({"covid": 6, "normal": 4})
    (tmp_path / "images").mkdir()
    for path in rows["path"]:
        shutil.copy(path, tmp_path / "images")
    names = [Path(p).name for p in rows["path"]]
    metadata = pd.DataFrame({
        "patientid": [f"p{i}" for i in range(14)],
        "finding": ["Pneumonia/Viral/COVID-19"] * 8 + ["No Finding"] * 6,
        "view": ["PA"] * 14,
        "filename": names[:6] + ["gone-1.png", "gone-2.png"] + names[6:] + ["gone-3.png", "gone-4.png"],
    })
    metadata.to_csv(tmp_path / "metadata.csv", index=False)
    out = tmp_path / "labels.csv"
    code, _, err = run_cli(monkeypatch, capsys, "split", "--data", str(tmp_path), "--out", str(out))
    assert_one_error_line(code, err, "metadata.csv: 4 of 14 image files are missing (row 8: ", "gone-1.png; row 9: ",
                          "gone-2.png; row 14: ", "; ...); restore them", "--skip-missing")
    assert not out.exists()
    code, stdout, err = run_cli(monkeypatch, capsys, "split", "--data", str(tmp_path), "--out", str(out),
                                "--skip-missing", "--fractions", "0.5,0.5", "--names", "train,val")
    assert code == 0, err
    assert "4 rows with a missing image left out" in stdout
    assert sorted(Path(p).name for p in pd.read_csv(out)["path"]) == sorted(names)
