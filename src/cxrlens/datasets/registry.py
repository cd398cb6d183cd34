"""The registry of data-set layouts: one entry per format, found from the files present or named by name.

A format is a reader function registered with :func:`register_format` beside a ``detect`` function (does
this file or folder look like the format?) and ``looks_for`` (what detection looks for, for the error
when nothing matches). Readers return a :class:`Table`, one row per image with its finding tokens;
:func:`cxrlens.datasets.build.finish` turns it into a :class:`cxrlens.data.Manifest` for a taxonomy
(views, paths, labels, missing files), the same way for every format. A new layout is one registered
reader, from anywhere::

    @register_format("my_pacs", detect=lambda p: (p / "export.csv").is_file(), looks_for="export.csv")
    def read_my_pacs(source: Path, options: ReadOptions) -> Table: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrlens.errors import CxrlensError
from cxrlens.registry import Registry

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")  # CheXpert's U-Ignore, U-Zeros, U-Ones (Irvin et al. 2019)
RATER_POLICIES = ("majority", "any")  # VinDr-CXR: several radiologists per image


@dataclass(frozen=True)
class ReadOptions:
    """How to read a data set. format: a registered name or ``auto`` (detected from the files present).
    views: ``frontal`` (PA/AP and images whose view is not recorded), ``lateral``, ``all``, or view codes
    separated by commas (``PA,AP``). uncertain: CheXpert / MIMIC-CXR's ``-1.0`` labels: ``ignore`` (left out
    of the loss and the metrics), ``zeros`` (negative) or ``ones`` (positive). raters: VinDr-CXR's several
    radiologists per image: ``majority`` (more than half say positive) or ``any`` (one is enough)."""

    format: str = "auto"
    views: str = "frontal"
    uncertain: str = "ignore"
    raters: str = "majority"

    def check(self) -> None:
        """Raise :class:`CxrlensError` for a value no reader accepts."""
        if self.format != "auto":
            get_format(self.format)
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise CxrlensError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, not '{self.uncertain}'")
        if self.raters not in RATER_POLICIES:
            raise CxrlensError(f"--raters must be one of {', '.join(RATER_POLICIES)}, not '{self.raters}'")
        if not self.views.strip():
            raise CxrlensError("--views is empty; give frontal, lateral, all or view codes such as PA,AP")


@dataclass
class Table:
    """What a reader returns: one row per image, labels still as the data set's own finding tokens.

    frame columns: ``path`` (absolute, normalised), ``finding`` (the image's positive findings, tokens
    separated by ``label_sep``), ``uncertain`` (findings marked uncertain, kept under ``--uncertain ignore``),
    ``patient_group``, ``split`` ('' when the data set has none), ``source``, ``view`` ('' when not recorded),
    ``_line`` (the line of ``label_file`` the row comes from; 0 when none), plus any metadata worth keeping.

    root: images must lie below it (None: anywhere, as in our labels.csv). label_sep: ``|`` for
    structured tables, None for free text split on ``/ , | ;`` (Cohen's findings). strict: a finding the
    taxonomy does not know is an error (our own formats) rather than a row the taxonomy cannot use.
    vocabulary: every label the data set can give (None: as many as the taxonomy has): a class that no
    label names is unknown for every row, not negative. keep_negatives: keep rows with no positive class
    (an NIH image with only ``Effusion`` is negative for every class of ``cxr3``); Cohen's reader drops them,
    as the study did. boxes: localisation ground truth (``path, finding, x, y, w, h, ref_w, ref_h``; the
    reference size the coordinates refer to, NaN for the image's own size). dropped: rows the reader left
    out, by reason. problems: error lines found while reading (bad label values), raised together.
    encoded: targets as :func:`cxrlens.data.write_manifest` saved them (class names, positive and unknown
    classes per row): used instead of the findings when the taxonomy has exactly those classes.
    """

    frame: pd.DataFrame
    origin: Path
    label_file: Path
    root: Path | None
    label_sep: str | None = "|"
    strict: bool = False
    vocabulary: tuple[str, ...] | None = None
    keep_negatives: bool = True
    boxes: pd.DataFrame | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    encoded: tuple | None = None


Reader = Callable[[Path, ReadOptions], Table]


@dataclass(frozen=True)
class DataFormat:
    """A registered layout: its reader, its detector and what the detector looks for."""

    name: str
    read: Reader
    detect: Callable[[Path], bool]
    looks_for: str
    description: str = ""
    priority: int = 50  # detection order: lower first; the catch-all class folders come last


#: name -> format; detection tries them by priority, then registration order
FORMATS: Registry[DataFormat] = Registry("data format", "choose auto or one of")


def register_format(name: str, *, detect: Callable[[Path], bool], looks_for: str, priority: int = 50,
                    replace: bool = False) -> Callable[[Reader], Reader]:
    """Decorator: register ``read(source, options) -> Table`` as the layout ``name``. ``detect(source)``
    says whether a file or folder looks like it (cheap: file names and a CSV header at most)."""

    def decorate(read: Reader) -> Reader:
        description = (read.__doc__ or "").strip().split("\n")[0]
        FORMATS.add(name, DataFormat(name, read, detect, looks_for, description, priority), replace)
        return read

    return decorate


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> DataFormat:
    return FORMATS.lookup(name)


def detect_format(source: Path) -> DataFormat:
    """The first format whose detector recognises ``source``; an error naming what was looked for."""
    for fmt in sorted(FORMATS.values(), key=lambda f: f.priority):
        try:
            if fmt.detect(source):
                return fmt
        except OSError:  # an unreadable file is the reader's error to report, not a detection
            continue
    looked = "; ".join(f"{f.looks_for} ({f.name})" for f in sorted(FORMATS.values(), key=lambda f: f.priority))
    if source.is_file():
        try:
            columns = list(pd.read_csv(source, nrows=0).columns)
        except Exception:  # not a CSV at all
            columns = []
        raise CxrlensError(f"{source}: unrecognised columns {columns[:12]}; looked for {looked}. "
                           "Name the format with --format")
    raise CxrlensError(f"{source}: no known data set layout; looked for {looked}. Name the format with --format")
