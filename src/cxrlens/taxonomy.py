"""Label taxonomy: findings with parents, so multi-label targets are derived, not typed by hand.

A COVID-19 image is labelled COVID-19 + Viral Pneumonia + Pneumonia in ``paper14``, and
COVID-19 + Pneumonia in ``cxr3``: every finding switches on its ancestors.

Presets: ``cxr3`` (the study's three classes), ``paper14`` (the study's 14 outputs), and the label sets
of the public collections: ``nih14`` (ChestX-ray14's 14 findings + No Finding), ``chexpert14`` (the 14
CheXpert observations, also MIMIC-CXR-JPG's, with the CheXpert labeler's parents) and ``vindr``
(VinDr-CXR's 28 image labels). Each preset also reads the study's classes and the other sets' names
where they mean the same thing (COVID-19 -> its pneumonia class, normal -> its no-finding class, NIH's
``Effusion`` -> CheXpert's ``Pleural Effusion``, ...), so a model trained on one collection can be
evaluated on another (external validation): ``cxrlens evaluate --run R --data OTHER``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from cxrlens.errors import CxrlensError


def _norm(token: str) -> str:
    return re.sub(r"[\s_\-]+", " ", token.strip().lower())


def split_finding(finding: str) -> list[str]:
    """The tokens of a free-text finding (``Pneumonia/Viral/COVID-19``, ``COVID-19, ARDS``, ``A|B``)."""
    return [t for t in re.split(r"[/,|;+]", str(finding)) if t.strip()]


@dataclass(frozen=True)
class Taxonomy:
    """Output classes (in model order), each class's parents, and aliases for finding strings."""

    name: str
    classes: tuple[str, ...]
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # normalised token -> class name
    # normalised token of a narrower finding -> the broader class it is read as (COVID-19 -> Pneumonia where the
    # taxonomy has no COVID-19): a positive implies the class, a negative says nothing about it
    broader: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for child, ps in self.parents.items():
            for p in (child, *ps):
                if p not in self.classes:
                    raise ValueError(f"taxonomy {self.name}: '{p}' is not a class")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def ancestors(self, cls: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.parents.get(cls, ()))
        while stack:
            parent = stack.pop()
            if parent not in seen:
                seen.add(parent)
                stack.extend(self.parents.get(parent, ()))
        return seen

    def resolve(self, token: str, broader: bool = True) -> str | None:
        """The class a single finding token names, or None when the taxonomy does not know it.
        ``broader=False``: only a class it names exactly (or a synonym), not a broader class."""
        key = _norm(token)
        for cls in self.classes:
            if _norm(cls) == key:
                return cls
        found = self.aliases.get(key)
        if found is None and broader:
            found = self.broader.get(key)
        return found

    def descendants(self, cls: str) -> set[str]:
        return {c for c in self.classes if cls in self.ancestors(c)}

    def encode(self, finding: str) -> np.ndarray:
        """Multi-hot vector for a finding string such as ``Pneumonia/Viral/COVID-19`` or ``COVID-19, ARDS``.

        Tokens are split on ``/ , | ;``; unknown tokens (e.g. NIH's ``Infiltration``) are ignored as
        long as at least one token is known; a finding with no known token raises ``KeyError``.
        """
        vector, known = self.encode_tokens(split_finding(finding))
        if not known:
            raise KeyError(finding)
        return vector

    def encode_tokens(self, tokens: Iterable[str]) -> tuple[np.ndarray, bool]:
        """Multi-hot vector (with ancestors) of finding tokens taken as they are (no splitting, so
        ``Nodule/Mass`` stays one token), and whether any token names a class."""
        found = {c for c in (self.resolve(t) for t in tokens if t.strip()) if c is not None}
        for cls in list(found):
            found |= self.ancestors(cls)
        return np.array([c in found for c in self.classes], dtype=np.float32), bool(found)

    def index(self, cls: str) -> int:
        resolved = self.resolve(cls)
        if resolved is None:
            raise CxrlensError(f"unknown class '{cls}'; the classes are: {', '.join(self.classes)}")
        return self.classes.index(resolved)


_PNEUMONIA_WORDS = (
    "viral",
    "bacterial",
    "fungal",
    "sars",
    "mers",
    "ards",
    "streptococcus",
    "pneumocystis",
    "klebsiella",
    "chlamydophila",
    "legionella",
    "e.coli",
    "e. coli",
    "varicella",
    "mycoplasma",
    "influenza",
    "lipoid",
    "viral pneumonia",
    "bacterial pneumonia",
    "fungal pneumonia",
    "other pneumonia",
)
_COVID_WORDS = ("covid", "covid19", "covid 19", "sars cov 2", "coronavirus")
_NORMAL_WORDS = ("no finding", "normal", "healthy", "no findings", "no_findings")

