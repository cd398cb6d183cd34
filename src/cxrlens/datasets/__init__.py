"""Data sets at scale: one reader per layout (a registry), localisation boxes as mask sets, and the
preprocessed image cache.

Layouts (``cxrlens.datasets.FORMATS``, detected from the files present or named with ``--format``):
``labels`` (our labels.csv), ``cohen``, ``folders`` (a folder per class), ``nih`` (ChestX-ray14),
``chexpert``, ``mimic`` (MIMIC-CXR-JPG), ``rsna`` (RSNA Pneumonia), ``vindr`` (VinDr-CXR), ``covidx``.
:func:`cxrlens.data.load_manifest` reads any of them into a :class:`cxrlens.data.Manifest`.
"""

from cxrlens.datasets.registry import (
    FORMATS,
    RATER_POLICIES,
    UNCERTAIN_POLICIES,
    DataFormat,
    ReadOptions,
    Table,
    detect_format,
    format_names,
    get_format,
    register_format,
)

# the readers register themselves on import, each in its module (this order is the order `--format` lists)
from cxrlens.datasets import local  # noqa: E402, F401  isort: skip
from cxrlens.datasets import nih  # noqa: E402, F401  isort: skip
from cxrlens.datasets import chexpert  # noqa: E402, F401  isort: skip
from cxrlens.datasets import rsna  # noqa: E402, F401  isort: skip
from cxrlens.datasets import vindr  # noqa: E402, F401  isort: skip
from cxrlens.datasets import covidx  # noqa: E402, F401  isort: skip
from cxrlens.datasets.boxes import box_mask_set  # noqa: E402  isort: skip

__all__ = ["FORMATS", "RATER_POLICIES", "UNCERTAIN_POLICIES", "DataFormat", "ReadOptions", "Table", "box_mask_set",
           "detect_format", "format_names", "get_format", "register_format"]
