"""One kind of registry for every extension point (architectures, attribution methods, scorecard metrics,
data formats), as timm keeps its models: a name -> entry table filled by decorators beside each entry.

Adding an entry is one registration; asking for an unknown name is one user error that lists the choices.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from cxrlens.errors import CxrlensError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Name -> entry in registration order (a dict, so ``in``, iteration and ``[]`` work as usual)."""

    def __init__(self, kind: str, choices: str = "choose one of") -> None:
        super().__init__()
        self.kind = kind  # what an entry is, for messages: "model", "attribution method", ...
        self.choices = choices  # how the message introduces the names, e.g. "choose auto or one of"

    def add(self, name: str, entry: T, replace: bool = False) -> T:
        """Register ``entry`` as ``name``; a name already taken is an error unless ``replace``."""
        if name in self and not replace:
            article = "an" if self.kind[:1] in "aeiou" else "a"
            raise CxrlensError(f"{article} {self.kind} '{name}' is already registered; pick another name or pass "
                               "replace=True")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry called ``name``, or a one-line error naming the registered ones."""
        if name not in self:
            raise CxrlensError(f"unknown {self.kind} '{name}'; {self.choices}: {', '.join(self)}")
        return self[name]