CXR3 = Taxonomy(
    name="cxr3",
    classes=("COVID-19", "Pneumonia", "Normal"),
    parents={"COVID-19": ("Pneumonia",)},
    aliases={
        **{_norm(w): "Pneumonia" for w in _PNEUMONIA_WORDS},
        **{_norm(w): "COVID-19" for w in _COVID_WORDS},
        **{_norm(w): "Normal" for w in _NORMAL_WORDS},
    },
)

_VIRAL = ("COVID-19", "SARS", "MERS")
_BACTERIAL = ("Streptococcus", "Klebsiella", "Chlamydophila", "Legionella")
PAPER14 = Taxonomy(
    name="paper14",
    classes=(
        "COVID-19",
        "SARS",
        "MERS",
        "ARDS",
        "Streptococcus",
        "Pneumocystis",
        "Klebsiella",
        "Chlamydophila",
        "Legionella",
        "Pneumonia",
        "Viral Pneumonia",
        "Bacterial Pneumonia",
        "Fungal Pneumonia",
        "No Finding",
    ),
    parents={
        **{v: ("Viral Pneumonia", "Pneumonia") for v in _VIRAL},
        **{b: ("Bacterial Pneumonia", "Pneumonia") for b in _BACTERIAL},
        "Pneumocystis": ("Fungal Pneumonia", "Pneumonia"),
        "ARDS": ("Pneumonia",),
        "Viral Pneumonia": ("Pneumonia",),
        "Bacterial Pneumonia": ("Pneumonia",),
        "Fungal Pneumonia": ("Pneumonia",),
    },
    aliases={
        **{_norm(w): "COVID-19" for w in _COVID_WORDS},
        **{_norm(w): "No Finding" for w in _NORMAL_WORDS},
        "viral": "Viral Pneumonia",
        "bacterial": "Bacterial Pneumonia",
        "fungal": "Fungal Pneumonia",
        "pneumocystis jirovecii": "Pneumocystis",
        "pcp": "Pneumocystis",
        "e.coli": "Bacterial Pneumonia",
        "e. coli": "Bacterial Pneumonia",
        "mycoplasma": "Bacterial Pneumonia",
        "influenza": "Viral Pneumonia",
        "varicella": "Viral Pneumonia",
        "lipoid": "Pneumonia",
        "other pneumonia": "Pneumonia",
    },
)

# --- the public collections' label sets ----------------------------------------------------------------

# the study's classes in a collection's terms (what external validation needs): COVID-19 and the kinds of
# pneumonia are pneumonia
_TO_PNEUMONIA = {_norm(w): "Pneumonia" for w in _PNEUMONIA_WORDS + _COVID_WORDS}

NIH14 = Taxonomy(
    name="nih14",
    classes=(  # Wang et al. 2017's order; "No Finding" is NIH's label for an image with none of the 14
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "No Finding",
    ),
    aliases={
        **{_norm(w): "No Finding" for w in _NORMAL_WORDS},
        "infiltrate": "Infiltration",  # BBox_List_2017.csv's spelling
        "pleural effusion": "Effusion",  # CheXpert, VinDr
        "pulmonary fibrosis": "Fibrosis",  # VinDr
    },
    broader=_TO_PNEUMONIA,
)

CHEXPERT14 = Taxonomy(
    name="chexpert14",
    classes=(
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices",
    ),
    # the CheXpert labeler's hierarchy (Irvin et al. 2019; used as parents by Pham et al. 2021)
    parents={
        "Cardiomegaly": ("Enlarged Cardiomediastinum",),
        **{c: ("Lung Opacity",) for c in ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")},
    },
    aliases={
        **{_norm(w): "No Finding" for w in _NORMAL_WORDS},
        "effusion": "Pleural Effusion",  # NIH
        "mass": "Lung Lesion",
        "nodule": "Lung Lesion",
        "nodule/mass": "Lung Lesion",  # VinDr
        "rib fracture": "Fracture",
        "clavicle fracture": "Fracture",
    },
    broader=_TO_PNEUMONIA,
)

VINDR = Taxonomy(
    name="vindr",
    classes=(  # image_labels_*.csv: 22 local labels (with boxes), then 6 global ones
        "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
        "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
        "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
        "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
        "Other diseases", "No finding",
    ),
    aliases={
        **{_norm(w): "No finding" for w in _NORMAL_WORDS},
        "other disease": "Other diseases",  # both spellings occur in the releases
        "effusion": "Pleural effusion",  # NIH
        "fibrosis": "Pulmonary fibrosis",
        "mass": "Nodule/Mass",
        "nodule": "Nodule/Mass",
        "infiltrate": "Infiltration",
    },
    broader=_TO_PNEUMONIA,
)

TAXONOMIES: dict[str, Taxonomy] = {"cxr3": CXR3, "paper14": PAPER14, "nih14": NIH14, "chexpert14": CHEXPERT14,
                                   "vindr": VINDR}


def get_taxonomy(name: str) -> Taxonomy:
    if name not in TAXONOMIES:
        raise CxrlensError(f"unknown taxonomy '{name}'; choose one of: {', '.join(TAXONOMIES)}")
    return TAXONOMIES[name]
