"""Incremental inference for occlusion: recompute every layer only where an occluded window reaches it.

Occluding a window changes a CNN's feature maps only inside the window's projective field, which
grows by each layer's kernel and shrinks with its stride (Nakandala et al., "Incremental and
Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019: "Krypton").
The model is traced with ``torch.fx`` into a graph of operations (torch.nn's own modules stay whole;
a module whose code cannot be traced becomes one opaque operation). One pass on the unoccluded image
stores every node's output; a batch of occluded images is then run node by node, each node in one of
three modes:

* ``const``: it does not depend on the image (parameters, shape checks): its stored value;
* ``box``: its output differs from the stored one only inside a box around the window, the same size
  for every window of the sweep (so a batch is one tensor) and clamped into the map. Convolutions and
  pooling compute their box from a window of their input: the stored input with the input's box
  pasted in, filled with the layer's own padding value outside the map, run without padding.
  Elementwise operations, batch norm (eval) and channel concatenations work on the union of their
  inputs' boxes (DenseNet's concatenations, Inception's branches, residual additions);
* ``dense``: full maps, as a plain forward pass computes them. A node goes dense when its box would
  cover more than a chosen share of its map, or when its operation is global or unknown (pooling to
  1x1, linear layers, squeeze-excitation, anything not known to be local): the full maps are rebuilt
  once (stored map plus box) and everything after it runs as usual.

Exactness: outside a node's box its output is its stored value (the same inputs, so the same values);
inside, the same operation runs on the same numbers, only on a crop, so the results agree with a full
pass up to float summation order. :mod:`cxrlens.explain.occlusion` checks this against full passes on
probe windows before a sweep and falls back to full passes otherwise.

Approximate mode (Krypton's projective-field thresholding): a box may grow to at most ``threshold``
of its map's side; changes beyond it are dropped. It never goes dense before a global operation.

Which nodes go dense is chosen by a cost model (multiply-adds of convolutions and linear layers plus
the elements copied and computed elementwise) over a few candidate shares, so the incremental part
reaches as deep as it pays.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cxrlens.models import ACTIVATION_TYPES

DENSE_SHARES = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # candidate box shares beyond which a node goes dense
COPY_COST = 24.0  # multiply-add equivalents per element copied into a window (measured: ~0.5 ns vs ~0.02 ns)
ELEMENTWISE_COST = 4.0  # per element of an elementwise operation or a pooling window
SAFE_ATTRIBUTES = {"ndim", "dtype", "device", "is_cuda", "layout", "is_floating_point"}

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = ACTIVATION_TYPES + (
    nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
)
# Elementwise functions and methods, by their out-of-place form (in-place ones would change stored maps).
_POINTWISE_FUNCTIONS: dict[Any, Any] = {
    operator.add: operator.add, operator.iadd: operator.add, operator.sub: operator.sub,
    operator.isub: operator.sub, operator.mul: operator.mul, operator.imul: operator.mul,
    operator.truediv: operator.truediv, operator.itruediv: operator.truediv, operator.neg: operator.neg,
    torch.add: torch.add, torch.sub: torch.sub, torch.mul: torch.mul, torch.div: torch.div,
    torch.relu: torch.relu, torch.relu_: torch.relu, F.relu: F.relu, F.relu_: F.relu, F.relu6: F.relu6,
    F.leaky_relu: F.leaky_relu, F.hardtanh: F.hardtanh, F.gelu: F.gelu, F.silu: F.silu, F.elu: F.elu,
    torch.sigmoid: torch.sigmoid, F.sigmoid: torch.sigmoid, torch.tanh: torch.tanh, F.tanh: torch.tanh,
    torch.clamp: torch.clamp, F.hardswish: F.hardswish, F.mish: F.mish,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max",
    "contiguous", "add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "tanh_", "clamp_", "clamp_min_",
    "clamp_max_",
}
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu}
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_DROPOUT_ARGS = ("input", "p", "training", "inplace")


# --- tracing ---------------------------------------------------------------------------------------

def _is_torch_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn") and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class _Tracer(fx.Tracer):
    """torch.nn's modules stay whole; a module whose code cannot be traced becomes one opaque node."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_torch_leaf(m) or module_qualified_name in self.opaque

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        stack, calls = self.module_stack.copy(), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - data-dependent code: keep the module whole
            name = self.path_of_module(m)
            if not name or name in self.opaque:
                raise
            self.module_stack, self.num_calls = stack, calls
            self.opaque[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """The model as an fx graph (eval-mode branches), and {module name: why it is opaque}."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph)
    _redirect_inplace(gm)
    return gm, tracer.opaque


def _mutates_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    name = str(node.target)
    return node.op == "call_method" and name.endswith("_") and not name.startswith("_")


def _redirect_inplace(gm: fx.GraphModule) -> None:
    """Nodes are run out-of-place (stored maps are shared), so a later reader of a tensor that an in-place
    operation changed reads that operation's result instead, as it would in the eager model."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.args and isinstance(node.args[0], fx.Node) and _mutates_input(node, gm):
            position = order[node]
            node.args[0].replace_all_uses_with(node, delete_user_cb=lambda user, p=position: order.get(user, -1) > p)


# --- operations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """A local operation: output pixel o reads input pixels o * stride - padding + [0, kernel) per axis
    (kernel including dilation). ``call`` runs it without padding on a window filled with ``fill``
    outside the map; ``exclude_pad``: average pooling that does not count padding."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    fill: float
    call: Callable[[torch.Tensor], torch.Tensor]
    exclude_pad: bool = False
    macs_per_output: float = 0.0  # per output element


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    values = dict(defaults)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _conv_window(m: nn.Conv2d) -> Window | None:
    if m.padding_mode != "zeros":
        return None
    kernel = tuple(d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation, strict=True))
    if m.padding == "valid":
        padding = (0, 0)
    elif m.padding == "same":
        if any((k - 1) % 2 for k in kernel):
            return None
        padding = tuple((k - 1) // 2 for k in kernel)
    else:
        padding = _pair(m.padding)
    weight, bias, stride, dilation, groups = m.weight, m.bias, m.stride, m.dilation, m.groups
    macs = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    return Window(kernel, _pair(stride), padding, 0.0,  # type: ignore[arg-type]
                  lambda x: F.conv2d(x, weight, bias, stride, 0, dilation, groups), macs_per_output=macs)


def _max_pool_window(kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> Window:
    k, s, p, d = _pair(kernel_size), _pair(stride or kernel_size), _pair(padding), _pair(dilation)
    kernel = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    return Window(kernel, s, p, -math.inf, lambda x: F.max_pool2d(x, k, s, 0, d),
                  macs_per_output=ELEMENTWISE_COST * k[0] * k[1] / 4)


def _avg_pool_window(kernel_size: Any, stride: Any, padding: Any, ceil_mode: bool, count_include_pad: bool,
                     divisor_override: Any) -> Window | None:
    if ceil_mode or divisor_override is not None:
        return None
    k, s, p = _pair(kernel_size), _pair(stride or kernel_size), _pair(padding)
    return Window(k, s, p, 0.0, lambda x: F.avg_pool2d(x, k, s, 0), exclude_pad=not count_include_pad and any(p),
                  macs_per_output=ELEMENTWISE_COST * k[0] * k[1] / 4)


def window_of(node: fx.Node, module: nn.Module | None) -> Window | None:
    """The local operation a node runs, or None."""
    if module is not None:
        if type(module) is nn.Conv2d:
            return _conv_window(module)
        if type(module) is nn.MaxPool2d and not module.return_indices:
            return _max_pool_window(module.kernel_size, module.stride, module.padding, module.dilation)
        if type(module) is nn.AvgPool2d:
            return _avg_pool_window(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                    module.count_include_pad, module.divisor_override)
        return None
    if node.op != "call_function" or any(isinstance(a, fx.Node) for a in node.args[1:]) or any(
            isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    if node.target in (F.max_pool2d, torch.max_pool2d):
        v = _bind(node, _MAX_POOL_ARGS, {"stride": None, "padding": 0, "dilation": 1, "return_indices": False})
        return None if v["return_indices"] else _max_pool_window(v["kernel_size"], v["stride"], v["padding"],
                                                                 v["dilation"])
    if node.target in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        v = _bind(node, _AVG_POOL_ARGS, {"stride": None, "padding": 0, "ceil_mode": False,
                                         "count_include_pad": True, "divisor_override": None})
        return _avg_pool_window(v["kernel_size"], v["stride"], v["padding"], v["ceil_mode"],
                                v["count_include_pad"], v["divisor_override"])
    return None


def is_pointwise(node: fx.Node, module: nn.Module | None) -> bool:
    """Elementwise (per pixel) operations, whose output box is the union of their inputs' boxes."""
    if module is not None:
        return isinstance(module, _POINTWISE_MODULES) and not (module.training and isinstance(
            module, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)))
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    if node.op != "call_function":
        return False
    if node.target is F.batch_norm:
        return _bind(node, _BATCH_NORM_ARGS, {"training": False})["training"] is False
    if node.target is F.dropout:
        return _bind(node, _DROPOUT_ARGS, {"training": True})["training"] is False
    return node.target in _POINTWISE_FUNCTIONS


def _is_channel_cat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (1, -3)


def call_node(node: fx.Node, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    """Run one node on concrete values, with in-place operations made out-of-place (stored maps are shared)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "inplace", False) and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])
        return module(*args, **kwargs)
    if node.op == "call_function":
        target = _INPLACE_FUNCTIONS.get(node.target, node.target)
        if kwargs.get("inplace") is True:
            kwargs = {**kwargs, "inplace": False}
        return target(*args, **kwargs)
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            name = name[:-1]
        return getattr(args[0], name)(*args[1:], **kwargs)
    raise RuntimeError(f"cannot call node {node.op}")


# --- geometry --------------------------------------------------------------------------------------

@dataclass
class Boxes:
    """One box per window: top-left corners ``rows``/``cols`` [P] and one size (h, w) on an (H, W) map.
    (For planning, ``rows`` and ``cols`` may instead hold the distinct values of each, of other lengths.)"""

    rows: np.ndarray
    cols: np.ndarray
    h: int
    w: int

    def same(self, other: Boxes) -> bool:
        return (self is other or (self.h == other.h and self.w == other.w and np.array_equal(self.rows, other.rows)
                                  and np.array_equal(self.cols, other.cols)))


def _place(lo: np.ndarray, hi: np.ndarray, extent: int, size: int | None, cap: int | None) -> tuple[np.ndarray, int]:
    """Boxes of one size covering [lo, hi) (clipped to the map) for every window, inside [0, extent)."""
    lo, hi = np.clip(lo, 0, extent), np.clip(hi, 0, extent)
    if size is None:
        size = int(max(1, (hi - lo).max())) if len(lo) else 1
        if cap is not None:
            size = min(size, cap)
    size = min(size, extent)
    if cap is not None:  # approximate: a box centred on what changed
        return np.clip((lo + hi - size) // 2, 0, extent - size), size
    return np.clip(lo, 0, extent - size), size


def through(window: Window, box: Boxes, out_hw: tuple[int, int], size: tuple[int, int] | None = None,
            cap: tuple[int, int] | None = None) -> Boxes:
    """The output boxes of a local operation whose input changed inside ``box``."""
    starts, sizes = [], []
    for axis, (a, length) in enumerate(((box.rows, box.h), (box.cols, box.w))):
        k, s, p = window.kernel[axis], window.stride[axis], window.padding[axis]
        lo = -((-(a + p - k + 1)) // s)  # first output whose input span reaches the box
        hi = (a + length - 1 + p) // s + 1
        start, n = _place(lo, hi, out_hw[axis], None if size is None else size[axis],
                          None if cap is None else cap[axis])
        starts.append(start)
        sizes.append(n)
    return Boxes(starts[0], starts[1], sizes[0], sizes[1])


def union(boxes: list[Boxes], hw: tuple[int, int], size: tuple[int, int] | None = None,
          cap: tuple[int, int] | None = None) -> Boxes:
    """One box per window covering all of ``boxes`` (the inputs of an elementwise op or a concatenation)."""
    if all(b.same(boxes[0]) for b in boxes[1:]):
        return boxes[0]
    rows_lo = np.min([b.rows for b in boxes], 0)
    rows_hi = np.max([b.rows + b.h for b in boxes], 0)
    cols_lo = np.min([b.cols for b in boxes], 0)
    cols_hi = np.max([b.cols + b.w for b in boxes], 0)
    rows, h = _place(rows_lo, rows_hi, hw[0], None if size is None else size[0], None if cap is None else cap[0])
    cols, w = _place(cols_lo, cols_hi, hw[1], None if size is None else size[1], None if cap is None else cap[1])
    return Boxes(rows, cols, h, w)


# --- the plan ---------------------------------------------------------------------------------------

CONST, BOX, DENSE = "const", "box", "dense"


@dataclass
class Step:
    """How one node runs in a sweep."""

    node: fx.Node
    mode: str
    kind: str = "generic"  # input, window, pointwise, cat, attribute, generic, output
    module: nn.Module | None = None
    window: Window | None = None
    size: tuple[int, int] | None = None  # box size (BOX mode)
    hw: tuple[int, int] | None = None  # map size
    box_inputs: tuple[fx.Node, ...] = ()  # inputs in BOX mode


@dataclass
class Plan:
    """The nodes of a traced model with their modes, and the modelled cost against full passes."""

    gm: fx.GraphModule
    steps: list[Step]
    cost: float  # relative to full passes
    last_box: str | None  # the last node computed on boxes (a module name where there is one)
    box_convs: int  # convolutions computed on boxes
    convs: int
    share: float | None  # the share beyond which nodes go dense (None: approximate)
    threshold: float | None = None  # approximate: the largest box side share
    stored: set[fx.Node] = field(default_factory=set)  # nodes whose unoccluded outputs are gathered from


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def module_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return str(list(stack.values())[-1][0])
    return node.name


def _classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str, nn.Module | None, Window | None]:
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if node.op == "placeholder":
        return "input", None, None
    if node.op == "output":
        return "output", None, None
    window = window_of(node, module)
    if window is not None:
        return "window", module, window
    if is_pointwise(node, module):
        return "pointwise", module, None
    if _is_channel_cat(node):
        return "cat", None, None
    if node.op == "call_function" and node.target is getattr and node.args[1] in SAFE_ATTRIBUTES:
        return "attribute", None, None
    return "generic", module, None


def _spatial(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _elements(value: Any) -> int:
    return value[0].numel() if isinstance(value, torch.Tensor) and value.dim() >= 1 else 0


class _Coster:
    """Modelled work per window, in multiply-add equivalents."""

    def __init__(self) -> None:
        self.full = 0.0
        self.planned = 0.0

    def add(self, step_kind: str, window: Window | None, module: nn.Module | None, value: Any,
            box_elements: float | None, copied: float) -> None:
        if step_kind == "window" and window is not None:
            per = window.macs_per_output
        elif isinstance(module, nn.Linear):
            per = module.in_features
        elif step_kind in ("pointwise", "cat", "generic"):
            per = ELEMENTWISE_COST
        else:
            per = 0.0
        whole = _elements(value) * per
        self.full += whole
        self.planned += (whole if box_elements is None else box_elements * per) + COPY_COST * copied


class _Planner:
    """Walks the graph once, deciding each node's mode and box (see :func:`plan`)."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, Any], share: float | None,
                 cap_share: float | None) -> None:
        self.gm, self.shapes, self.share, self.cap_share = gm, shapes, share, cap_share
        self.modes: dict[fx.Node, str] = {}
        self.boxes: dict[fx.Node, Boxes] = {}
        self.stored: set[fx.Node] = set()
        self.coster = _Coster()

    def _cap(self, hw: tuple[int, int] | None) -> tuple[int, int] | None:
        if self.cap_share is None or hw is None:
            return None
        return max(1, math.ceil(self.cap_share * hw[0])), max(1, math.ceil(self.cap_share * hw[1]))

    def _box(self, step: Step, inputs: list[fx.Node]) -> tuple[Boxes | None, float, set[fx.Node]]:
        """The node's box if it can run on one (before the dense share), the elements copied into windows and
        the inputs gathered from."""
        hw, window, shapes = step.hw, step.window, self.shapes
        if step.kind == "window" and len(step.box_inputs) == 1 and inputs == [step.box_inputs[0]]:
            source = step.box_inputs[0]
            box = through(window, self.boxes[source], hw, cap=self._cap(hw))  # type: ignore[arg-type]
            in_h = (box.h - 1) * window.stride[0] + window.kernel[0]  # type: ignore[union-attr]
            in_w = (box.w - 1) * window.stride[1] + window.kernel[1]  # type: ignore[union-attr]
            channels = _elements(shapes[source]) / max(1, math.prod(shapes[source].shape[-2:]))
            return box, in_h * in_w * channels, {source}
        local_inputs = all(_spatial(shapes[n]) and tuple(shapes[n].shape[-2:]) == hw for n in step.box_inputs)
        spatial_constants = any(_spatial(shapes[n]) and self.modes[n] == CONST for n in inputs)
        if step.kind in ("pointwise", "cat") and local_inputs and not spatial_constants:
            box = union([self.boxes[n] for n in step.box_inputs], hw, cap=self._cap(hw))  # type: ignore[arg-type]
            gathered = {n for n in step.box_inputs if not self.boxes[n].same(box)}
            copied = sum(box.h * box.w * _elements(shapes[n]) / math.prod(hw) for n in gathered)  # type: ignore[arg-type]
            return box, copied, gathered
        return None, 0.0, set()

    def step(self, node: fx.Node) -> Step:
        kind, module, window = _classify(node, self.gm)
        value = self.shapes.get(node)
        inputs = _flat_nodes((node.args, node.kwargs))
        input_modes = {self.modes[n] for n in inputs}
        hw = tuple(value.shape[-2:]) if _spatial(value) else None
        step = Step(node, DENSE, kind, module, window, hw=hw,  # type: ignore[arg-type]
                    box_inputs=tuple(n for n in inputs if self.modes[n] == BOX))
        box, copied, gathered = None, 0.0, set()
        if kind == "input":
            step.mode, box = BOX, self.input_boxes
        elif node.op == "get_attr" or kind == "attribute" or (kind != "output" and input_modes <= {CONST}):
            step.mode = CONST
        elif kind != "output" and DENSE not in input_modes and hw is not None:
            box, copied, gathered = self._box(step, inputs)
            too_big = box is not None and self.cap_share is None and box.h * box.w > self.share * hw[0] * hw[1]
            if box is not None and ((box.h, box.w) == hw or too_big):  # nothing left to save, or not enough
                box, copied, gathered = None, 0.0, set()
        if box is not None:
            step.mode, step.size = BOX, (box.h, box.w)
            self.boxes[node] = box
        elif step.mode == DENSE:  # inputs on boxes are rebuilt as full maps
            gathered = set(step.box_inputs)
            copied = sum(_elements(self.shapes[n]) for n in gathered)
        self.stored |= gathered
        self.modes[node] = step.mode
        box_elements = {CONST: 0.0, DENSE: None}.get(step.mode)
        if step.mode == BOX and value is not None:
            box_elements = _elements(value) * box.h * box.w / math.prod(hw)  # type: ignore[union-attr, arg-type]
        self.coster.add(kind, window, module, value, box_elements, copied)
        return step

    def run(self, input_boxes: Boxes) -> Plan:
        self.input_boxes = input_boxes
        steps = [self.step(node) for node in self.gm.graph.nodes]
        on_boxes = [s for s in steps if s.mode == BOX and s.kind != "input"]
        return Plan(self.gm, steps, self.coster.planned / max(self.coster.full, 1.0),
                    module_name(on_boxes[-1].node) if on_boxes else None,
                    sum(isinstance(s.module, nn.Conv2d) for s in on_boxes),
                    sum(isinstance(s.module, nn.Conv2d) for s in steps),
                    self.share if self.cap_share is None else None, self.cap_share, self.stored)


def _plan_once(gm: fx.GraphModule, shapes: dict[fx.Node, Any], input_boxes: Boxes, share: float | None,
               cap_share: float | None) -> Plan:
    """Modes and box sizes for every node, for windows whose input boxes are ``input_boxes``."""
    return _Planner(gm, shapes, share, cap_share).run(input_boxes)


def plan(gm: fx.GraphModule, shapes: dict[fx.Node, Any], input_boxes: Boxes, threshold: float | None = None,
         shares: tuple[float, ...] = DENSE_SHARES) -> Plan:
    """The cheapest plan for these windows over the candidate dense ``shares``; ``threshold``: approximate,
    boxes capped at that share of a side."""
    if threshold is not None:
        return _plan_once(gm, shapes, input_boxes, None, threshold)
    return min((_plan_once(gm, shapes, input_boxes, share, None) for share in shares), key=lambda p: p.cost)


def input_boxes(windows: list[tuple[int, int]], size: tuple[int, int], hw: tuple[int, int],
                per_axis: bool = False) -> Boxes:
    """The occluded windows as boxes on the image (a window sticking out is moved in: it covers the same
    pixels). ``per_axis``: only the distinct rows and columns, enough for planning, as every box's rows
    depend on its window's row only (and columns on its column)."""
    rows = np.array([w[0] for w in windows], dtype=np.int64)
    cols = np.array([w[1] for w in windows], dtype=np.int64)
    if per_axis:
        rows, cols = np.unique(rows), np.unique(cols)
    h, w = min(size[0], hw[0]), min(size[1], hw[1])
    return Boxes(np.clip(rows, 0, hw[0] - h), np.clip(cols, 0, hw[1] - w), h, w)


# --- running ------------------------------------------------------------------------------------

@dataclass
class _Boxed:
    """A node's output in a batch: ``patch`` [N, C, h, w] at ``box`` over the stored map."""

    patch: torch.Tensor
    box: Boxes


def gather(stored: torch.Tensor, boxed: _Boxed | None, box: Boxes, fill: float = 0.0) -> torch.Tensor:
    """The maps [N, C, h, w] inside ``box`` (may reach outside the map, filled with ``fill`` there): the
    stored map [1, C, H, W] with ``boxed`` pasted in."""
    if boxed is not None and boxed.box.same(box):
        return boxed.patch
    big_h, big_w = stored.shape[-2:]
    n = len(box.rows)
    rows, cols = box.rows.tolist(), box.cols.tolist()
    outside = min(rows) < 0 or min(cols) < 0 or max(rows) + box.h > big_h or max(cols) + box.w > big_w
    shape = (n, stored.shape[1], box.h, box.w)
    out = stored.new_full(shape, fill) if outside else stored.new_empty(shape)
    if boxed is not None:
        prow, pcol = boxed.box.rows.tolist(), boxed.box.cols.tolist()
        ph, pw = boxed.box.h, boxed.box.w
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        r0, r1, c0, c1 = max(r, 0), min(r + box.h, big_h), max(c, 0), min(c + box.w, big_w)
        out[i, :, r0 - r: r1 - r, c0 - c: c1 - c] = stored[0, :, r0:r1, c0:c1]
        if boxed is not None:
            a0, a1 = max(r0, prow[i]), min(r1, prow[i] + ph)
            b0, b1 = max(c0, pcol[i]), min(c1, pcol[i] + pw)
            if a0 < a1 and b0 < b1:
                out[i, :, a0 - r: a1 - r, b0 - c: b1 - c] = boxed.patch[i, :, a0 - prow[i]: a1 - prow[i],
                                                                           b0 - pcol[i]: b1 - pcol[i]]
    return out


def _full_box(n: int, hw: tuple[int, int]) -> Boxes:
    zeros = np.zeros(n, dtype=np.int64)
    return Boxes(zeros, zeros, hw[0], hw[1])


class Sweep:
    """Runs batches of occluded copies of one image through a :class:`Plan`.

    ``stored``: the unoccluded image's node outputs (see :func:`store`); ``image`` [1, C, H, W] and
    ``base`` [1, C, H, W] the image and its occlusion baseline; ``context``: autocast or nothing."""

    def __init__(self, plan: Plan, stored: dict[fx.Node, Any], image: torch.Tensor, base: torch.Tensor,
                 window_size: tuple[int, int], context: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.plan, self.stored, self.image, self.base = plan, stored, image, base
        self.window_size, self.context = window_size, context
        last_reader: dict[fx.Node, fx.Node] = {}
        for step in plan.steps:
            for source in step.node.all_input_nodes:
                last_reader[source] = step.node
        self.frees: dict[fx.Node, list[fx.Node]] = {}
        for source, reader in last_reader.items():
            self.frees.setdefault(reader, []).append(source)

    def _boxes(self, windows: list[tuple[int, int]]) -> dict[fx.Node, Boxes]:
        """Every BOX node's boxes for these windows, at the plan's sizes."""
        result: dict[fx.Node, Boxes] = {}
        for step in self.plan.steps:
            if step.mode != BOX:
                continue
            cap = None
            if self.plan.threshold is not None:
                cap = step.size
            if step.kind == "input":
                result[step.node] = input_boxes(windows, self.window_size, step.hw)  # type: ignore[arg-type]
            elif step.kind == "window":
                result[step.node] = through(step.window, result[step.box_inputs[0]], step.hw,  # type: ignore[arg-type]
                                            step.size, cap)
            else:
                result[step.node] = union([result[n] for n in step.box_inputs], step.hw, step.size,  # type: ignore[arg-type]
                                          cap)
        return result

    def _input_patch(self, windows: list[tuple[int, int]], box: Boxes) -> torch.Tensor:
        """The occluded image inside each box."""
        patch = gather(self.image, None, box)
        wh, ww = self.window_size
        for i, (y0, x0) in enumerate(windows):
            r, c = int(box.rows[i]), int(box.cols[i])
            top, left = max(y0, r), max(x0, c)
            bottom, right = min(y0 + wh, r + box.h), min(x0 + ww, c + box.w)
            patch[i, :, top - r: bottom - r, left - c: right - c] = self.base[0, :, top:bottom, left:right]
        return patch

    def run(self, windows: list[tuple[int, int]]) -> Any:
        """The model's output for the image with each window occluded (one batch)."""
        boxes = self._boxes(windows)
        values: dict[fx.Node, Any] = {}
        full: dict[fx.Node, torch.Tensor] = {}  # BOX nodes rebuilt as full maps, once for all readers
        gm, n = self.plan.gm, len(windows)

        def dense(node: fx.Node) -> Any:
            value = values[node]
            if not isinstance(value, _Boxed):
                return value
            if node not in full:
                full[node] = gather(self.stored[node], value, _full_box(n, self.stored[node].shape[-2:]))
            return full[node]

        def local(source: fx.Node, box: Boxes) -> Any:
            value = values[source]
            if not isinstance(value, _Boxed):
                return value
            return value.patch if value.box.same(box) else gather(self.stored[source], value, box)

        with self.context():
            for step in self.plan.steps:
                node = step.node
                if step.mode == CONST:
                    values[node] = self.stored[node]
                elif step.mode == DENSE:
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), dense)
                    if step.kind == "output":
                        return args[0]
                    values[node] = call_node(node, gm, args, kwargs)
                elif step.kind == "input":
                    values[node] = _Boxed(self._input_patch(windows, boxes[node]), boxes[node])
                elif step.kind == "window":
                    values[node] = _Boxed(self._window(step, values, boxes[node]), boxes[node])
                else:
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda s, b=boxes[node]: local(s, b))
                    values[node] = _Boxed(call_node(node, gm, args, kwargs), boxes[node])
                for source in self.frees.get(node, ()):  # what no later node reads: memory is reused
                    values.pop(source, None)
                    full.pop(source, None)
        raise RuntimeError("the traced graph has no output")

    def _window(self, step: Step, values: dict[fx.Node, Any], box: Boxes) -> torch.Tensor:
        window = step.window
        source = step.box_inputs[0]
        (kh, kw), (sh, sw), (ph, pw) = window.kernel, window.stride, window.padding  # type: ignore[union-attr]
        in_box = Boxes(box.rows * sh - ph, box.cols * sw - pw, (box.h - 1) * sh + kh, (box.w - 1) * sw + kw)
        stored = self.stored[source]
        x = gather(stored, values[source], in_box, window.fill)  # type: ignore[union-attr]
        out = window.call(x)  # type: ignore[union-attr]
        if window.exclude_pad:  # type: ignore[union-attr]
            ones = stored.new_ones(1, 1, *stored.shape[-2:])
            out = out / window.call(gather(ones, None, in_box, 0.0))  # type: ignore[union-attr]
        if tuple(out.shape[-2:]) != (box.h, box.w):
            raise RuntimeError(f"incremental occlusion at '{module_name(step.node)}': output "
                               f"{list(out.shape[-2:])} on a window, expected {[box.h, box.w]}")
        return out


