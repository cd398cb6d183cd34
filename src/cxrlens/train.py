"""Training: a Lightning module around a registry model, with the study's loss and optimiser.

``train(config)`` writes a run folder (see ``cxrlens.runs``): best/last weights as safetensors,
config.json, history.csv, thresholds.json and a Lightning checkpoint to resume from.

Nothing is lost when a run is killed: at the end of every epoch (and every ``checkpoint_every`` steps)
the whole training state (weights, optimiser, scheduler, loop counters, RNG, the position in the data
order) is written to ``resume.ckpt`` through a temporary file and a rename, so the previous checkpoint
stays until the new one is complete. The data order and the augmentation are drawn from (seed, epoch,
image), so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from cxrlens.data import Manifest, XrayDataset, load_manifest
from cxrlens.errors import CxrlensError
from cxrlens.models import AUX_LOSS_WEIGHT, create_model, forward_with_aux, get_spec
from cxrlens.runs import (
    TrainConfig,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    make_output_folder,
    remove_stale_temporaries,
    save_model_weights,
)

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no marketing tips
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

RESUME_NAME = "resume"  # Lightning checkpoint (weights + optimiser + loop state) for --resume
RESUME_FILE = f"{RESUME_NAME}.ckpt"
PENDING_BEST = ".best.pending.safetensors"  # a better epoch's weights until its checkpoint is committed
RUN_FILES = ("config.json", "history.csv", "best.safetensors", "last.safetensors", "thresholds.json", RESUME_FILE)


class XrayAugment:
    """Augmentation that keeps an X-ray plausible: small rotation, shift and zoom, and a gamma and
    contrast change. No horizontal flip: it would move the heart to the wrong side."""

    def __init__(self, degrees: float = 7.0, translate: float = 0.05, scale: float = 0.08, gamma: float = 0.25):
        self.degrees, self.translate, self.scale, self.gamma = degrees, translate, scale, gamma

    def __call__(self, image: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        """[1, H, W] in [0, 1] -> the same, transformed with draws from ``rng`` (default: a fresh one)."""
        import torchvision.transforms.v2.functional as TF

        rng = rng if rng is not None else np.random.default_rng()
        angle = float(rng.uniform(-self.degrees, self.degrees))
        h, w = image.shape[-2:]
        shift = [int(rng.uniform(-self.translate, self.translate) * s) for s in (w, h)]
        zoom = float(rng.uniform(1 - self.scale, 1 + self.scale))
        image = TF.affine(image, angle=angle, translate=shift, scale=zoom, shear=[0.0, 0.0])
        gamma = float(np.exp(rng.uniform(-self.gamma, self.gamma)))
        image = image.clamp(0, 1) ** gamma
        contrast = float(rng.uniform(0.9, 1.1))
        return ((image - image.mean()) * contrast + image.mean()).clamp(0, 1)


def known_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits, the mean over the known targets: NaN marks an unknown label (CheXpert's uncertain
    ones under ``--uncertain ignore``, U-Ignore), left out of the loss. Without NaN: the plain mean."""
    known = ~torch.isnan(targets)
    if bool(known.all()):
        return F.binary_cross_entropy_with_logits(logits, targets)
    weight = known.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets.nan_to_num(0.0), weight=weight, reduction="sum")
    return loss / weight.sum().clamp(min=1)


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
        loss = known_bce(logits.float(), targets)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * known_bce(aux.float(), targets)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True
        )
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        logits = self.model(images).float()
        loss = known_bce(logits, targets)
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


# --- data order and augmentation that a resumed run repeats exactly --------------------------------


