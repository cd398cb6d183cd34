"""Run folders: the typed config of a training run, saved beside its checkpoints, and loading back.

A run folder holds ``config.json`` (``TrainConfig``), ``best.safetensors`` (lowest validation
loss), ``last.safetensors``, ``history.csv`` (one row per epoch), ``thresholds.json`` (per-class
thresholds chosen on the validation split) and Lightning's ``resume.ckpt`` for ``--resume``.

Every file is written through ``atomic_open`` (a temporary file in the same folder, then a rename),
so a kill at any instant leaves either the previous or the new version; a full disk or a permission
problem becomes one ``CxrlensError`` line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import Taxonomy, get_taxonomy

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI starts (and --help answers) quickly
    import torch
    from torch import nn

    from cxrlens.data import Preprocess

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


@dataclass
class TrainConfig:
    """Everything needed to re-run a training run. Defaults follow the study where it says.

    The CLI's options take their defaults from here; ``TrainConfig.validate`` checks types and ranges
    (of a config.json or of command-line values) with pydantic.
    """

    model: str = "resnet18"
    data: str = ""  # data set folder or manifest; '' = the bundled data/cxr3
    data_format: str = "auto"  # --format: the data set's layout (cxrlens.datasets.FORMATS); auto = detected
    views: str = "frontal"  # frontal, lateral, all, or view codes (PA,AP)
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"  # CheXpert / MIMIC -1.0 labels
    raters: Literal["majority", "any"] = "majority"  # VinDr-CXR's radiologists
    cache: str | None = None  # folder of the preprocessed image cache (cxrlens.datasets.cache); None = none
    out: str = "runs/resnet18"
    taxonomy: str = "cxr3"
    epochs: Positive = 20
    image_size: Annotated[int, Field(ge=16)] = 224
    batch_size: Positive = 8  # the study's
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3  # the study's Adam settings
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4
    max_images: Positive | None = None  # cap on training images, for quick runs
    seed: int = 1701  # the study's
    weights: str | None = None  # local pretrained weights (.safetensors / .pth)
    precision: str = "32-true"  # Lightning precision, e.g. "bf16-mixed", "16-mixed"
    devices: Positive = 1
    accelerator: str = "auto"
    augment: bool = True  # X-ray-safe augmentation (small affine, contrast); the study used none
    schedule: Literal["cosine", "constant"] = "cosine"  # "cosine" (with warm-up) or "constant" (the study's)
    early_stopping: NonNegative = 0  # patience in epochs on validation loss; 0 = off
    train_split: str = "train"
    val_split: str = "val"
    num_workers: NonNegative = 0
    checkpoint_every: NonNegative = 0  # also write resume.ckpt every N optimiser steps; 0 = at epoch ends only
    allow_leaks: bool = False  # train although the data audit found leaks between splits
    skip_missing: bool = False  # train on the rows whose image file exists
    leaks: list[str] = field(default_factory=list)  # leaks the audit found and --allow-leaks let through
    skipped: list[str] = field(default_factory=list)  # manifest rows left out by --skip-missing
    data_fingerprint: str = ""  # of the images, labels and splits trained on (a resume checks it)
    placement: Literal["centre", "random"] = "centre"  # "random": the image sits anywhere in the square in training
    fit: Literal["pad", "crop"] = "pad"  # "crop": crop to content, no padding (cxrlens.data.Preprocess)

    @property
    def tax(self) -> Taxonomy:
        return get_taxonomy(self.taxonomy)

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing of every image this run's model sees: training, evaluation, explanations, masks."""
        from cxrlens.data import Preprocess

        return Preprocess(self.image_size, fit=self.fit)

    @property
    def read_options(self):
        """How the run's data set is read (format, views, uncertainty and rater policies)."""
        from cxrlens.datasets import ReadOptions

        return ReadOptions(self.data_format, self.views, self.uncertain, self.raters)

    def save(self, run_dir: str | Path) -> None:
        atomic_write_text(Path(run_dir) / "config.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def validate(cls, values: dict, where: str = "", options: bool = False) -> TrainConfig:
        """A TrainConfig from a dict (a config.json, command-line values), its types and ranges checked.
        Unknown keys are ignored (configs of later versions). The error names ``where`` and the fields,
        as command-line options if ``options``."""
        known = {f.name for f in fields(cls)}
        values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in values.items() if k in known}
        try:
            return _CONFIG_ADAPTER.validate_python(values)
        except ValidationError as exc:
            problems = []
            for e in exc.errors()[:4]:
                name = ".".join(str(p) for p in e["loc"]) or "value"
                name = "--" + name.replace("_", "-") if options else name
                problems.append(f"{name}: {e['msg'][:1].lower()}{e['msg'][1:]} (got {e['input']!r})")
            raise CxrlensError(f"{where}{': ' if where else ''}{'; '.join(problems)}") from None

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise CxrlensError(f"{run_dir} is not a run folder (no config.json); train one with `cxrlens train`")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CxrlensError(f"{path}: broken JSON ({exc}); restore it or train the run again") from None
        if not isinstance(raw, dict):
            raise CxrlensError(f"{path}: expected a JSON object of training settings; restore it or train again")
        try:
            return cls.validate(raw, str(path))
        except CxrlensError as exc:
            raise CxrlensError(f"{exc}; fix the value or train the run again") from None


