"""Typed configuration of an explanation job: what the CLI builds, the library takes and the output folder
keeps (``config.json`` next to the maps), like :class:`cxrlens.runs.TrainConfig` for training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cxrlens.errors import CxrlensError
from cxrlens.explain.figures import atomic_write_bytes
from cxrlens.explain.methods import METHODS, OUTPUTS, describe_params, get_method

CONFIG_FILE = "config.json"


@dataclass
class ExplainSettings:
    """How maps are computed and drawn (the options of :func:`cxrlens.explain.explain_images`)."""

    output: str = "sigmoid"  # explained quantity: the class's sigmoid probability (the study's) or its logit
    max_batch: int = 16  # images per forward pass (perturbations, integration steps, noise samples)
    channels_last: bool = False
    autocast_bf16: bool = False
    clip_percentile: float = 99.0  # overlays clip |map| here
    alpha: float = 0.5  # overlay opacity
    figures: bool = True  # overlays and grids besides the .npy maps

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise CxrlensError(f"output must be one of {', '.join(OUTPUTS)}, got '{self.output}'")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise CxrlensError(f"max_batch must be a positive int, got {self.max_batch!r}")


def parse_methods(text: str | dict[str, dict[str, Any]] | list[str]) -> dict[str, dict[str, Any]]:
    """'all', comma-separated names, a list of names or name -> parameters: name -> parameters, checked."""
    if isinstance(text, str):
        names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
        methods: dict[str, dict[str, Any]] = {name: {} for name in names}
    elif isinstance(text, dict):
        methods = {name: dict(params or {}) for name, params in text.items()}
    else:
        methods = {name: {} for name in text}
    if not methods:
        raise CxrlensError(f"no attribution methods given; choose from: {', '.join(METHODS)}")
    for name, params in methods.items():
        get_method(name).resolve(params)  # unknown names and parameters fail up front
    return methods


@dataclass
class ExplainConfig:
    """One ``cxrlens explain`` job: enough to run it again.

    runs: run folders (models); images: image files or folders, or else ``data`` (a data set) whose
    ``split`` (None: every image) gives the first ``max_images`` images (None: all); methods: name ->
    parameters (see ``METHODS``); targets: 'all', 'positive' (classes the soft vote predicts),
    'true' (each image's labels; with ``data`` and ``store``) or comma-separated class names;
    settings: how maps are computed and drawn.

    Data-set scale (:mod:`cxrlens.explain.dataset`): ``store`` writes float16 maps in chunks of
    ``chunk_size`` images with an index instead of per-image files and figures (resumable, and what
    several processes write); ``metrics_only`` keeps no maps but the scorecard metrics of each
    (image, class), computed on the fly with ``metrics`` (fields of
    :class:`cxrlens.score.ScoreConfig`: steps, baseline, sanity_images, ...) against the masks of
    ``masks`` (a mask folder; its images are matched to the data's by path, others score NaN on the
    localisation metrics).
    """

    runs: list[str]
    out: str
    images: list[str] = field(default_factory=list)
    data: str | None = None
    split: str | None = "test"
    max_images: int | None = 8
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {name: {} for name in METHODS})
    targets: str = "all"
    settings: ExplainSettings = field(default_factory=ExplainSettings)
    store: bool = False
    chunk_size: int = 32
    metrics_only: bool = False
    masks: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.settings, dict):  # read back from config.json
            unknown = sorted(set(self.settings) - {f.name for f in fields(ExplainSettings)})
            if unknown:
                raise CxrlensError(f"unknown explain setting '{unknown[0]}'")
            self.settings = ExplainSettings(**self.settings)
        self.methods = parse_methods(self.methods)
        if not self.runs:
            raise CxrlensError("give at least one run folder (--run RUN_DIR)")
        if bool(self.images) == bool(self.data):
            raise CxrlensError("give either --image (files or folders) or --data (a data set), not both or neither")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise CxrlensError(f"max_images must be a positive int (or None: every image), got {self.max_images!r}")
        self.store = bool(self.store or self.metrics_only)  # metrics are computed chunk by chunk, like the store
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise CxrlensError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.targets == "true" and not (self.store and self.data):
            raise CxrlensError("targets 'true' (each image's labels) needs --data and --store")
        if (self.masks or self.metrics) and not self.metrics_only:
            raise CxrlensError("masks and metric settings are used by --metrics-only; add it, or leave them out")

    def to_json(self) -> str:
        data = asdict(self)
        data["methods"] = {name: describe_params(params) for name, params in self.methods.items()}
        return json.dumps(data, indent=2)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        atomic_write_bytes(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ExplainConfig:
        path = Path(folder) / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CxrlensError(f"cannot read {path}: {exc}; it is written by `cxrlens explain`") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CxrlensError(f"{path}: unknown field '{unknown[0]}'; valid fields: {', '.join(sorted(known))}")
        return cls(**data)
