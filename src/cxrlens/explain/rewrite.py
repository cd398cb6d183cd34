"""Rewrite a model into a form that hook-based attribution methods can explain correctly.

DeepLIFT and Guided Backprop change the backward pass of every nonlinear module (ReLU, max-pool).
That only works when (a) every nonlinearity is a module (``F.relu(x)`` in a forward is invisible to
module hooks), (b) every such module runs exactly once per forward pass (torchvision's ResNet
blocks call one ``self.relu`` twice, so the reference activations a DeepLIFT hook stores would be
overwritten), and (c) no operation modifies a tensor in place (hooks keep the tensors they saw).

``make_explainable(model, example)`` returns a copy that satisfies (a)-(c):

* each submodule whose code we can trace with ``torch.fx`` (children kept as opaque leaves, so the
  module tree and its names such as ``layer4`` stay as they are) gets a regenerated ``forward``:
  functional activations and max-pools become modules, a second call of the same activation module
  gets its own copy, in-place ops (``x += y``, ``x.relu_()``, ``inplace=True``) become out-of-place;
* modules whose code cannot be traced (data-dependent control flow) are fixed at module level:
  ``inplace`` flags are switched off, and an activation module they call several times is
  replaced by a :class:`CallSiteSplit` that hands each call to its own copy;
* finally a hook-based audit runs the copy on the example input and the copy's outputs are compared
  with the original's; anything left over raises :class:`RewriteError`.

The copy is in eval mode, its parameters do not require gradients, and Python-level branches on
``self.training`` were fixed at trace time: it is meant for explaining, not for training.

``explainable(model, example)`` (what ``attribute`` calls) makes the copy once per model and keeps it
until the model's modules or weights change, so only the first explanation pays for the rewrite.
"""

from __future__ import annotations

import copy
import itertools
import operator
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cxrlens.errors import CxrlensError
from cxrlens.models import ACTIVATION_TYPES

MAXPOOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# The modules whose backward attribution rules replace; each must run once per forward pass.
HOOKED_TYPES = ACTIVATION_TYPES + MAXPOOL_TYPES

_EXPLAINABLE_FLAG = "_cxrlens_explainable"


class RewriteError(CxrlensError):
    """The model could not be brought into an explainable form (or the rewrite changed its outputs)."""


def is_explainable(model: nn.Module) -> bool:
    """True for a model returned by :func:`make_explainable`."""
    return bool(getattr(model, _EXPLAINABLE_FLAG, False))


# --- functional nonlinearities -> modules --------------------------------------------------------