_CONFIG_ADAPTER = TypeAdapter(TrainConfig)

# Errors of the file system that the user can fix (space, permissions): one line, not a traceback.
_USER_FS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def file_system_error(exc: OSError, path: str | Path) -> CxrlensError | None:
    """A one-line user error for a full disk, a quota or a permission problem; None for other OSErrors."""
    reason = _USER_FS_ERRORS.get(exc.errno or -1)
    if reason is None:
        return None
    return CxrlensError(f"cannot write {path}: {reason}; free some space or choose another output folder")


def make_output_folder(folder: str | Path, option: str = "--out") -> bool:
    """Create an output folder, or say in one line why it cannot be; True if it did not exist before."""
    folder = Path(folder)
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_system_error(exc, folder) or CxrlensError(
            f"cannot create the folder {folder}: {exc.strerror or exc}; choose another {option}"
        ) from None
    return not existed


@contextmanager
def atomic_open(path: str | Path, durable: bool = False) -> Iterator[IO[bytes]]:
    """A binary file handle to a temporary file in ``path``'s folder, renamed to ``path`` when the block
    ends without an error (and removed when it does not): readers never see half a file, and a kill at
    any instant leaves the previous version in place. ``durable`` also flushes the data to the disk before
    the rename, so a power cut cannot leave an empty file behind the new name (used for checkpoints)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs should read like any other file
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        user_error = file_system_error(exc, path) if isinstance(exc, OSError) else None
        if user_error is not None:
            raise user_error from None
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some systems cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files ``atomic_open`` leaves when a process is killed half-way through a write."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def save_model_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a model's state dict as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


def load_thresholds(run_dir: Path, num_classes: int) -> list[float] | None:
    """The per-class thresholds of ``thresholds.json``, checked; None when the run has none."""
    path = run_dir / "thresholds.json"
    if not path.is_file():
        return None
    fix = "delete it to use a fixed --threshold, or train the run again"
    try:
        values = json.loads(path.read_text())["thresholds"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CxrlensError(f"{path}: broken ({type(exc).__name__}: {exc}); {fix}") from None
    ok = isinstance(values, list) and len(values) == num_classes
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or not all(0 <= v <= 1 for v in values):
        raise CxrlensError(f"{path}: 'thresholds' must be {num_classes} numbers in [0, 1], not {values!r:.80}; {fix}")
    return [float(v) for v in values]


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
    thresholds = load_thresholds(run_dir, config.tax.num_classes)
    model = create_model(config.model, config.tax.num_classes)
    load_weights(model, weights, strict_head=True)
    model.eval()
    return LoadedRun(model, config, run_dir, thresholds)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Sigmoid probabilities [n, classes] for a stack of images."""
    import torch

    model.eval()
    with torch.inference_mode():
        outs = [torch.sigmoid(model(images[i : i + batch_size]).float()) for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
