"""``ScoreConfig``: every setting of a scorecard, typed, in one place.

``cxrlens score`` builds it from its options, :func:`cxrlens.score.run_scorecard` takes it, and the
output folder keeps it as ``config.json`` (with the runs scored), so a scorecard can be re-run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cxrlens.errors import CxrlensError

DEFAULT_MASKS = Path(__file__).resolve().parents[3] / "data" / "lungmasks"
DEFAULT_METHODS = ("saliency", "integrated_gradients", "grad_cam")
TARGETS = ("true", "all")


@dataclass
class ScoreConfig:
    """How to score runs x attribution methods on a mask folder.

    masks: a mask folder (None: the bundled ``data/lungmasks``). methods: names of
    ``cxrlens.explain.METHODS``; method_params: method -> its parameters. targets: ``"true"``
    explains each image's labelled classes (rows per class use only the images labelled with it),
    ``"all"`` every class on every image. shortcut / data / split: the shortcut detector on a
    classification split (default each run's own data, ``test`` split). max_images / probe_images:
    caps for quick runs. steps / baseline: deletion and insertion (``"blur"``, ``"mean"`` or a
    number). pointing_tolerance: px at the model's input size. sanity_*: the cascading randomisation
    on a subset of images at ``sanity_steps`` checkpoints (None: after every module); a method fails
    when the mean Spearman to the fully randomised model's maps is >= ``sanity_threshold``.
    robustness_* / noise: max-sensitivity under uniform noise of that radius. bootstrap: resamples
    for the CIs. device: where models run. gallery_size: worst offenders kept per model. rank_by:
    scorecard metrics the models are ranked by. block_size: images scored together: maps, metrics
    and random draws (random pixel order, noise; each block has its own seed) are computed block by
    block, so the results do not depend on how many processes share the blocks, and only one block's
    maps are held at a time.
    """

    masks: str | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    method_params: dict[str, dict] = field(default_factory=dict)
    targets: str = "true"
    shortcut: bool = True
    data: str | None = None
    split: str | None = "test"
    max_images: int | None = None
    probe_images: int | None = None
    steps: int = 20
    baseline: str | float = "blur"
    pointing_tolerance: float = 15.0
    sanity_images: int = 8
    sanity_steps: int | None = 5
    sanity_threshold: float = 0.5
    robustness_images: int = 8
    robustness_samples: int = 5
    noise: float = 0.02
    bootstrap: int = 1000
    seed: int = 0
    device: str = "cpu"
    max_batch: int = 16
    gallery_size: int = 6
    rank_by: list[str] = field(default_factory=lambda: ["lung_focus", "faithfulness"])
    progress: bool = False
    block_size: int = 16

    @property
    def mask_dir(self) -> Path:
        return Path(self.masks) if self.masks else DEFAULT_MASKS

    def check(self) -> None:
        """Raise :class:`CxrlensError` on a setting that cannot work, before anything is loaded."""
        from cxrlens.explain import get_method
        from cxrlens.score.metrics import get_metric

        if not self.methods:
            raise CxrlensError("give at least one attribution method to score")
        for method in self.methods:
            get_method(method)  # fail early on a typo
        unknown = sorted(set(self.method_params) - set(self.methods))
        if unknown:
            raise CxrlensError(
                f"parameters given for '{unknown[0]}', which is not among the methods {', '.join(self.methods)}"
            )
        for method, params in self.method_params.items():
            get_method(method).resolve(dict(params))
        if self.targets not in TARGETS:
            raise CxrlensError(f"targets must be 'true' or 'all', not {self.targets!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise CxrlensError(f"steps must be a positive int, got {self.steps!r}")
        if self.max_batch < 1:
            raise CxrlensError(f"max_batch must be at least 1, not {self.max_batch}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise CxrlensError(f"block_size must be a positive int, not {self.block_size!r}")
        for metric in self.rank_by:
            get_metric(metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ScoreConfig:
        """A config from ``config.json``'s fields (unknown keys, such as ``runs``, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> ScoreConfig:
        """The config saved in a scorecard folder (or a ``config.json`` path)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CxrlensError(f"cannot read {path}: {exc}; re-run `cxrlens score`") from None
