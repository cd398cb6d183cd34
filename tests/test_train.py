"""Training on real images: the loss falls, run folders round-trip, runs resume, DDP works."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cxrlens.errors import CxrlensError
from cxrlens.runs import TrainConfig, atomic_open, load_run, predict
from cxrlens.train import Classifier, train


@pytest.mark.parametrize("name", ["resnet18", "inception_v3"])
def test_training_steps_lower_the_loss_on_real_images(name, real_batch):
    images, targets = real_batch
    if name == "inception_v3":
        images = torch.nn.functional.interpolate(images, size=80)  # its stem needs 75 px
    torch.manual_seed(0)
    module = Classifier(TrainConfig(model=name, lr=1e-3, schedule="constant"))
    optimizer = module.configure_optimizers()
    module.train()
    losses = []
    for step in range(12):
        loss = module.training_step((images, targets), step)  # includes 0.4 x aux loss for inception
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_a_run_folder_that_round_trips_and_resumes(tmp_path, real_batch):
    config = TrainConfig(
        model="resnet18",
        out=str(tmp_path / "run"),
        epochs=1,
        image_size=64,
        max_images=24,
        batch_size=8,
        accelerator="cpu",
    )
    run_dir = train(config, progress=False)
    for name in (
        "config.json",
        "best.safetensors",
        "last.safetensors",
        "history.csv",
        "thresholds.json",
        "resume.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    assert [int(r["epoch"]) for r in _history(run_dir)] == [0]
    # the saved config re-creates the run; the data audit added the fingerprint of the images trained on
    saved = TrainConfig.load(run_dir)
    assert len(saved.data_fingerprint) == 64 and saved.leaks == [] and saved.skipped == []
    assert saved == replace(config, data_fingerprint=saved.data_fingerprint)
    # the checkpoint round-trips: same outputs as the trained weights
    run = load_run(run_dir, "last")
    from safetensors.torch import load_file

    state = load_file(run_dir / "last.safetensors")
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in state.items())
    assert predict(run.model, real_batch[0]).shape == (12, 3)
    # starting again over a finished run is refused; --resume continues it to epoch 2
    with pytest.raises(CxrlensError, match="already holds a run; use --resume"):
        train(config, progress=False)
    config.epochs = 2
    train(config, resume=True, progress=False)
    history = _history(run_dir)
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert int(history[1]["step"]) == 2 * int(history[0]["step"])  # continued, not restarted


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(CxrlensError, match="nothing to resume in"):
        train(TrainConfig(out=str(tmp_path / "none")), resume=True, progress=False)


@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes(tmp_path):
    """Lightning's DDP strategy with 2 CPU processes (gloo), launched through the CLI as users do."""
    cli = Path(sys.executable).parent / "cxrlens"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    result = subprocess.run(
        [
            str(cli),
            "train",
            "--model",
            "resnet18",
            "--out",
            str(tmp_path / "ddp"),
            "--epochs",
            "1",
            "--image-size",
            "48",
            "--max-images",
            "32",
            "--batch-size",
            "4",
            "--devices",
            "2",
            "--accelerator",
            "cpu",
            "--no-augment",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = _history(tmp_path / "ddp")
    # 32 images over 2 processes with batch 4: 4 optimiser steps per epoch, not 8
    assert len(history) == 1 and int(history[0]["step"]) == 4
    assert (tmp_path / "ddp" / "best.safetensors").is_file()


# --- what makes a resumed run the run it continues -------------------------------------------------------


def test_epoch_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch(monkeypatch):
    from cxrlens import train as train_module
    from cxrlens.train import EpochOrder

    order = EpochOrder(50, seed=3)
    first = list(order)
    assert sorted(i for _, i in first) == list(range(50)) and {e for e, _ in first} == {0}
    assert list(EpochOrder(50, seed=3)) == first  # a new sampler (a new process) draws the same order
    order.set_epoch(1)
    second = list(order)
    assert [i for _, i in second] != [i for _, i in first] and {e for e, _ in second} == {1}
    order.resume_at(1, items_done=16)  # two batches of 8 were trained before the checkpoint
    assert list(order) == second[16:]
    assert list(order) == second  # only the first pass after a resume starts late
    # two DDP processes: equal shares (padded from the head, as DistributedSampler does) covering every image
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(train_module, "_world", lambda rank=rank: (rank, 2))
        shares.append([i for _, i in order])
        assert len(order) == 25
    assert sorted(shares[0] + shares[1]) == list(range(50))


def test_augmentation_is_drawn_from_seed_epoch_and_image(real_batch):
    from cxrlens.data import XrayDataset, load_manifest
    from cxrlens.train import TrainingImages, XrayAugment

    manifest = load_manifest().split("test").head(3, seed=0)
    images = TrainingImages(XrayDataset(manifest, 64), XrayAugment(), seed=5)
    again = TrainingImages(XrayDataset(manifest, 64), XrayAugment(), seed=5)  # e.g. in a resumed process
    assert torch.equal(images[(2, 1)][0], again[(2, 1)][0])
    assert not torch.equal(images[(2, 1)][0], images[(3, 1)][0])  # another epoch, another augmentation
    plain = XrayDataset(manifest, 64)
    # the cache keeps float16; the first read returns the same values as every later one
    assert torch.equal(plain.image(0), plain.image(0)) and plain.image(0).dtype == torch.float32


def test_atomic_open_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "resume.ckpt"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(RuntimeError), atomic_open(target, durable=True) as fh:
        fh.write(b"half of the new one")
        raise RuntimeError("killed half-way")
    assert target.read_bytes() == b"previous checkpoint" and [p.name for p in tmp_path.iterdir()] == ["resume.ckpt"]
    with atomic_open(target, durable=True) as fh:
        fh.write(b"new checkpoint")
    assert target.read_bytes() == b"new checkpoint" and [p.name for p in tmp_path.iterdir()] == ["resume.ckpt"]


def test_config_is_validated_with_one_line_per_source():
    with pytest.raises(CxrlensError, match=r"^config.json: image_size: input should be a valid integer.*'big'"):
        TrainConfig.validate({"image_size": "big"}, "config.json")
    with pytest.raises(CxrlensError, match=r"--batch-size: input should be greater than or equal to 1 \(got 0\)"):
        TrainConfig.validate({"batch_size": 0}, options=True)
    with pytest.raises(CxrlensError, match=r"lr: input should be a finite number"):
        TrainConfig.validate({"lr": float("nan")})
    assert TrainConfig.validate({"epochs": 3, "a_key_of_a_later_version": 1}) == TrainConfig(epochs=3)


@pytest.fixture
def tiny_manifest(tmp_path):
    import pandas as pd
    from conftest import CXR3

    frame = pd.read_csv(CXR3 / "labels.csv")
    rows = pd.concat([frame[frame.split == s].groupby("cls").head(n) for s, n in (("train", 6), ("val", 2))])
    rows["path"] = [str(CXR3 / p) for p in rows["path"]]
    rows.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "labels.csv"


def test_resume_refuses_changed_data_and_settles_the_folder(tiny_manifest, tmp_path):
    """A resume checks the data is what the run started on; settling after a kill promotes a pending best
    only if the checkpoint recorded that epoch as the best, and rewrites history.csv from the checkpoint."""
    import pandas as pd
    from safetensors.torch import load_file, save_file

    from cxrlens.train import PENDING_BEST, read_resume_state, settle_run_folder

    config = TrainConfig(data=str(tiny_manifest), out=str(tmp_path / "run"), epochs=1, image_size=64,
                         accelerator="cpu", augment=False)
    run_dir = train(config, progress=False)
    frame = pd.read_csv(tiny_manifest)
    frame.loc[0, "cls"] = "normal"  # one image relabelled
    frame.to_csv(tiny_manifest, index=False)
    with pytest.raises(CxrlensError, match="labels or splits of .* changed since"):
        train(replace(config, epochs=2), resume=True, progress=False)

    checkpoint = read_resume_state(run_dir)
    best = load_file(run_dir / "best.safetensors")
    (run_dir / "history.csv").write_text("epoch,step\n0,3\n1,6\n")  # a row the checkpoint never committed
    for epoch, promoted in ((1, False), (0, True)):  # the checkpoint's best epoch is 0
        save_file({k: v + 1 for k, v in best.items() if v.is_floating_point()}, run_dir / PENDING_BEST,
                  metadata={"epoch": str(epoch)})
        (run_dir / ".last.safetensors.x1.tmp").write_bytes(b"torn")
        settle_run_folder(run_dir, checkpoint)
        assert not (run_dir / PENDING_BEST).exists() and not list(run_dir.glob(".*.tmp"))
        changed = not torch.equal(load_file(run_dir / "best.safetensors")["fc.bias"], best["fc.bias"])
        assert changed == promoted, epoch
    assert [int(r["epoch"]) for r in _history(run_dir)] == [0]
