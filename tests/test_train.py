"""Training on real images: the loss falls, run folders round-trip, runs resume, DDP works."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrlens.errors import CxrlensError
from cxrlens.runs import TrainConfig, load_run, predict
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
    # the saved config re-creates the run
    assert TrainConfig.load(run_dir) == config
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