def store(gm: fx.GraphModule, image: torch.Tensor, keep: Callable[[fx.Node], bool],
          context: Callable[[], AbstractContextManager] = nullcontext,
          transform: Callable[[Any], Any] | None = None) -> tuple[dict[fx.Node, Any], Any]:
    """One pass on ``image`` [1, C, H, W]: the outputs of the nodes ``keep`` asks for (through ``transform``),
    and the model output."""
    values: dict[fx.Node, Any] = {}
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            last_use[source] = node
    kept: dict[fx.Node, Any] = {}
    with context():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = image
            elif node.op == "get_attr":
                value = _attribute(gm, str(node.target))
            elif node.op == "output":
                return kept, fx.node.map_arg(node.args[0], lambda n: values[n])
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                value = call_node(node, gm, args, kwargs)
            values[node] = value
            if keep(node):
                kept[node] = value if transform is None else transform(value)
            for source in node.all_input_nodes:  # free what no later node reads
                if last_use.get(source) is node:
                    values.pop(source, None)
    raise RuntimeError("the traced graph has no output")


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def shapes_of(gm: fx.GraphModule, image: torch.Tensor,
              context: Callable[[], AbstractContextManager] = nullcontext) -> dict[fx.Node, Any]:
    """Every node's output on ``image`` as a meta tensor of the same shape (or the value, if not a tensor)."""
    def meta(value: Any) -> Any:
        return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value

    kept, _ = store(gm, image, lambda node: True, context, meta)
    return kept