def _const(value: Any) -> bool:
    """True when an fx argument is a plain Python value (not a traced tensor)."""
    return not isinstance(value, fx.Node) and not (
        isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value)
    )


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Arguments after the input tensor by name; None when one of them is not a constant."""
    values = dict(defaults)
    for name, value in zip(names, node.args[1:], strict=False):
        values[name] = value
    for name, value in node.kwargs.items():
        values[name] = value
    if not all(_const(v) for v in values.values()):
        return None
    return values


def _maxpool(cls: type[nn.Module], node: fx.Node) -> nn.Module | None:
    values = _bind(
        node,
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False},
    )
    if values is None or values["return_indices"] or "kernel_size" not in values:
        return None
    stride = values["stride"] if values["stride"] not in (None, [], ()) else None
    return cls(values["kernel_size"], stride, values["padding"], values["dilation"], ceil_mode=values["ceil_mode"])


def _adaptive_maxpool(cls: type[nn.Module], node: fx.Node) -> nn.Module | None:
    values = _bind(node, ("output_size", "return_indices"), {"return_indices": False})
    if values is None or values["return_indices"] or "output_size" not in values:
        return None
    return cls(values["output_size"])


def _simple(cls: type[nn.Module], names: tuple[str, ...] = (), defaults: dict | None = None,
            drop: tuple[str, ...] = ("inplace",)) -> Callable[[fx.Node], nn.Module | None]:
    def build(node: fx.Node) -> nn.Module | None:
        values = _bind(node, names + drop, dict(defaults or {}))
        if values is None:
            return None
        for name in drop:
            values.pop(name, None)
        return cls(**values)

    return build


_RELU = _simple(nn.ReLU)
_SIGMOID = _simple(nn.Sigmoid, drop=())
_TANH = _simple(nn.Tanh, drop=())
_FUNCTION_TO_MODULE: dict[Any, Callable[[fx.Node], nn.Module | None]] = {
    F.relu: _RELU,
    F.relu_: _RELU,
    torch.relu: _RELU,
    torch.relu_: _RELU,
    F.relu6: _simple(nn.ReLU6),
    F.hardtanh: _simple(nn.Hardtanh, ("min_val", "max_val")),
    F.leaky_relu: _simple(nn.LeakyReLU, ("negative_slope",)),
    F.elu: _simple(nn.ELU, ("alpha",)),
    F.gelu: _simple(nn.GELU, (), drop=()),
    F.silu: _simple(nn.SiLU),
    F.softplus: _simple(nn.Softplus, ("beta", "threshold"), drop=()),
    torch.sigmoid: _SIGMOID,
    F.sigmoid: _SIGMOID,
    torch.tanh: _TANH,
    F.tanh: _TANH,
    F.max_pool1d: lambda n: _maxpool(nn.MaxPool1d, n),
    F.max_pool2d: lambda n: _maxpool(nn.MaxPool2d, n),
    F.max_pool3d: lambda n: _maxpool(nn.MaxPool3d, n),
    torch.max_pool2d: lambda n: _maxpool(nn.MaxPool2d, n),
    F.adaptive_max_pool1d: lambda n: _adaptive_maxpool(nn.AdaptiveMaxPool1d, n),
    F.adaptive_max_pool2d: lambda n: _adaptive_maxpool(nn.AdaptiveMaxPool2d, n),
    F.adaptive_max_pool3d: lambda n: _adaptive_maxpool(nn.AdaptiveMaxPool3d, n),
}
_METHOD_TO_MODULE: dict[str, Callable[[fx.Node], nn.Module | None]] = {
    "relu": _RELU,
    "relu_": _RELU,
    "sigmoid": _SIGMOID,
    "sigmoid_": _SIGMOID,
    "tanh": _TANH,
    "tanh_": _TANH,
}
_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
_NOT_INPLACE_METHODS = {"requires_grad_", "share_memory_", "retain_grad_", "record_stream_"}
# Names (as seen by __torch_function__) of functions that compute a nonlinearity; the audit flags
# them when they run outside a module of the hooked types.
_NONLINEAR_NAMES = {
    "relu", "relu6", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "softplus",
    "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
}


def _inplace_method(name: str) -> str | None:
    """The out-of-place twin of a Tensor method such as ``add_``, if there is one."""
    if name.endswith("_") and not name.startswith("_") and name not in _NOT_INPLACE_METHODS:
        if hasattr(torch.Tensor, name[:-1]):
            return name[:-1]
    return None


# --- per-module fx rewrite -----------------------------------------------------------------------

class _ChildrenAsLeaves(fx.Tracer):
    """Traces only the root module's own code; every child module is one opaque call."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def _is_torch_builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.") and not isinstance(module, nn.Sequential)


def _fresh_name(module: nn.Module, base: str) -> str:
    base = base.replace(".", "_") or "act"
    k = 1
    while hasattr(module, f"{base}_{k}"):
        k += 1
    return f"{base}_{k}"


def _rewrite_graph(module: nn.Module, graph: fx.Graph, seen: set[int]) -> int:
    """Rewrite ``graph`` (traced from ``module``) in place; return the number of changes.

    ``seen`` holds the ids of hooked modules already called from some traced graph: a second call
    site of the same module object gets a deep copy of it.
    """
    changes = 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == "call_module":
            target = module.get_submodule(node.target)
            if getattr(target, "inplace", False):
                target.inplace = False
            if isinstance(target, HOOKED_TYPES):
                if id(target) in seen:  # the same module object at a second call site
                    name = _fresh_name(module, str(node.target))
                    module.add_module(name, copy.deepcopy(target))
                    node.target = name
                    changes += 1
                else:
                    seen.add(id(target))
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        inplace_base = None
        builder = None
        if node.op == "call_function":
            builder = _FUNCTION_TO_MODULE.get(node.target)
            if node.target in _INPLACE_OPERATORS:
                node.target = _INPLACE_OPERATORS[node.target]
                inplace_base, changes = node.args[0], changes + 1
            elif node.target in (F.relu_, torch.relu_) or node.kwargs.get("inplace", False) is True:
                inplace_base = node.args[0] if node.args else None
        else:
            builder = _METHOD_TO_MODULE.get(node.target)
            twin = _inplace_method(str(node.target))
            if twin is not None:
                inplace_base = node.args[0]
                if builder is None:
                    node.target = twin
                    changes += 1
        if builder is not None and node.args and isinstance(node.args[0], fx.Node):
            new_module = builder(node)
            if new_module is not None:
                name = _fresh_name(module, getattr(node.target, "__name__", str(node.target)).strip("_"))
                module.add_module(name, new_module)
                seen.add(id(new_module))
                node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0],), {}
                changes += 1
        if node.op != "call_module" and node.kwargs.get("inplace", False) is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            changes += 1
        if isinstance(inplace_base, fx.Node):
            # Later readers of the mutated tensor must now read this node's (out-of-place) result.
            position = order[node]
            inplace_base.replace_all_uses_with(
                node, delete_user_cb=lambda user, p=position: order.get(user, -1) > p
            )
    return changes


