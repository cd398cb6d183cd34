"""Group expressions: which images a NAP averages over, as boolean expressions over class names.

``"Pneumonia & ~COVID-19"`` combines class names with ``&`` (and), ``|`` (or), ``~`` (not) and
parentheses; ``pred:NAME`` means "the model predicts NAME" (sigmoid >= :data:`PRED_THRESHOLD`),
which gives the error-analysis groups (correct / incorrect per class). A tiny recursive-descent
parser reads them (no ``eval``), with limits on length and nesting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cxrlens.errors import CxrlensError

PRED_THRESHOLD = 0.5  # a class counts as predicted when its sigmoid reaches this (error groups)
MAX_EXPR_LEN = 500
MAX_EXPR_DEPTH = 40  # nesting limit, so a hostile expression cannot exhaust the Python stack


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@dataclass(frozen=True)
class GroupExpr:
    """A parsed group expression: a tree of ("label", i) / ("pred", i) / ("not", a) / ("and"|"or", a, b)."""

    text: str
    tree: tuple

    @property
    def uses_predictions(self) -> bool:
        return _uses_pred(self.tree)

    def evaluate(self, labels, predictions=None):
        """Membership mask [n] for boolean label (and prediction) matrices [n, classes].

        Works on numpy arrays and torch tensors alike (only ``[:, i]``, ``~``, ``&``, ``|`` are used).
        """
        if self.uses_predictions and predictions is None:
            raise CxrlensError(f"group '{self.text}' uses predictions (pred:...) but none were given")
        return _evaluate(self.tree, labels, predictions)


def _uses_pred(node: tuple) -> bool:
    if node[0] == "pred":
        return True
    return node[0] != "label" and any(_uses_pred(child) for child in node[1:])


def _evaluate(node: tuple, labels, predictions):
    kind = node[0]
    if kind == "label":
        return labels[:, node[1]]
    if kind == "pred":
        return predictions[:, node[1]]
    if kind == "not":
        return ~_evaluate(node[1], labels, predictions)
    left, right = _evaluate(node[1], labels, predictions), _evaluate(node[2], labels, predictions)
    return left & right if kind == "and" else left | right


_TOKEN = re.compile(r"\s*(?:([&|~()])|([^&|~()]+))")
_PRED = re.compile(r"^pred\s*:\s*(.+)$", re.IGNORECASE)


class _Parser:
    """Recursive descent: or := and ('|' and)*; and := not ('&' not)*; not := '~' not | atom;
    atom := '(' or ')' | NAME | 'pred:' NAME. Precedence: ~ binds tightest, then &, then |."""

    def __init__(self, text: str, classes: Sequence[str]):
        self.text, self.classes = text, tuple(classes)
        self.tokens: list[tuple[str, str, int]] = []  # (kind, value, position)
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:  # only trailing whitespace is left
                break
            if match.group(1):
                self.tokens.append(("op", match.group(1), match.start(1)))
            elif match.group(2).strip():
                self.tokens.append(("name", match.group(2).strip(), match.start(2)))
            pos = match.end()
        self.i = 0
        self.depth = 0

    def fail(self, problem: str) -> CxrlensError:
        text = " ".join(self.text.split())  # one line, whatever the user typed
        return CxrlensError(
            f"group expression '{text}': {problem}; combine class names ({', '.join(self.classes)}) "
            "with & (and), | (or), ~ (not) and parentheses, e.g. 'Pneumonia & ~COVID-19'"
        )

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def parse(self) -> tuple:
        if not self.tokens:
            raise self.fail("it is empty")
        node = self.parse_or()
        token = self.peek()
        if token is not None:
            raise self.fail(f"unexpected '{token[1]}' at character {token[2] + 1}")
        return node

    def parse_or(self) -> tuple:
        node = self.parse_and()
        while (token := self.peek()) is not None and token[1] == "|" and token[0] == "op":
            self.i += 1
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self) -> tuple:
        node = self.parse_not()
        while (token := self.peek()) is not None and token[1] == "&" and token[0] == "op":
            self.i += 1
            node = ("and", node, self.parse_not())
        return node

    def parse_not(self) -> tuple:
        negations = 0
        while (token := self.peek()) is not None and token == ("op", "~", token[2]):
            negations += 1
            self.i += 1
        node = self.parse_atom()
        return ("not", node) if negations % 2 else node

    def parse_atom(self) -> tuple:
        token = self.peek()
        if token is None:
            raise self.fail("it ends where a class name or '(' is expected")
        kind, value, position = token
        if kind == "op" and value == "(":
            self.depth += 1
            if self.depth > MAX_EXPR_DEPTH:
                raise self.fail(f"parentheses nested deeper than {MAX_EXPR_DEPTH}")
            self.i += 1
            node = self.parse_or()
            closing = self.peek()
            if closing is None or closing[:2] != ("op", ")"):
                raise self.fail(f"the '(' at character {position + 1} is never closed")
            self.i += 1
            self.depth -= 1
            return node
        if kind == "op":
            raise self.fail(f"unexpected '{value}' at character {position + 1}")
        self.i += 1
        pred = _PRED.match(value)
        if pred:
            return ("pred", self.resolve(pred.group(1).strip()))
        return ("label", self.resolve(value))

    def resolve(self, name: str) -> int:
        if name in self.classes:
            return self.classes.index(name)
        key = _norm(name)
        for i, cls in enumerate(self.classes):
            if _norm(cls) == key:
                return i
        raise self.fail(f"unknown class '{name}'")


def parse_group(text: str, classes: Sequence[str]) -> GroupExpr:
    """Parse a group expression over ``classes``: class names joined by ``&``, ``|``, ``~`` and
    parentheses; ``pred:NAME`` is the model's prediction of NAME. Names match case-insensitively
    (spaces, ``_`` and ``-`` are equivalent). Raises ``CxrlensError`` naming the problem."""
    if not isinstance(text, str):
        raise CxrlensError(f"group expression must be a string, not {type(text).__name__}")
    if len(text) > MAX_EXPR_LEN:
        raise CxrlensError(f"group expression is {len(text)} characters long; keep it below {MAX_EXPR_LEN}")
    return GroupExpr(text.strip(), _Parser(text, classes).parse())


def default_groups(classes: Sequence[str]) -> dict[str, str]:
    """The study's four groups where the taxonomy has COVID-19 and Pneumonia, else one per class."""
    names = {_norm(c): c for c in classes}
    covid, pneumonia = names.get(_norm("COVID-19")), names.get(_norm("Pneumonia"))
    if covid is None or pneumonia is None:
        return {c: c for c in classes}
    return {
        "COVID-19": covid,
        "Pneumonia": pneumonia,
        "Pneumonia without COVID-19": f"{pneumonia} & ~{covid}",
        "Healthy": f"~{pneumonia} & ~{covid}",
    }


