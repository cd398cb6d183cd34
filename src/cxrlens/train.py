"""Training: a Lightning module around a registry model, with the study's loss and optimiser.

``train(config)`` writes a run folder (see ``cxrlens.runs``): best/last weights as safetensors,
config.json, history.csv, thresholds.json and a Lightning checkpoint to resume from.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader

from cxrlens.data import Manifest, XrayDataset, load_manifest
from cxrlens.errors import CxrlensError
from cxrlens.models import AUX_LOSS_WEIGHT, create_model, forward_with_aux, get_spec
from cxrlens.runs import TrainConfig, atomic_write_text, save_model_weights

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no marketing tips
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

RESUME_NAME = "resume"  # Lightning checkpoint (weights + optimiser + loop state) for --resume


class XrayAugment:
    """Augmentation that keeps an X-ray plausible: small rotation, shift and zoom, and a gamma and
    contrast change. No horizontal flip: it would move the heart to the wrong side."""

    def __init__(self, degrees: float = 7.0, translate: float = 0.05, scale: float = 0.08, gamma: float = 0.25):
        self.degrees, self.translate, self.scale, self.gamma = degrees, translate, scale, gamma

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # [1, H, W] in [0, 1]
        import torchvision.transforms.v2.functional as TF

        angle = float(np.random.uniform(-self.degrees, self.degrees))
        h, w = image.shape[-2:]
        shift = [int(np.random.uniform(-self.translate, self.translate) * s) for s in (w, h)]
        zoom = float(np.random.uniform(1 - self.scale, 1 + self.scale))
        image = TF.affine(image, angle=angle, translate=shift, scale=zoom, shear=[0.0, 0.0])
        gamma = float(np.exp(np.random.uniform(-self.gamma, self.gamma)))
        image = image.clamp(0, 1) ** gamma
        contrast = float(np.random.uniform(0.9, 1.1))
        return ((image - image.mean()) * contrast + image.mean()).clamp(0, 1)


class Classifier(L.LightningModule):
    """A registry model trained with BCE-with-logits (+0.4 x aux loss for InceptionV3) and Adam."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int = 1):
        super().__init__()
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.model = create_model(config.model, config.tax.num_classes, config.weights)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        logits, aux = forward_with_aux(self.model, images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(aux.float(), targets)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True
        )
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        logits = self.model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True)
        self._val_outputs.append((torch.sigmoid(logits).detach().cpu(), targets.cpu()))

    def on_validation_epoch_end(self):
        if not self._val_outputs:
            return
        probs = torch.cat([p for p, _ in self._val_outputs])
        targets = torch.cat([t for _, t in self._val_outputs])
        self._val_outputs.clear()
        from cxrlens.evaluate import f1_scores

        for name, f1 in zip(self.config.tax.classes, f1_scores(probs.numpy(), targets.numpy(), 0.5), strict=True):
            self.log(f"val_f1/{name}", float(f1), sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        if self.config.schedule == "constant":
            return optimizer
        total = max(1, self.config.epochs * self.steps_per_epoch)
        warmup = min(self.steps_per_epoch, total // 10)

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to 2 % of the rate
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RunFolderWriter(Callback):
    """After each validation: append to history.csv, export last (and best) weights as safetensors.
    Only rank 0 writes; every file is replaced atomically."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.best = math.inf
        self.started = time.perf_counter()

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]

    def on_train_epoch_end(self, trainer, module):  # runs after the epoch's validation
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_loss": metrics.get("train_loss", float("nan")),
            "val_loss": metrics.get("val_loss", float("nan")),
            **{k: v for k, v in metrics.items() if k.startswith("val_f1/")},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self.started, 1),
        }
        _append_history(self.run_dir / "history.csv", row)
        save_model_weights(module.model, self.run_dir / "last.safetensors")
        if row["val_loss"] < self.best:
            self.best = row["val_loss"]
            save_model_weights(module.model, self.run_dir / "best.safetensors")


def _append_history(path: Path, row: dict) -> None:
    rows = []
    if path.is_file():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < row["epoch"]]  # drop epochs redone on resume
    rows.append(row)
    header = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def make_loaders(config: TrainConfig, manifest: Manifest | None = None) -> tuple[DataLoader, DataLoader]:
    manifest = manifest if manifest is not None else load_manifest(config.data or None, config.tax)
    if not manifest.has_split:
        raise CxrlensError(
            f"{manifest.origin}: no 'split' column; add one or make one with `cxrlens split` (by patient)"
        )
    train_set = manifest.split(config.train_split).head(config.max_images, config.seed)
    val_set = manifest.split(config.val_split)
    augment = XrayAugment() if config.augment else None
    train = DataLoader(
        XrayDataset(train_set, config.image_size, augment, placement=config.placement),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        drop_last=len(train_set) > config.batch_size,
        persistent_workers=config.num_workers > 0,
    )
    val = DataLoader(
        XrayDataset(val_set, config.image_size), batch_size=max(16, config.batch_size), num_workers=config.num_workers
    )
    return train, val


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one model; returns the run folder."""
    run_dir = Path(config.out)
    min_size = get_spec(config.model).min_size
    if config.image_size < min_size:
        raise CxrlensError(f"{config.model} needs --image-size of at least {min_size} px, not {config.image_size}")
    if resume:
        if not (run_dir / f"{RESUME_NAME}.ckpt").is_file():
            raise CxrlensError(f"nothing to resume in {run_dir} (no {RESUME_NAME}.ckpt); start without --resume")
        saved = TrainConfig.load(run_dir)
        if saved.model != config.model:
            raise CxrlensError(f"{run_dir} was trained as {saved.model}, not {config.model}")
    elif (run_dir / "best.safetensors").exists():
        raise CxrlensError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    train_loader, val_loader = make_loaders(config)
    config.save(run_dir)
    module = Classifier(config, steps_per_epoch=len(train_loader) // max(1, config.devices))
    checkpoint = ModelCheckpoint(dirpath=run_dir, save_last=True, save_top_k=0, enable_version_counter=False)
    checkpoint.CHECKPOINT_NAME_LAST = RESUME_NAME
    callbacks: list[Callback] = [RunFolderWriter(run_dir), checkpoint]
    if config.early_stopping:
        callbacks.append(EarlyStopping("val_loss", patience=config.early_stopping))
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy="ddp" if config.devices > 1 else "auto",
        precision=config.precision,
        callbacks=callbacks,
        logger=False,
        default_root_dir=run_dir,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
        ckpt = run_dir / f"{RESUME_NAME}.ckpt" if resume else None
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt, weights_only=True)
    if trainer.is_global_zero:
        choose_thresholds(run_dir, val_loader)
    return run_dir


def choose_thresholds(run_dir: Path, val_loader: DataLoader) -> list[float]:
    """Per class, the threshold that maximises F1 of the best model on the validation split."""
    from cxrlens.evaluate import best_f1_thresholds
    from cxrlens.runs import load_run, predict

    run = load_run(run_dir)
    probs, targets = [], []
    for images, labels in val_loader:
        probs.append(predict(run.model, images))
        targets.append(labels)
    thresholds = best_f1_thresholds(torch.cat(probs).numpy(), torch.cat(targets).numpy())
    atomic_write_text(
        run_dir / "thresholds.json",
        json.dumps({"split": run.config.val_split, "classes": list(run.taxonomy.classes), "thresholds": thresholds}),
    )
    return thresholds