def _patch_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Give ``module`` the forward generated from ``graph``, keeping the module's class and attributes."""
    graph_module = fx.GraphModule(module, graph)
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                operator.attrgetter(node.target)(module)
            except AttributeError:  # a constant the tracer created (e.g. a captured tensor)
                setattr(module, node.target, operator.attrgetter(node.target)(graph_module))
    module.forward = types.MethodType(type(graph_module).forward, module)


def _trace_and_patch(model: nn.Module) -> dict[str, str]:
    """Rewrite every traceable module; return {module name: reason} for those left as they were."""
    untraced: dict[str, str] = {}
    seen: set[int] = set()
    for name, module in list(model.named_modules()):
        if getattr(module, "inplace", False):
            module.inplace = False
        if _is_torch_builtin(module) or isinstance(module, HOOKED_TYPES):
            continue  # a hooked module's own code is the nonlinearity itself
        try:
            graph = _ChildrenAsLeaves(module).trace(module)
        except Exception as exc:  # data-dependent control flow etc.: fixed at module level instead
            untraced[name or "<root>"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        _rewrite_graph(module, graph, seen)
        graph.lint()
        # Always patch: the traced code is out-of-place even where the source used ``x += y``.
        _patch_forward(module, graph)
    return untraced


# --- module-level fallback: split reused activation modules by call order ------------------------

class CallSiteSplit(nn.Module):
    """Stands in for an activation module called at several sites of untraceable code.

    The k-th call within one forward pass goes to its own copy ``copies[k]``, so hooks see one
    module per call site. The counter is reset by a pre-hook on the root model.
    """

    def __init__(self, module: nn.Module, n_calls: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(n_calls))
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= len(self.copies):
            raise RewriteError(
                f"activation module was called more than the {len(self.copies)} times seen when the "
                "model was rewritten (input-dependent control flow); this model cannot be explained "
                "with DeepLIFT or Guided Backprop"
            )
        module = self.copies[self.calls]
        self.calls += 1
        return module(*args, **kwargs)


def _reset_call_sites(model: nn.Module, args: Any) -> None:
    for module in model.modules():
        if isinstance(module, CallSiteSplit):
            module.calls = 0


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


# --- audit -----------------------------------------------------------------------------------

@contextmanager
def _module_stack(model: nn.Module) -> Iterator[tuple[list[nn.Module], dict[int, int], dict[int, str]]]:
    stack: list[nn.Module] = []
    counts: dict[int, int] = {}
    names: dict[int, str] = {}

    def push(module: nn.Module, args: Any) -> None:
        stack.append(module)
        if isinstance(module, HOOKED_TYPES):
            counts[id(module)] = counts.get(id(module), 0) + 1

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        names.setdefault(id(module), name or "<root>")
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    try:
        yield stack, counts, names
    finally:
        for handle in handles:
            handle.remove()


class _HazardMode(TorchFunctionMode):
    """Records functional nonlinearities and in-place ops on differentiable tensors."""

    def __init__(self, stack: list[nn.Module], names: dict[int, str]) -> None:
        super().__init__()
        self.stack, self.names = stack, names
        self.hazards: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.requires_grad:
            name = getattr(func, "__name__", str(func))
            where = self.names.get(id(self.stack[-1]), "?") if self.stack else "<root>"
            inside_hooked = bool(self.stack) and isinstance(self.stack[-1], HOOKED_TYPES)
            if name.strip("_") in _NONLINEAR_NAMES and not inside_hooked:
                self.hazards.append(f"functional {name} in '{where}'")
            elif (
                name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__")
                or _inplace_method(name) is not None
                or kwargs.get("inplace") is True
            ):
                self.hazards.append(f"in-place {name} in '{where}'")
        return func(*args, **kwargs)


def _audit(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, int], Any]:
    with _module_stack(model) as (stack, counts, names), torch.enable_grad():
        mode = _HazardMode(stack, names)
        x = example.detach().clone().requires_grad_(True)
        with mode:
            output = model(x)
    reused = {names[i]: n for i, n in counts.items() if n > 1}
    return sorted(set(mode.hazards)), reused, output


