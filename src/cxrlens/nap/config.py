"""``NapConfig``: every setting of a NAP run, typed, in one place.

``cxrlens nap`` builds it from its options, :func:`cxrlens.nap.run_nap` and
:func:`cxrlens.nap.compute_naps` take it, and the output folder keeps it as ``config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cxrlens.errors import CxrlensError
from cxrlens.nap.groups import GroupSpec

TOP_MAPS = 10  # feature maps per layer in the grid plots (the study's)


@dataclass
class NapConfig:
    """How to profile.

    layers: module names to profile (for every model, or a mapping model -> names); None: the
    architecture's ``MODELS[arch].nap_layers``, the stages after each down-sampling.
    groups: None / "study" (COVID-19; Pneumonia; Pneumonia without COVID-19; Healthy), "errors"
    (correct / incorrect prediction per class at 0.5), a mapping name -> expression, or a list of
    expressions / "name=expression" strings (see :mod:`cxrlens.nap.groups`).
    gradient_weighted: False, True (score of the first class) or a class name: profile activation x
    gradient of that class's logit (GradNAPs). contrast_weighted: centre contrastive NAPs on the
    group-size-weighted mean instead of the unweighted mean of the group NAPs (the study's).
    separate: two group names whose maps are ranked by |difference of means| / pooled std (default:
    COVID-19 vs Pneumonia without COVID-19, else the first two groups). top_k: maps per layer in the
    plots and rankings. batch_size: images per forward pass; image_size: override every model's input
    size; num_workers: DataLoader workers; figures: write the PNGs; progress: a tqdm bar.
    """

    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None
    groups: GroupSpec = None
    gradient_weighted: bool | str = False
    contrast_weighted: bool = False
    separate: tuple[str, str] | None = None
    top_k: int = TOP_MAPS
    batch_size: int = 16
    image_size: int | None = None
    num_workers: int = 0
    figures: bool = True
    progress: bool = True

    def layers_for(self, model: str) -> Sequence[str] | None:
        """The layers asked for ``model`` (None: its architecture's defaults)."""
        return self.layers.get(model) if isinstance(self.layers, Mapping) else self.layers

    def check(self) -> None:
        if self.batch_size < 1:
            raise CxrlensError(f"batch size must be at least 1, not {self.batch_size}")
        if self.top_k < 0:
            raise CxrlensError(f"top_k must be >= 0, not {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
