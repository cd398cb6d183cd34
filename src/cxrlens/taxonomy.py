"""Label taxonomy: findings with parents, so multi-label targets are derived, not typed by hand.

A COVID-19 image is labelled COVID-19 + Viral Pneumonia + Pneumonia in ``paper14``, and
COVID-19 + Pneumonia in ``cxr3``: every finding switches on its ancestors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from cxrlens.errors import CxrlensError


def _norm(token: str) -> str:
    return re.sub(r"[\s_\-]+", " ", token.strip().lower())


@dataclass(frozen=True)
class Taxonomy:
    """Output classes (in model order), each class's parents, and aliases for finding strings."""

    name: str
    classes: tuple[str, ...]
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # normalised token -> class name

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

    def resolve(self, token: str) -> str | None:
        """The class a single finding token names, or None when the taxonomy does not know it."""
        key = _norm(token)
        for cls in self.classes:
            if _norm(cls) == key:
                return cls
        return self.aliases.get(key)

    def encode(self, finding: str) -> np.ndarray:
        """Multi-hot vector for a finding string such as ``Pneumonia/Viral/COVID-19`` or ``COVID-19, ARDS``.

        Tokens are split on ``/ , | ;``; unknown tokens (e.g. NIH's ``Infiltration``) are ignored as
        long as at least one token is known; a finding with no known token raises ``KeyError``.
        """
        tokens = [t for t in re.split(r"[/,|;+]", str(finding)) if t.strip()]
        found = {c for c in (self.resolve(t) for t in tokens) if c is not None}
        if not found:
            raise KeyError(finding)
        for cls in list(found):
            found |= self.ancestors(cls)
        return np.array([c in found for c in self.classes], dtype=np.float32)

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

TAXONOMIES: dict[str, Taxonomy] = {"cxr3": CXR3, "paper14": PAPER14}


def get_taxonomy(name: str) -> Taxonomy:
    if name not in TAXONOMIES:
        raise CxrlensError(f"unknown taxonomy '{name}'; choose one of: {', '.join(TAXONOMIES)}")
    return TAXONOMIES[name]