def find_hazards(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """Run ``model`` once and list what breaks hook-based attribution.

    Returns (hazards, reused) where hazards are readable lines (functional nonlinearities outside a
    module, in-place ops on tensors that need gradients) and ``reused`` maps the names of hooked
    modules called more than once to their call counts.
    """
    hazards, reused, _ = _audit(model, example)
    return hazards, reused


# --- public entry point ----------------------------------------------------------------------------

def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _restore_modes(model: nn.Module, modes: list[bool]) -> None:
    for module, training in zip(model.modules(), modes, strict=True):
        module.training = training


def make_explainable(
    model: nn.Module,
    example: torch.Tensor | None = None,
    *,
    strict: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> nn.Module:
    """Return an explainable copy of ``model`` (see the module docstring); ``model`` is not changed.

    The copy is a new module tree whose parameters and buffers share storage with the original
    (nothing is cloned); if the original is trained further, make a new copy.

    ``example`` is an input batch used to audit the copy and to check it computes the same outputs
    as the original (default: one random 224x224 RGB image). With ``strict`` a hazard that could not
    be rewritten (e.g. a functional ReLU in untraceable code) raises :class:`RewriteError`; otherwise
    it is a warning. Outputs that differ by more than ``atol + rtol*|output|`` always raise.
    """
    if is_explainable(model):
        return model
    if example is None:
        example = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    device = next((p.device for p in model.parameters()), example.device)
    example = example.to(device)
    # A new module tree over the same weights: new Parameter objects (without gradients: attribution
    # needs input gradients only) that share storage with the original's, and shared buffers. This
    # saves the time and memory of cloning e.g. DenseNet161's 29M parameters.
    memo: dict[int, Any] = {id(b): b for b in model.buffers()}
    memo.update({id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()})
    explainable = copy.deepcopy(model, memo).eval()
    untraced = _trace_and_patch(explainable)

    hazards, reused, actual = _audit(explainable, example)
    if reused:  # activation modules called repeatedly from untraceable code
        by_name = dict(explainable.named_modules())
        for name, n_calls in reused.items():
            _replace_module(explainable, by_name[name], CallSiteSplit(by_name[name], n_calls))
        explainable.register_forward_pre_hook(_reset_call_sites)
        hazards, reused, actual = _audit(explainable, example)
        hazards += [f"module '{name}' runs {n} times per forward" for name, n in reused.items()]
    if hazards:
        detail = "; ".join(hazards[:5]) + (f" (and {len(hazards) - 5} more)" if len(hazards) > 5 else "")
        if untraced:
            detail += "; untraceable modules: " + ", ".join(f"{k} ({v})" for k, v in list(untraced.items())[:3])
        message = f"cannot make {type(model).__name__} explainable: {detail}"
        if strict:
            raise RewriteError(message + "; use methods without hooks (saliency, occlusion, IG, Grad-CAM)")
        warnings.warn(message, stacklevel=2)

    modes = _modes(model)
    try:
        model.eval()
        with torch.no_grad():
            expected = model(example)
    finally:
        _restore_modes(model, modes)
    if not isinstance(expected, torch.Tensor) or not isinstance(actual, torch.Tensor):
        raise RewriteError(
            f"{type(model).__name__} must return one tensor of logits, got {type(expected).__name__}"
        )
    actual = actual.detach() if isinstance(actual, torch.Tensor) else actual
    if expected.shape != actual.shape or not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        error = (actual - expected).abs().max().item() if expected.shape == actual.shape else float("nan")
        raise RewriteError(
            f"rewriting {type(model).__name__} for explanation changed its outputs (max abs difference "
            f"{error:.3g}); this model cannot be explained with hook-based methods"
        )
    setattr(explainable, _EXPLAINABLE_FLAG, True)
    return explainable


# --- cached rewrite ---------------------------------------------------------------------------------

_REWRITTEN: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module, example: torch.Tensor) -> tuple:
    """What the rewrite depends on: the module tree, each parameter and buffer (object, storage, version, dtype,
    device, shape: a training step, ``load_state_dict``, ``.to()`` or a swapped parameter changes it) and the
    example's shape, dtype and device."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (
        tuple(id(m) for m in model.modules()),
        tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors),
        (tuple(example.shape[1:]), example.dtype, example.device),
    )


def explainable(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """:func:`make_explainable` once per model: later calls get the same copy until the model's modules or
    weights change (then it is rewritten again). An explainable model is returned as it is."""
    if is_explainable(model):
        return model
    key = _state_key(model, example)
    cached = _REWRITTEN.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    rewritten = make_explainable(model, example)
    _REWRITTEN[model] = (_state_key(model, example), rewritten)
    return rewritten