def _world() -> tuple[int, int]:
    """(rank, number of processes) of a DDP run; (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochOrder(Sampler):
    """A shuffled order drawn from (seed, epoch) alone, shared out between DDP processes, yielding
    ``(epoch, index)`` keys. Lightning calls ``set_epoch``; a resumed run calls ``resume_at`` so the
    first pass starts where the checkpoint left off (for a checkpoint written in the middle of an epoch)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, items_done: int) -> None:
        self.epoch, self.skip = epoch, items_done

    def __len__(self) -> int:  # per process; DistributedSampler pads the same way
        return math.ceil(self.size / _world()[1])

    def __iter__(self):
        rank, world = _world()
        epoch, skip = self.epoch, self.skip
        self.skip = 0  # only the first pass after a resume starts late
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        mine = np.resize(order, len(self) * world)[rank::world]  # np.resize repeats the head, as padding
        for index in mine[skip:]:
            yield epoch, int(index)


class TrainingImages(Dataset):
    """Training images keyed by ``(epoch, index)``; each image's augmentation is drawn from (seed, epoch,
    index), so it does not depend on the order of earlier draws, the number of workers or a resume."""

    def __init__(self, images: XrayDataset, augment: XrayAugment | None, seed: int):
        self.images, self.augment, self.seed = images, augment, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image = self.images.image(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.images.placement is not None:
            image = self.images.placement(image, rng)
        if self.augment is not None:
            image = self.augment(image, rng)
        return image.expand(3, -1, -1), self.images.targets[index]


# --- the run folder, written so that a kill at any instant leaves it resumable --------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, flushed to the disk, then renamed."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_open(path, durable=True) as fh:
            torch.save(checkpoint, fh)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [name, keys.tolist(), position, has_gauss, gauss]  # plain types: loads with weights_only
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunFolderWriter(Callback):
    """After each epoch's validation: the checkpoint, history.csv, last and (if better) best weights.

    The checkpoint is the commit point. A better epoch's weights are first written aside (PENDING_BEST),
    the checkpoint then records that epoch as the best, and only then do the weights replace
    best.safetensors; history.csv and last.safetensors follow from the checkpoint. A kill between any
    two steps is repaired on resume by ``settle_run_folder``. Only rank 0 writes files; every rank takes
    part in writing the checkpoint (Lightning's save is collective)."""

    def __init__(self, run_dir: Path, sampler: EpochOrder, batch_size: int, checkpoint_every: int = 0):
        self.run_dir, self.sampler, self.batch_size = run_dir, sampler, batch_size
        self.checkpoint_every = checkpoint_every
        self.rows: list[dict] = []
        self.best, self.best_epoch = math.inf, -1
        self.position = (0, 0)  # (epoch, batches of it done) at the moment a checkpoint is written
        self.loss_sum, self.loss_images = 0.0, 0  # this epoch's training loss so far (kept across a resume)
        self.elapsed, self.started = 0.0, time.perf_counter()

    def state_dict(self) -> dict:
        return {
            "rows": self.rows,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "position": list(self.position),
            "loss": [self.loss_sum, self.loss_images],
            "elapsed": self.elapsed + time.perf_counter() - self.started,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.best, self.best_epoch = list(state["rows"]), state["best"], state["best_epoch"]
        self.elapsed, self.started = state["elapsed"], time.perf_counter()
        epoch, batches = state["position"]
        self.sampler.resume_at(epoch, batches * self.batch_size)
        self.loss_sum, self.loss_images = state["loss"]
        _set_rng_state(state["rng"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss_sum += float(outputs["loss"]) * len(batch[0])
        self.loss_images += len(batch[0])
        step = trainer.global_step
        last_batch = batch_idx + 1 >= trainer.num_training_batches  # the epoch's end writes that one
        if self.checkpoint_every and step % self.checkpoint_every == 0 and not last_batch:
            self.position = (trainer.current_epoch, batch_idx + 1)
            trainer.save_checkpoint(self.run_dir / RESUME_FILE, weights_only=False)

    def on_train_epoch_end(self, trainer, module):  # runs after the epoch's validation
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        totals = torch.tensor([self.loss_sum, self.loss_images], dtype=torch.float64, device=module.device)
        loss_sum, images = trainer.strategy.reduce(totals, reduce_op="sum").cpu().tolist()
        self.loss_sum, self.loss_images = 0.0, 0
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_loss": float(loss_sum / images) if images else float("nan"),  # Lightning's restarts mid-epoch
            "val_loss": metrics.get("val_loss", float("nan")),
            **{k: v for k, v in metrics.items() if k.startswith("val_f1/")},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(self.elapsed + time.perf_counter() - self.started, 1),
        }
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        better = row["val_loss"] < self.best
        if better:
            self.best, self.best_epoch = row["val_loss"], row["epoch"]
            if trainer.is_global_zero:
                save_model_weights(module.model, self.run_dir / PENDING_BEST, {"epoch": str(row["epoch"])})
        self.position = (trainer.current_epoch + 1, 0)
        trainer.save_checkpoint(self.run_dir / RESUME_FILE, weights_only=False)  # the commit point
        if trainer.is_global_zero:
            if better:
                (self.run_dir / PENDING_BEST).replace(self.run_dir / "best.safetensors")
            save_model_weights(module.model, self.run_dir / "last.safetensors")
            write_history(self.run_dir / "history.csv", self.rows)


def write_history(path: Path, rows: list[dict]) -> None:
    header = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_resume_state(run_dir: Path) -> dict:
    """The checkpoint of a run folder, memory-mapped (tensors are read only when used)."""
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise CxrlensError(f"nothing to resume in {run_dir} (no {RESUME_FILE}); start without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        checkpoint["callbacks"][RunFolderWriter.__name__]["rows"]  # noqa: B018 - a checkpoint of this version
    except Exception as exc:
        raise CxrlensError(
            f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); the run cannot be resumed: "
            "train it again into a new --out"
        ) from None
    return checkpoint


def settle_run_folder(run_dir: Path, checkpoint: dict) -> None:
    """Bring the files of a run folder in line with its checkpoint after a kill: drop half-written
    temporaries, finish or undo a pending best, rewrite history.csv and last.safetensors from it."""
    from safetensors.torch import safe_open, save

    remove_stale_temporaries(run_dir)
    state = checkpoint["callbacks"][RunFolderWriter.__name__]
    pending = run_dir / PENDING_BEST
    if pending.is_file():
        try:
            with safe_open(str(pending), "pt") as fh:
                epoch = int((fh.metadata() or {}).get("epoch", -1))
        except Exception:
            epoch = -2  # unreadable: never promoted
        if epoch == state["best_epoch"]:
            pending.replace(run_dir / "best.safetensors")
        else:
            pending.unlink()
    write_history(run_dir / "history.csv", state["rows"])
    weights = {k.removeprefix("model."): v.contiguous() for k, v in checkpoint["state_dict"].items()}
    atomic_write_bytes(run_dir / "last.safetensors", save(weights))


# --- data ---------------------------------------------------------------------------------------------


def image_cache(config: TrainConfig, manifests: list[Manifest], progress: bool = True):
    """The preprocessed image cache of ``--cache`` (None without), built for the images of ``manifests``."""
    if not config.cache:
        return None
    from cxrlens.datasets.cache import ImageCache

    cache = ImageCache(config.cache, config.preprocess)
    cache.build([p for m in manifests for p in m.frame["path"]], progress=progress)
    return cache


def make_loaders(config: TrainConfig, manifest: Manifest | None = None,
                 progress: bool = True) -> tuple[DataLoader, DataLoader]:
    if manifest is None:
        manifest = load_manifest(config.data or None, config.tax, options=config.read_options)
    if not manifest.has_split:
        raise CxrlensError(
            f"{manifest.origin}: no 'split' column; add one or make one with `cxrlens split` (by patient)"
        )
    train_set = manifest.split(config.train_split).head(config.max_images, config.seed)
    val_set = manifest.split(config.val_split)
    augment = XrayAugment() if config.augment else None
    cache = image_cache(config, [train_set, val_set], progress)
    train = DataLoader(
        TrainingImages(XrayDataset(train_set, config.preprocess, disk_cache=cache, placement=config.placement),
                       augment, config.seed),
        batch_size=config.batch_size,
        sampler=EpochOrder(len(train_set), config.seed),
        num_workers=config.num_workers,
        drop_last=len(train_set) > config.batch_size,
        persistent_workers=config.num_workers > 0,
    )
    val = DataLoader(
        XrayDataset(val_set, config.preprocess, disk_cache=cache), batch_size=max(16, config.batch_size),
        num_workers=config.num_workers,
    )
    return train, val


def prepare_data(config: TrainConfig, progress: bool = True) -> Manifest:
    """The manifest to train on, checked before anything is written: missing files (an error unless
    ``skip_missing``), unreadable images, leaks between splits and conflicting labels (an error unless
    ``allow_leaks``). What was skipped or let through is recorded in ``config``."""
    from cxrlens.audit import audit_manifest

    manifest = load_manifest(config.data or None, config.tax, missing="skip" if config.skip_missing else "error",
                             options=config.read_options)
    if progress:
        for note in manifest.notes():
            print(f"note: {note}", file=sys.stderr)
    if not manifest.has_split:
        raise CxrlensError(
            f"{manifest.origin}: no 'split' column; add one or make one with `cxrlens split` (by patient)"
        )
    config.skipped = [f"row {row}: {path}" for row, path in manifest.missing]
    audit = audit_manifest(manifest, progress=progress)
    config.leaks = audit.guard(allow_leaks=config.allow_leaks)
    config.data_fingerprint = audit.fingerprint
    if audit.near_duplicates_across_splits and progress:
        print(f"note: {audit.near_duplicate_note()}", file=sys.stderr)
    return manifest


# --- resuming -----------------------------------------------------------------------------------------

RESUME_MAY_CHANGE = ("epochs", "out")  # a resumed run may be extended; everything else is the saved run's
RECORDED = ("leaks", "skipped", "data_fingerprint")  # found by the data audit, not chosen


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same_setting(name: str, given, saved) -> bool:
    if name in ("data", "weights") and given and saved:
        return Path(given).resolve() == Path(saved).resolve()
    if name == "data":
        from cxrlens.data import DEFAULT_DATA

        return Path(given or DEFAULT_DATA).resolve() == Path(saved or DEFAULT_DATA).resolve()
    return given == saved


def resume_config(run_dir: str | Path, given: dict) -> TrainConfig:
    """The saved config of a run with the settings ``given`` on the command line applied, refusing (one
    line naming each) every given setting that differs from the saved one, except ``epochs``."""
    if not (Path(run_dir) / RESUME_FILE).is_file():
        raise CxrlensError(f"nothing to resume in {run_dir} (no {RESUME_FILE}); start without --resume")
    saved = TrainConfig.load(run_dir)
    differences = [
        f"{_option(k)} {v!r} (saved: {getattr(saved, k)!r})"
        for k, v in given.items()
        if k not in RESUME_MAY_CHANGE and not _same_setting(k, v, getattr(saved, k))
    ]
    if differences:
        raise CxrlensError(
            f"--resume continues {run_dir} with the settings in its config.json, but "
            f"{', '.join(differences)} differ; drop them (only --epochs may change) or train into a new --out"
        )
    if "epochs" in given:
        saved = TrainConfig.validate({**saved.__dict__, "epochs": given["epochs"]}, options=True)
    return saved


def _check_resumable(config: TrainConfig, run_dir: Path, checkpoint: dict) -> None:
    saved = TrainConfig.load(run_dir)
    skip = set(RESUME_MAY_CHANGE) | set(RECORDED)
    differences = [
        f"{k} {getattr(config, k)!r} (saved: {getattr(saved, k)!r})"
        for k in saved.__dict__
        if k not in skip and not _same_setting(k, getattr(config, k), getattr(saved, k))
    ]
    if differences:
        raise CxrlensError(f"cannot resume {run_dir} with other settings: {', '.join(differences)}")
    state = checkpoint["callbacks"][RunFolderWriter.__name__]
    epoch, batches = state["position"]
    if config.epochs < epoch + (batches > 0):
        raise CxrlensError(f"{run_dir} has trained {epoch} epochs already; --epochs {config.epochs} is not more")
    if config.epochs == epoch and batches == 0 and (run_dir / "thresholds.json").is_file():
        raise CxrlensError(f"{run_dir} has finished its {epoch} epochs; pass a larger --epochs to train on")
    if saved.data_fingerprint and saved.data_fingerprint != config.data_fingerprint:
        missing = ""
        if len(saved.skipped) != len(config.skipped):
            missing = f" ({len(saved.skipped)} files were missing then, {len(config.skipped)} now)"
        raise CxrlensError(
            f"the images, labels or splits of {config.data or 'the bundled data'} changed since {run_dir} "
            f"started{missing}; restore them or train a new run"
        )


# --- training -----------------------------------------------------------------------------------------


def _remove_failed_run(run_dir: Path, created: bool) -> None:
    """A fresh run that failed before its first checkpoint leaves nothing behind."""
    if rank_zero_only.rank != 0 or (run_dir / RESUME_FILE).exists():
        return  # other processes leave cleaning to rank 0; a checkpoint is resumable state, never deleted
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (*RUN_FILES, PENDING_BEST):
        (run_dir / name).unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one model; returns the run folder. Inputs are checked before anything is written; a fresh
    run that fails before its first checkpoint removes what it wrote."""
    run_dir = Path(config.out)
    config = TrainConfig.validate(config.__dict__, "training settings")
    min_size = get_spec(config.model).min_size
    if config.image_size < min_size:
        raise CxrlensError(f"{config.model} needs --image-size of at least {min_size} px, not {config.image_size}")
    checkpoint = read_resume_state(run_dir) if resume else None
    if not resume and any((run_dir / name).exists() for name in ("best.safetensors", RESUME_FILE)):
        raise CxrlensError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    L.seed_everything(config.seed, workers=True, verbose=False)
    manifest = prepare_data(config, progress)
    if checkpoint is not None:
        _check_resumable(config, run_dir, checkpoint)
    train_loader, val_loader = make_loaders(config, manifest, progress)
    module = Classifier(config, steps_per_epoch=len(train_loader) // max(1, config.devices))
    created = make_output_folder(run_dir)
    try:
        if checkpoint is not None and rank_zero_only.rank == 0:
            settle_run_folder(run_dir, checkpoint)
        del checkpoint  # the memory map; Lightning reads the file again
        config.save(run_dir)
        _fit(config, module, train_loader, val_loader, resume, progress)
        if rank_zero_only.rank == 0:
            choose_thresholds(run_dir, val_loader)
    except BaseException:
        if not resume:
            _remove_failed_run(run_dir, created)
        raise
    return run_dir


def _fit(config: TrainConfig, module: Classifier, train_loader, val_loader, resume: bool, progress: bool) -> None:
    run_dir = Path(config.out)
    writer = RunFolderWriter(run_dir, train_loader.sampler, config.batch_size, config.checkpoint_every)
    callbacks: list[Callback] = [writer]
    if config.early_stopping:
        callbacks.append(EarlyStopping("val_loss", patience=config.early_stopping))
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy="ddp" if config.devices > 1 else "auto",
        precision=config.precision,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # EpochOrder shares the data out between processes itself
        logger=False,
        enable_checkpointing=False,  # RunFolderWriter writes the checkpoints
        default_root_dir=run_dir,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")  # EpochOrder resumes itself
        ckpt = run_dir / RESUME_FILE if resume else None
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt, weights_only=True)


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
