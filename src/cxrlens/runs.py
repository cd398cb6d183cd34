"""Run folders: the typed config of a training run, saved beside its checkpoints, and loading back.

A run folder holds ``config.json`` (``TrainConfig``), ``best.safetensors`` (lowest validation
loss), ``last.safetensors``, ``history.csv`` (one row per epoch), ``thresholds.json`` (per-class
thresholds chosen on the validation split) and Lightning's ``resume.ckpt`` for ``--resume``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import Taxonomy, get_taxonomy


@dataclass
class TrainConfig:
    """Everything needed to re-run a training run. Defaults follow the study where it says."""

    model: str = "resnet18"
    data: str = ""  # data set folder or manifest; '' = the bundled data/cxr3
    out: str = "runs/resnet18"
    taxonomy: str = "cxr3"
    epochs: int = 20
    image_size: int = 224
    batch_size: int = 8  # the study's
    lr: float = 1e-3  # the study's Adam settings
    weight_decay: float = 1e-4
    max_images: int | None = None  # cap on training images, for quick runs
    seed: int = 1701  # the study's
    weights: str | None = None  # local pretrained weights (.safetensors / .pth)
    precision: str = "32-true"  # Lightning precision, e.g. "bf16-mixed", "16-mixed"
    devices: int = 1
    accelerator: str = "auto"
    augment: bool = True  # X-ray-safe augmentation (small affine, contrast); the study used none
    schedule: str = "cosine"  # "cosine" (with warm-up) or "constant" (the study's)
    early_stopping: int = 0  # patience in epochs on validation loss; 0 = off
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 0
    placement: str = "centre"  # "random": the image sits at a random place in the square while training
    extra: dict = field(default_factory=dict)

    @property
    def tax(self) -> Taxonomy:
        return get_taxonomy(self.taxonomy)

    def save(self, run_dir: str | Path) -> None:
        atomic_write_text(Path(run_dir) / "config.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise CxrlensError(f"{run_dir} is not a run folder (no config.json); train one with `cxrlens train`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CxrlensError(f"{path}: broken JSON ({exc.msg} at line {exc.lineno})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs should read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model_weights(model: nn.Module, path: str | Path) -> None:
    """Save a model's state dict as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


@dataclass
class LoadedRun:
    model: nn.Module  # in eval mode, on CPU
    config: TrainConfig
    run_dir: Path
    thresholds: list[float] | None  # chosen on the validation split, if training saved them

    @property
    def taxonomy(self) -> Taxonomy:
        return self.config.tax

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_run(run_dir: str | Path, checkpoint: str = "best") -> LoadedRun:
    """The model of a run folder with its ``best`` or ``last`` weights, ready for inference."""
    from cxrlens.models import create_model, load_weights

    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir)
    weights = run_dir / f"{checkpoint}.safetensors"
    if not weights.is_file():
        raise CxrlensError(f"checkpoint missing: {weights}; train the run (or pass --checkpoint last)")
    model = create_model(config.model, config.tax.num_classes)
    load_weights(model, weights, strict_head=True)
    model.eval()
    thresholds_path = run_dir / "thresholds.json"
    thresholds = json.loads(thresholds_path.read_text())["thresholds"] if thresholds_path.is_file() else None
    return LoadedRun(model, config, run_dir, thresholds)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Sigmoid probabilities [n, classes] for a stack of images."""
    model.eval()
    outs = [torch.sigmoid(model(images[i : i + batch_size]).float()) for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