def error_groups(classes: Sequence[str]) -> dict[str, str]:
    """Correct / incorrect prediction (threshold 0.5) per class, for error analysis."""
    groups = {}
    for c in classes:
        correct = f"({c} & pred:{c}) | (~{c} & ~pred:{c})"
        groups[f"{c} correct"] = correct
        groups[f"{c} incorrect"] = f"~({correct})"
    return groups


def class_index(name: str, classes: Sequence[str]) -> int:
    key = _norm(name)
    for i, cls in enumerate(classes):
        if _norm(cls) == key:
            return i
    raise CxrlensError(f"unknown class '{name}' for gradient weighting; the classes are: {', '.join(classes)}")


GroupSpec = str | Mapping[str, str] | Sequence[str] | None


def resolve_groups(groups: GroupSpec, classes: Sequence[str]) -> list[tuple[str, GroupExpr]]:
    """Named, parsed groups from a spec: None or "study" (the study's four), "errors" (correct /
    incorrect per class), a mapping name -> expression, or a list of expressions or "name=expression"."""
    if groups is None or (isinstance(groups, str) and groups.strip().lower() in ("study", "default")):
        spec: dict[str, str] = default_groups(classes)
    elif isinstance(groups, str) and groups.strip().lower() == "errors":
        spec = error_groups(classes)
    elif isinstance(groups, Mapping):
        spec = {str(k): v for k, v in groups.items()}
    else:
        items = [groups] if isinstance(groups, str) else list(groups)
        spec = {}
        for item in items:
            name, _, expr = str(item).partition("=") if "=" in str(item) else (str(item), "", str(item))
            name = name.strip()
            if name in spec:
                raise CxrlensError(f"group '{name}' is given twice; give each group a distinct name (name=expr)")
            spec[name] = expr
    if not spec:
        raise CxrlensError("no groups given; pass expressions such as 'COVID-19' or 'Pneumonia & ~COVID-19'")
    out = []
    for name, expr in spec.items():
        if not name:
            raise CxrlensError(f"group '{expr}' has an empty name; write name=expression")
        out.append((name, parse_group(expr, classes)))
    return out
