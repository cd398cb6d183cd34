"""Global interpretability: Neuron Activation Profiles (NAPs) over a whole data set.

A NAP of a group of images is the mean feature map of a layer over the group's images; the
contrastive NAP is the group NAP minus the (unweighted) mean of all group NAPs, so it shows what is
special about a group. Feature maps that are constant over every image and position are "dead";
their share is reported and they are left out of rankings, distances and plots.

Everything is computed in one streaming pass: forward hooks capture a batch's activations, which are
folded at once into per-group running sums (float64), per-map minima/maxima and per-group sums and
sums of squares of the spatially averaged maps. Memory depends on the layer sizes and the number of
groups, never on the number of images.

Groups are boolean expressions over class names (``"Pneumonia & ~COVID-19"``), parsed by a tiny
parser (no ``eval``); ``pred:NAME`` means "the model predicts NAME" (sigmoid >= 0.5), which gives the
error-analysis groups (correct / incorrect per class).

Entry points: ``run_nap`` (runs or models + a manifest -> files in a folder), ``compute_naps``
(models + any iterable of batches -> ``NapResult`` objects), ``parse_group``.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cxrlens.errors import CxrlensError
from cxrlens.models import MODELS

PRED_THRESHOLD = 0.5  # a class counts as predicted when its sigmoid reaches this (error groups)
TOP_MAPS = 10  # feature maps per layer in the grid plots (the study's)
MAX_EXPR_LEN = 500
MAX_EXPR_DEPTH = 40  # nesting limit, so a hostile expression cannot exhaust the Python stack


# --- group expressions ---------------------------------------------------------------------------

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


# --- layers --------------------------------------------------------------------------------------

def resolve_layers(
    model: nn.Module, layers: Sequence[str] | None, architecture: str | None = None
) -> dict[str, nn.Module]:
    """Modules to profile, by name: ``layers`` or the architecture's default NAP layers."""
    modules = dict(model.named_modules())
    if layers is None:
        if architecture not in MODELS:
            raise CxrlensError(
                f"model '{architecture}' is not a registered architecture, so it has no default NAP layers; "
                f"pass layers by name (top-level modules: {', '.join(_top_level(model))})"
            )
        layers = MODELS[architecture].nap_layers
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise CxrlensError("no layers given; pass at least one module name")
    chosen = {}
    for name in layers:
        if name not in modules or name == "":
            defaults = MODELS[architecture].nap_layers if architecture in MODELS else ()
            close = difflib.get_close_matches(str(name), [n for n in modules if n], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            default_text = f"default NAP layers: {', '.join(defaults)}; " if defaults else ""
            raise CxrlensError(
                f"unknown layer '{name}' for model {architecture or type(model).__name__}; {hint}"
                f"{default_text}top-level modules: {', '.join(_top_level(model))} "
                "(nested modules are named with dots, e.g. layer1.0.conv1)"
            )
        chosen[name] = modules[name]
    return chosen


def _top_level(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


# --- streaming accumulation ----------------------------------------------------------------------

class _LayerAccumulator:
    """Running per-group sums of one layer's (possibly gradient-weighted) activations.

    The arrays are numpy (so Python's tracemalloc sees them) and are updated in place through torch
    views, which lets one float64 GEMM per batch add every group's sum at once.
    """

    def __init__(self, name: str, num_groups: int):
        self.name, self.num_groups = name, num_groups
        self.shape: tuple[int, ...] | None = None  # per image, channel first

    def _allocate(self, act: torch.Tensor) -> None:
        self.raw_shape = tuple(act.shape[1:])
        self.shape = self.raw_shape if act.dim() > 2 else (act.shape[1], 1, 1)
        channels, size = self.shape[0], math.prod(self.shape)
        g = self.num_groups
        self.sums = np.zeros((g, size), dtype=np.float64)
        self.map_sums = np.zeros((g, channels), dtype=np.float64)  # of spatially averaged maps
        self.map_squares = np.zeros((g, channels), dtype=np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self._views = [torch.from_numpy(a) for a in (self.sums, self.map_sums, self.map_squares)]

    def update(self, act: torch.Tensor, profiled: torch.Tensor, masks: torch.Tensor) -> None:
        """``act``: raw activations [B, C, ...] (for dead maps); ``profiled``: what is averaged
        (the activations, or activation x gradient); ``masks``: [B, groups] float64 0/1."""
        if self.shape is None:
            self._allocate(act)
        if tuple(act.shape[1:]) != self.raw_shape:
            raise CxrlensError(
                f"layer {self.name} changed shape from {self.raw_shape} to {tuple(act.shape[1:])} between "
                "batches; all images must have the same size"
            )
        batch = act.shape[0]
        flat = act.detach().reshape(batch, self.shape[0], -1)
        # dead-map test: min and max over every image and position of the raw activation
        # (positions first, then images: reducing the contiguous axis first is twice as fast)
        np.minimum(self.min, flat.amin(dim=2).amin(dim=0).double().cpu().numpy(), out=self.min)
        np.maximum(self.max, flat.amax(dim=2).amax(dim=0).double().cpu().numpy(), out=self.max)
        values = profiled.detach().reshape(batch, -1).double()
        spatial_means = values.reshape(batch, self.shape[0], -1).mean(dim=2)
        masks_t = masks.t().to(values.device)
        sums, map_sums, map_squares = self._views
        if values.device.type == "cpu":
            sums.addmm_(masks_t, values)
            map_sums.addmm_(masks_t, spatial_means)
            map_squares.addmm_(masks_t, spatial_means * spatial_means)
        else:  # accumulate on the device, fold into the host arrays once per batch
            sums += (masks_t @ values).cpu()
            map_sums += (masks_t @ spatial_means).cpu()
            map_squares += (masks_t @ spatial_means.square()).cpu()

    @property
    def nbytes(self) -> int:
        if self.shape is None:
            return 0
        return sum(a.nbytes for a in (self.sums, self.map_sums, self.map_squares, self.min, self.max))


@dataclass
class LayerNap:
    """NAP results of one layer. Group axes follow ``NapResult.groups``; empty groups hold NaN."""

    name: str
    nap: np.ndarray  # [G, C, h, w] mean feature maps per group
    contrastive: np.ndarray  # [G, C, h, w] group NAP minus the mean of the group NAPs
    dead: np.ndarray  # [C] bool: constant over every image and position
    act_min: np.ndarray  # [C]
    act_max: np.ndarray  # [C]
    map_mean: np.ndarray  # [G, C] group mean of the spatially averaged map
    map_std: np.ndarray  # [G, C] its sample standard deviation within the group
    map_score: np.ndarray  # [C] mean |contrastive NAP| over groups and positions (dead maps: NaN)
    top_maps: np.ndarray  # [<=TOP_MAPS] map indices with the highest map_score
    distances: dict[str, np.ndarray]  # [G, G] per metric
    separation: np.ndarray | None  # [C] |mean_a - mean_b| / pooled std, for the separated pair
    separation_order: np.ndarray | None  # map indices, best separating first (dead maps last)

    @property
    def dead_share(self) -> float:
        return float(self.dead.mean()) if self.dead.size else 0.0


@dataclass
class NapResult:
    """NAPs of one model over one data set."""

    model: str
    architecture: str | None
    image_size: int | None
    groups: list[str]
    expressions: list[str]
    counts: np.ndarray  # [G] images per group
    images: int
    layers: dict[str, LayerNap]
    input_mean: np.ndarray  # [G, 3, H, W] mean input image per group
    input_contrast: np.ndarray  # [G, 3, H, W] minus the mean of the group means
    gradient_class: str | None = None  # class whose score weights the activations, if any
    contrast_weighted: bool = False
    separated: tuple[str, str] | None = None
    accumulator_bytes: int = 0
    extra: dict = field(default_factory=dict)


class _ModelProfiler:
    """Hooks on one model's layers and the accumulators they feed."""

    def __init__(
        self, name: str, model: nn.Module, layers: dict[str, nn.Module], groups: list[tuple[str, GroupExpr]],
        gradient_class: int | None,
    ):
        self.name, self.model, self.layers, self.groups = name, model, layers, groups
        self.gradient_class = gradient_class
        self.need_predictions = any(g.uses_predictions for _, g in groups)
        self.accumulators = {n: _LayerAccumulator(n, len(groups)) for n in layers}
        self.counts = np.zeros(len(groups), dtype=np.int64)
        self.input_sums: np.ndarray | None = None
        self.input_shape: tuple[int, ...] = ()
        self.num_classes: int | None = None
        self.images = 0
        self.captured: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.clone: set[str] = set()  # layers whose output is changed in place later in the forward
        self.handles: list = []
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def __enter__(self) -> _ModelProfiler:
        self.was_training = self.model.training
        self.model.eval()  # BatchNorm must use its running statistics, not update them
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.captured.clear()
        self.model.train(self.was_training)

    def _hook(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise CxrlensError(
                    f"layer {name} of {self.name} returns {type(output).__name__}, not a [batch, channels, ...] "
                    "tensor; choose a module that outputs feature maps"
                )
            self.calls[name] = self.calls.get(name, 0) + 1
            self.captured[name] = output
            self.versions[name] = output._version
            if name in self.clone:  # the rest of the network gets (and may overwrite) a copy
                return output.clone()
            return None

        return hook

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Logits and, when gradient-weighted, d(class logit)/d(activation) of every hooked layer."""
        grad_mode = self.gradient_class is not None
        for attempt in range(2):
            self.captured.clear()
            self.calls.clear()
            # no_grad, not inference_mode: version counters must work for the in-place check below
            with torch.enable_grad() if grad_mode else torch.no_grad():
                x = images.detach().requires_grad_(grad_mode)  # a graph even if the weights are frozen
                logits = self.model(x)
            changed = {n for n, t in self.captured.items() if t._version != self.versions[n]}
            if not changed or attempt == 1:
                break
            self.clone |= changed  # a later in-place op overwrote a captured output: hand on a copy, redo
        missing = [n for n in self.layers if n not in self.captured]
        if missing:
            raise CxrlensError(f"layer(s) {', '.join(missing)} of {self.name} did not run in the forward pass")
        repeated = [n for n, c in self.calls.items() if c > 1]
        if repeated:
            raise CxrlensError(
                f"layer(s) {', '.join(repeated)} of {self.name} run more than once per forward pass, so their "
                "feature maps are ambiguous; choose modules that run once (e.g. a whole stage)"
            )
        if self.need_predictions or grad_mode:
            self._check_logits(logits)
        if not grad_mode:
            return logits, None
        score = logits[:, self.gradient_class].sum()  # images are independent in eval mode
        grads = torch.autograd.grad(score, [self.captured[n] for n in self.layers], allow_unused=True)
        return logits.detach(), list(grads)

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or (self.num_classes is not None and logits.shape[1] != self.num_classes):
            raise CxrlensError(
                f"model {self.name} outputs shape {tuple(logits.shape)}, but the taxonomy has "
                f"{self.num_classes} classes; use a model trained on this taxonomy"
            )

    def update(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        logits, grads = self._forward(images.to(self.device))
        labels = targets.detach().cpu() > 0.5
        predictions = (torch.sigmoid(logits.float()).cpu() >= PRED_THRESHOLD) if self.need_predictions else None
        masks = torch.stack(
            [torch.as_tensor(g.evaluate(labels, predictions)).reshape(-1) for _, g in self.groups], dim=1
        ).double()
        self.counts += masks.sum(0).long().numpy()
        self.images += images.shape[0]
        with torch.no_grad():
            for i, name in enumerate(self.layers):
                act = self.captured[name]
                profiled = act
                if grads is not None:
                    grad = grads[i] if grads[i] is not None else torch.zeros_like(act)
                    profiled = act.detach() * grad
                self.accumulators[name].update(act, profiled, masks.to(act.device))
            flat = images.detach().reshape(images.shape[0], -1).double().cpu()
            if self.input_sums is None:
                self.input_shape = tuple(images.shape[1:])
                self.input_sums = np.zeros((len(self.groups), flat.shape[1]), dtype=np.float64)
            torch.from_numpy(self.input_sums).addmm_(masks.t(), flat)
        self.captured.clear()  # drop the batch's activations before the next batch

    @property
    def nbytes(self) -> int:
        extra = self.input_sums.nbytes if self.input_sums is not None else 0
        return extra + self.counts.nbytes + sum(a.nbytes for a in self.accumulators.values())


def _finish_layer(
    acc: _LayerAccumulator, counts: np.ndarray, weighted: bool, pair: tuple[int, int] | None, top_k: int
) -> LayerNap:
    g = len(counts)
    valid = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        nap = acc.sums / counts[:, None]
        nap[~valid] = np.nan
        weights = counts[valid] / counts[valid].sum() if weighted else np.full(valid.sum(), 1 / valid.sum())
        centre = weights @ nap[valid]
        contrastive = nap - centre
        map_mean = acc.map_sums / counts[:, None]
        # squared deviations from streamed sums of squares (float64 keeps the cancellation harmless)
        map_ss = np.clip(acc.map_squares - counts[:, None] * np.nan_to_num(map_mean) ** 2, 0, None)
        map_std = np.sqrt(map_ss / (counts[:, None] - 1))  # sample std; NaN for groups of < 2 images
    shape = (g, *acc.shape)
    dead = acc.max == acc.min
    channels = acc.shape[0]
    per_map = np.abs(contrastive[valid]).reshape(valid.sum(), channels, -1)
    map_score = per_map.mean(axis=(0, 2)) if valid.any() else np.full(channels, np.nan)
    map_score[dead] = np.nan
    ranked = np.argsort(np.where(np.isnan(map_score), np.inf, -map_score), kind="stable")
    top_maps = ranked[: min(top_k, int((~dead).sum()))]
    # distances between groups over the live maps
    live = np.repeat(~dead, math.prod(acc.shape[1:]))
    flat, flat_c = nap[:, live], contrastive[:, live]
    distances = {
        "euclidean": _pairwise(flat, "euclidean"),
        "cosine": _pairwise(flat, "cosine"),
        "cosine_contrastive": _pairwise(flat_c, "cosine"),
    }
    separation = order = None
    if pair is not None:
        a, b = pair
        na, nb = counts[a], counts[b]
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.sqrt((map_ss[a] + map_ss[b]) / (na + nb - 2))
            diff = np.abs(map_mean[a] - map_mean[b])
            separation = np.where(pooled > 0, diff / pooled, np.where(diff > 0, np.inf, 0.0))
        if na + nb <= 2 or na == 0 or nb == 0:
            separation = np.full(channels, np.nan)
        separation[dead] = np.nan
        order = np.argsort(np.where(np.isnan(separation), np.inf, -separation), kind="stable")
    return LayerNap(
        acc.name, nap.reshape(shape), contrastive.reshape(shape), dead, acc.min.copy(), acc.max.copy(),
        map_mean, map_std, map_score, top_maps, distances, separation, order,
    )


def _pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    """[G, G] distances between the rows of ``x`` [G, D]; rows with NaN (empty groups) give NaN."""
    if metric == "euclidean":  # from differences, not from a Gram matrix: no cancellation
        return np.stack([np.sqrt(np.einsum("jd,jd->j", diff := x - row, diff)) for row in x])
    gram = x @ x.T
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 1.0 - gram / np.outer(norms, norms)
    out[np.outer(norms, norms) == 0] = np.nan
    return out


def _class_index(name: str, classes: Sequence[str]) -> int:
    key = _norm(name)
    for i, cls in enumerate(classes):
        if _norm(cls) == key:
            return i
    raise CxrlensError(f"unknown class '{name}' for gradient weighting; the classes are: {', '.join(classes)}")


def _default_pair(group_names: list[str]) -> tuple[str, str] | None:
    if "COVID-19" in group_names and "Pneumonia without COVID-19" in group_names:
        return ("COVID-19", "Pneumonia without COVID-19")
    return tuple(group_names[:2]) if len(group_names) >= 2 else None


def compute_naps(
    models: Mapping[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classes: Sequence[str],
    *,
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    groups: GroupSpec = None,
    architectures: Mapping[str, str] | None = None,
    gradient_weighted: bool | str = False,
    contrast_weighted: bool = False,
    separate: tuple[str, str] | None = None,
    top_k: int = TOP_MAPS,
    progress: bool = True,
    total: int | None = None,
    image_size: int | None = None,
) -> dict[str, NapResult]:
    """NAPs of several models in one streaming pass over ``batches`` of (images [B,3,H,W], targets [B,K]).

    ``layers``: names for every model, a mapping model -> names, or None for the architecture's
    defaults (``architectures`` maps model name -> registry name; by default the model name itself).
    ``gradient_weighted``: False, True (the first class's score) or a class name: profile
    activation x d(class logit)/d(activation) instead of the activation (after Krug & Stober's
    GradNAPs); dead maps are still judged on the raw activations. ``separate``: two group names whose
    feature maps are ranked by |difference of means| / pooled std (default: COVID-19 vs Pneumonia
    without COVID-19, else the first two groups).
    """
    if not models:
        raise CxrlensError("no models given for NAPs")
    architectures = dict(architectures or {})
    named_groups = resolve_groups(groups, classes)
    group_names = [n for n, _ in named_groups]
    pair_names = tuple(separate) if separate is not None else _default_pair(group_names)
    if pair_names is not None:
        for n in pair_names:
            if n not in group_names:
                raise CxrlensError(f"group '{n}' to separate is not a group; the groups are: {', '.join(group_names)}")
    pair = (group_names.index(pair_names[0]), group_names.index(pair_names[1])) if pair_names else None
    grad_class = None
    if gradient_weighted is True:
        grad_class = 0
    elif isinstance(gradient_weighted, str) and gradient_weighted:
        grad_class = _class_index(gradient_weighted, classes)
    profilers = []
    for name, model in models.items():
        arch = architectures.get(name, name)
        wanted = layers.get(name) if isinstance(layers, Mapping) else layers
        profiler = _ModelProfiler(name, model, resolve_layers(model, wanted, arch), named_groups, grad_class)
        profiler.num_classes = len(classes)
        profilers.append(profiler)
    bar = tqdm(total=total, unit="img", desc=f"NAP {', '.join(models)}", disable=not progress, leave=False)
    try:
        for p in profilers:
            p.__enter__()
        for images, targets in batches:
            for p in profilers:
                p.update(images, targets)
            bar.update(images.shape[0])
    finally:
        for p in profilers:
            p.__exit__(None, None, None)
        bar.close()
    results = {}
    for p in profilers:
        if p.images == 0:
            raise CxrlensError("no images to profile; check the manifest or split is not empty")
        counts = p.counts.astype(np.float64)
        if not (counts > 0).any():
            raise CxrlensError(f"every group is empty over the {p.images} images; check the group expressions")
        layer_results = {
            n: _finish_layer(a, counts, contrast_weighted, pair, top_k) for n, a in p.accumulators.items()
        }
        valid = counts > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            input_mean = p.input_sums / counts[:, None]
        input_mean[~valid] = np.nan
        weights = counts[valid] / counts[valid].sum() if contrast_weighted else np.full(valid.sum(), 1 / valid.sum())
        input_contrast = input_mean - weights @ input_mean[valid]
        shape = (len(counts), *p.input_shape)
        results[p.name] = NapResult(
            model=p.name, architecture=architectures.get(p.name, p.name if p.name in MODELS else None),
            image_size=image_size, groups=group_names, expressions=[g.text for _, g in named_groups],
            counts=p.counts.copy(), images=p.images, layers=layer_results,
            input_mean=input_mean.reshape(shape), input_contrast=input_contrast.reshape(shape),
            gradient_class=classes[grad_class] if grad_class is not None else None,
            contrast_weighted=contrast_weighted, separated=pair_names, accumulator_bytes=p.nbytes,
        )
    return results


# --- pictures ------------------------------------------------------------------------------------

def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _as_image(a: np.ndarray) -> np.ndarray:
    """A per-map array [h, w] or [L] (or [1, 1]) as something imshow draws."""
    return a if a.ndim == 2 else a.reshape(1, -1)


def _mosaic(cells: list[list[np.ndarray]]) -> tuple[np.ndarray, list[float], list[float]]:
    """Tile equally shaped 2-D cells into one array with NaN gaps (one imshow is far faster than a
    subplot per cell); returns the array and the cell centres along x and y for tick labels."""
    h, w = cells[0][0].shape
    gap = max(1, round(max(h, w) / 10))
    rows, cols = len(cells), len(cells[0])
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = cell
    xs = [c * (w + gap) + (w - 1) / 2 for c in range(cols)]
    ys = [r * (h + gap) + (h - 1) / 2 for r in range(rows)]
    return out, xs, ys


def _bwr():
    import matplotlib

    return matplotlib.colormaps["bwr"].with_extremes(bad="#d9d9d9")  # grey gaps between cells


def plot_layer_grid(result: NapResult, layer: str) -> bytes:
    """Groups x top feature maps of contrastive NAPs, 'bwr' with symmetric limits per map (PNG).

    Each column (map) is scaled by its own largest |value| over the groups, so white is the mean of
    the groups and full red / blue is that map's extreme; the limits are written under the columns."""
    from matplotlib.figure import Figure

    nap = result.layers[layer]
    rows = [i for i, c in enumerate(result.counts) if c > 0]
    cols = list(nap.top_maps)
    fig = Figure(figsize=(1.1 * max(len(cols), 1) + 2.4, 1.1 * len(rows) + 1.4))
    ax = fig.add_axes((0.2, 0.14, 0.78, 0.7))
    weighted = f", activation x d({result.gradient_class})/d act" if result.gradient_class else ""
    fig.suptitle(
        f"{result.model} {layer}: contrastive NAPs, top {len(cols)} maps by mean |contrast|{weighted}\n"
        f"(blue < mean of groups < red, symmetric limits per map; {nap.dead.sum()}/{nap.dead.size} maps dead)",
        fontsize=8,
    )
    if not cols or not rows:
        ax.text(0.5, 0.5, "no live feature map", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _figure_png(fig)
    limits = []
    for m in cols:
        column = np.abs(nap.contrastive[rows, m])
        limit = float(np.nanmax(column)) if np.isfinite(column).any() else 0.0
        limits.append(limit if limit > 0 else 1.0)
    cells = [[_as_image(nap.contrastive[g, m]) / lim for m, lim in zip(cols, limits, strict=True)] for g in rows]
    mosaic, xs, ys = _mosaic(cells)
    ax.imshow(mosaic, cmap=_bwr(), vmin=-1, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xticks(xs, [f"map {m}\n±{lim:.2g}" for m, lim in zip(cols, limits, strict=True)], fontsize=7)
    ax.set_yticks(ys, [f"{result.groups[g]}\n(n={result.counts[g]})" for g in rows], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _figure_png(fig)


def plot_inputs(result: NapResult) -> bytes:
    """Mean input image per group (grey) and its contrast to the mean of the groups ('bwr') (PNG)."""
    from matplotlib.figure import Figure

    cols = [i for i, c in enumerate(result.counts) if c > 0]
    means = result.input_mean[cols].mean(axis=1)  # over colour channels (grey images repeated x3)
    contrast = result.input_contrast[cols].mean(axis=1)
    limit = float(np.nanmax(np.abs(contrast))) or 1.0
    fig = Figure(figsize=(2.0 * len(cols) + 1.0, 4.6))
    fig.suptitle(f"{result.model}: mean input per group and its difference to the mean of the groups", fontsize=8)
    labels = [f"{result.groups[g]} (n={result.counts[g]})" for g in cols]
    for row, (images, cmap, vmin, vmax, name) in enumerate((
        (means, "gray", float(np.nanmin(means)), float(np.nanmax(means)), "mean input"),
        (contrast, _bwr(), -limit, limit, f"contrast\n(±{limit:.2g})"),
    )):
        ax = fig.add_axes((0.1, 0.5 - 0.43 * row, 0.88, 0.38))
        mosaic, xs, ys = _mosaic([list(images)])
        ax.imshow(mosaic, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks(xs, labels if row == 0 else [""] * len(xs), fontsize=7)
        ax.xaxis.set_ticks_position("top")
        ax.set_yticks(ys, [name], fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    return _figure_png(fig)


def plot_dead_shares(results: Mapping[str, NapResult]) -> bytes:
    """Bars of the share of dead feature maps per layer, one colour per model (PNG)."""
    from matplotlib.figure import Figure

    total = sum(len(r.layers) for r in results.values())
    fig = Figure(figsize=(max(4.0, 0.45 * total + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    x, ticks = 0, []
    for k, (name, result) in enumerate(results.items()):
        shares = [nap.dead_share * 100 for nap in result.layers.values()]
        positions = np.arange(x, x + len(shares))
        ax.bar(positions, shares, color=f"C{k % 10}", label=name)
        ticks += list(zip(positions, result.layers, strict=True))
        x += len(shares) + 1
    ax.set_xticks([p for p, _ in ticks], [n for _, n in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("dead feature maps (%)")
    ax.set_ylim(0, max(5.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7)
    ax.set_title("Feature maps constant over every image", fontsize=9)
    return _figure_png(fig)


# --- files ---------------------------------------------------------------------------------------

def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _jsonable(value):
    """Arrays and numpy scalars as lists and numbers; NaN as null, infinities as "inf" / "-inf"."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):  # strict JSON: NaN -> null, infinities as strings
        return float(value) if math.isfinite(value) else (None if math.isnan(value) else str(float(value)))
    return value


def result_stats(result: NapResult, top: int = 20) -> dict:
    """The JSON summary of one model: group sizes, dead maps, top maps, distances, separation."""
    layers = {}
    for name, nap in result.layers.items():
        entry = {
            "shape": list(nap.nap.shape[1:]),
            "dead_maps": int(nap.dead.sum()),
            "dead_share": nap.dead_share,
            "dead_indices": np.flatnonzero(nap.dead),
            "top_maps": [{"map": int(m), "mean_abs_contrastive": nap.map_score[m]} for m in nap.top_maps],
            "distances": {"groups": result.groups, **nap.distances},
        }
        if nap.separation is not None and result.separated is not None:
            a, b = (result.groups.index(n) for n in result.separated)
            entry["separation"] = {
                "groups": list(result.separated),
                "score": "|mean_a - mean_b| / pooled std of the spatially averaged map",
                "top": [
                    {
                        "map": int(m), "score": nap.separation[m],
                        "mean_a": nap.map_mean[a, m], "mean_b": nap.map_mean[b, m],
                        "std_a": nap.map_std[a, m], "std_b": nap.map_std[b, m],
                    }
                    for m in nap.separation_order[:top] if not np.isnan(nap.separation[m])
                ],
            }
        layers[name] = entry
    return _jsonable({
        "architecture": result.architecture,
        "image_size": result.image_size,
        "images": result.images,
        "groups": [
            {"name": n, "expression": e, "images": int(c)}
            for n, e, c in zip(result.groups, result.expressions, result.counts, strict=True)
        ],
        "empty_groups": [n for n, c in zip(result.groups, result.counts, strict=True) if c == 0],
        "gradient_weighted_by": result.gradient_class,
        "contrast": "weighted by group size" if result.contrast_weighted else "unweighted mean of group NAPs",
        "layers": layers,
    })


def result_arrays(result: NapResult) -> dict[str, np.ndarray]:
    """The arrays of ``nap_<model>.npz``; per-layer keys are '<layer>/<what>' (NAPs stored as float32)."""
    arrays: dict[str, np.ndarray] = {
        "groups": np.array(result.groups),
        "expressions": np.array(result.expressions),
        "counts": result.counts,
        "layers": np.array(list(result.layers)),
        "input_mean": result.input_mean.astype(np.float32),
        "input_contrast": result.input_contrast.astype(np.float32),
    }
    for name, nap in result.layers.items():
        arrays[f"{name}/nap"] = nap.nap.astype(np.float32)
        arrays[f"{name}/contrastive"] = nap.contrastive.astype(np.float32)
        arrays[f"{name}/dead"] = nap.dead
        arrays[f"{name}/min"] = nap.act_min
        arrays[f"{name}/max"] = nap.act_max
        arrays[f"{name}/map_mean"] = nap.map_mean
        arrays[f"{name}/map_std"] = nap.map_std
        arrays[f"{name}/map_score"] = nap.map_score
        arrays[f"{name}/top_maps"] = nap.top_maps
        for metric, matrix in nap.distances.items():
            arrays[f"{name}/distance_{metric}"] = matrix
        if nap.separation is not None:
            arrays[f"{name}/separation"] = nap.separation
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from cxrlens.runs import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _collect_models(
    runs, image_size: int | None, classes: Sequence[str]
) -> list[tuple[str, nn.Module, str | None, int]]:
    """(name, model, architecture, image size) for LoadedRuns or a mapping name -> model."""
    from cxrlens.runs import LoadedRun

    if isinstance(runs, LoadedRun):
        runs = [runs]
    out, seen = [], set()
    if isinstance(runs, Mapping):
        for name, model in runs.items():
            if not isinstance(model, nn.Module):
                raise CxrlensError(f"model '{name}' is a {type(model).__name__}, not a torch module")
            out.append((str(name), model, str(name) if str(name) in MODELS else None, image_size or 224))
        return out
    for run in runs:
        if not isinstance(run, LoadedRun):
            raise CxrlensError(f"expected runs loaded with load_run, got {type(run).__name__}")
        if tuple(run.taxonomy.classes) != tuple(classes):
            raise CxrlensError(
                f"run {run.run_dir} predicts {', '.join(run.taxonomy.classes)} but the data's taxonomy has "
                f"{', '.join(classes)}; load the data with the run's taxonomy"
            )
        name, k = run.name, 2
        while name in seen:  # two runs with the same folder name
            name, k = f"{run.name}_{k}", k + 1
        seen.add(name)
        out.append((name, run.model, run.config.model, image_size or run.config.image_size))
    if not out:
        raise CxrlensError("no runs given for NAPs")
    return out


def run_nap(
    runs,
    manifest,
    out_dir: str | Path,
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    groups: GroupSpec = None,
    batch_size: int = 16,
    gradient_weighted: bool | str = False,
    progress: bool = True,
    *,
    image_size: int | None = None,
    contrast_weighted: bool = False,
    separate: tuple[str, str] | None = None,
    num_workers: int = 0,
    figures: bool = True,
) -> dict:
    """Neuron Activation Profiles of one or more models over a data set, written to ``out_dir``.

    Args:
        runs: a list of ``LoadedRun`` (from ``load_run``; each uses its own image size and
            architecture), or a mapping name -> ``nn.Module`` (a registry name such as "resnet18" gets
            that architecture's default layers; images are ``image_size`` px, default 224).
        manifest: the images (``load_manifest(...)``, e.g. ``.split("test")``); its taxonomy must be
            the runs' taxonomy.
        out_dir: folder for the outputs (created).
        layers: module names to profile (for every model, or a mapping model -> names); default
            ``MODELS[arch].nap_layers``, the stages after each down-sampling. Unknown names raise
            ``CxrlensError`` listing valid ones.
        groups: None / "study" (COVID-19; Pneumonia; Pneumonia without COVID-19; Healthy), "errors"
            (correct / incorrect prediction per class at 0.5), a mapping name -> expression, or a
            list of expressions / "name=expression" strings. Expressions combine class names with
            ``&``, ``|``, ``~`` and parentheses; ``pred:NAME`` is the model's prediction.
        batch_size: images per forward pass.
        gradient_weighted: False, True (score of the first class, COVID-19 for cxr3) or a class
            name: profile activation x gradient of that class's logit (GradNAPs).
        progress: show a tqdm bar over the images.
        image_size: override every model's input size.
        contrast_weighted: centre contrastive NAPs on the group-size-weighted mean instead of the
            unweighted mean of the group NAPs (the study's).
        separate: two group names whose maps are ranked by |difference of means| / pooled std of
            the spatially averaged map (default: COVID-19 vs Pneumonia without COVID-19).
        num_workers: DataLoader workers for decoding images.
        figures: write the PNG figures.

    Writes (each atomically: temporary file + rename):
        ``nap_<model>.npz``: group NAPs, contrastive NAPs (float32, [groups, C, h, w] per layer, keys
        '<layer>/nap', '<layer>/contrastive'), dead maps, min/max, map statistics, distances,
        separation scores, mean inputs; ``nap_stats.json``: per model the group sizes, dead-map
        shares, top maps, group distance matrices and separation rankings;
        ``nap_<model>_<layer>.png`` (groups x top-10 maps), ``nap_<model>_inputs.png``,
        ``nap_dead_maps.png``.

    One pass over the images per distinct image size feeds every model of that size; memory does
    not grow with the number of images.

    Returns:
        {"out_dir": str, "files": [paths], "stats": the JSON dict, "results": {model: NapResult}}.
    """
    from torch.utils.data import DataLoader

    from cxrlens.data import XrayDataset
    from cxrlens.runs import atomic_write_bytes, atomic_write_text

    if batch_size < 1:
        raise CxrlensError(f"batch size must be at least 1, not {batch_size}")
    classes = tuple(manifest.taxonomy.classes)
    if len(manifest) == 0:
        raise CxrlensError("the manifest holds no images; check the data folder and split")
    entries = _collect_models(runs, image_size, classes)
    resolve_groups(groups, classes)  # fail on a bad expression before any image is read
    for name, model, arch, _ in entries:  # and on a bad layer name
        resolve_layers(model, layers.get(name) if isinstance(layers, Mapping) else layers, arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, NapResult] = {}
    for size in dict.fromkeys(e[3] for e in entries):
        members = [e for e in entries if e[3] == size]
        dataset = XrayDataset(manifest, size, cache=False)  # no cache: memory stays flat
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        results.update(compute_naps(
            {n: m for n, m, _, _ in members}, loader, classes, layers=layers, groups=groups,
            architectures={n: a for n, _, a, _ in members if a is not None},
            gradient_weighted=gradient_weighted, contrast_weighted=contrast_weighted, separate=separate,
            progress=progress, total=len(dataset), image_size=size,
        ))
    results = {e[0]: results[e[0]] for e in entries}  # keep the given order
    files: list[str] = []
    stats = {"models": {}, "classes": list(classes), "files": files}
    for name, result in results.items():
        safe = _safe_name(name)
        path = out / f"nap_{safe}.npz"
        _write_npz(path, result_arrays(result))
        files.append(str(path))
        stats["models"][name] = result_stats(result)
        if figures:
            for layer in result.layers:
                path = out / f"nap_{safe}_{_safe_name(layer)}.png"
                atomic_write_bytes(path, plot_layer_grid(result, layer))
                files.append(str(path))
            path = out / f"nap_{safe}_inputs.png"
            atomic_write_bytes(path, plot_inputs(result))
            files.append(str(path))
    if figures:
        path = out / "nap_dead_maps.png"
        atomic_write_bytes(path, plot_dead_shares(results))
        files.append(str(path))
    stats_path = out / "nap_stats.json"
    files.append(str(stats_path))
    atomic_write_text(stats_path, json.dumps(stats, indent=1, allow_nan=False))
    return {"out_dir": str(out), "files": files, "stats": stats, "results": results}


def dead_share_lines(stats: dict) -> list[str]:
    """One line per model of a ``nap_stats.json`` dict: its share of dead feature maps per layer."""
    return [
        f"{name}: dead feature maps per layer: "
        + ", ".join(f"{layer} {entry['dead_share']:.0%}" for layer, entry in model["layers"].items())
        for name, model in stats["models"].items()
    ]
