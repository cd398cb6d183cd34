"""Model registry: the five CNNs of the study, built by timm, made explanation-safe.

Every model is created without downloading anything; pretrained weights come from a local file
(``load_weights``). All models return plain logits of shape [batch, classes] from ``model(x)``;
InceptionV3's auxiliary head is run only by the training step (``forward_with_aux``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.inception_v3 import InceptionAux
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.registry import Registry

AUX_LOSS_WEIGHT = 0.4  # the study's (and torchvision's) weight of InceptionV3's auxiliary loss


class AdaptiveInceptionAux(InceptionAux):
    """timm's InceptionV3 auxiliary head, made to work for inputs smaller than 299 px.

    The original pools 17x17 maps with a fixed 5x5/3 window down to 5x5; for smaller inputs we pool
    adaptively to 5x5 instead, so the parameters (and pretrained weights) stay the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) >= 17:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)
        else:
            x = F.adaptive_avg_pool2d(x, 5)
        x = self.conv1(self.conv0(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# Activation modules: what ``activation_call_counts`` counts and what hook-based attribution rules replace
# (cxrlens.explain.rewrite and .rules read this list).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
_AUX_HEAD_ATTR = "_cxrlens_aux_head"  # set by create_model on models whose spec has an auxiliary head


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: how to build it and the facts the rest of cxrlens needs about it."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> the network with fresh weights, returning logits
    gradcam_layer: str  # last convolutional stage, default target of Grad-CAM
    nap_layers: tuple[str, ...]  # the stages after each down-sampling (the study's NAP layers)
    min_size: int = 32  # smallest input side the network accepts
    input_size: int = 224  # the side it was designed for (and its ImageNet weights trained at)
    demo_epochs: int = 3  # epochs `cxrlens demo` trains it for (its share of a ~10-minute CPU budget)
    aux_head: str | None = None  # submodule of an auxiliary classifier, trained with AUX_LOSS_WEIGHT


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str,
    *,
    gradcam_layer: str,
    nap_layers: Sequence[str],
    min_size: int = 32,
    input_size: int = 224,
    demo_epochs: int = 3,
    aux_head: str | None = None,
) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    """Register the decorated builder ``build(num_classes) -> nn.Module`` as architecture ``name``
    (as timm's ``@register_model``), with its facts (see :class:`ModelSpec`).

    A model with an ``aux_head`` must also offer timm's InceptionV3 split ``forward_preaux``,
    ``forward_postaux`` and ``forward_head`` so the training step can run the head.
    """
    def decorator(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        MODELS.add(name, ModelSpec(name, build, gradcam_layer, tuple(nap_layers), min_size, input_size, demo_epochs,
                                   aux_head))
        return build

    return decorator


def _timm(timm_name: str, num_classes: int, **kwargs: object) -> nn.Module:
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)


RESNET_STAGES = ("maxpool", "layer1", "layer2", "layer3", "layer4")
# demo_epochs: chosen so all five train in about 10 minutes on 2 CPU cores at the demo size (DenseNet161 and
# InceptionResNetV2 are 4-6x slower per image than ResNet18).


@register_model("resnet18", gradcam_layer="layer4", nap_layers=RESNET_STAGES, demo_epochs=8)
def resnet18(num_classes: int) -> nn.Module:
    return _timm("resnet18", num_classes)


@register_model("resnet34", gradcam_layer="layer4", nap_layers=RESNET_STAGES, demo_epochs=5)
def resnet34(num_classes: int) -> nn.Module:
    return _timm("resnet34", num_classes)


@register_model(
    "inception_v3",
    gradcam_layer="Mixed_7c",
    nap_layers=("Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_6a", "Mixed_7a", "Mixed_7b", "Mixed_7c"),
    min_size=75,
    input_size=299,
    demo_epochs=5,
    aux_head="AuxLogits",
)
def inception_v3(num_classes: int) -> nn.Module:
    model = _timm("inception_v3", num_classes, aux_logits=True)
    model.AuxLogits.__class__ = AdaptiveInceptionAux
    model.aux_logits = False  # model(x) returns logits only; the training step runs the aux head
    return model


@register_model(
    "inception_resnet_v2",
    gradcam_layer="conv2d_7b",
    nap_layers=("maxpool_3a", "maxpool_5a", "mixed_5b", "mixed_6a", "mixed_7a", "conv2d_7b"),
    min_size=75,
    input_size=299,
    demo_epochs=3,
)
def inception_resnet_v2(num_classes: int) -> nn.Module:
    return _timm("inception_resnet_v2", num_classes)


@register_model(
    "densenet161",
    gradcam_layer="features.norm5",
    nap_layers=(
        "features.denseblock1.denselayer1.norm1",
        "features.denseblock2.denselayer1.norm1",
        "features.denseblock3.denselayer1.norm1",
        "features.denseblock4.denselayer1.norm1",
        "features.norm5",
    ),
    demo_epochs=3,
)
def densenet161(num_classes: int) -> nn.Module:
    return _timm("densenet161", num_classes)


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    return MODELS.lookup(name)


def make_explanation_safe(model: nn.Module) -> nn.Module:
    """Turn every in-place activation out-of-place.

    In-place ReLUs overwrite the tensors that DeepLIFT and Guided Backprop hooks need.
    (timm's five architectures apply each activation module once; ``activation_call_counts``
    lets a test check that.)
    """
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


def create_model(name: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """Build a registered architecture with ``num_classes`` sigmoid outputs, from scratch.

    ``weights`` is an optional local .safetensors or .pth file (e.g. ImageNet weights); its
    classifier is dropped when its shape does not fit.
    """
    spec = get_spec(name)
    model = spec.build(num_classes)
    if spec.aux_head is not None:
        setattr(model, _AUX_HEAD_ATTR, spec.aux_head)
    make_explanation_safe(model)
    if weights is not None:
        load_weights(model, weights)
    return model


def aux_head_name(model: nn.Module) -> str | None:
    """The auxiliary classifier's submodule name of a model built by ``create_model``, if it has one."""
    return getattr(model, _AUX_HEAD_ATTR, None)


def forward_with_aux(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and, for a model with an auxiliary head (InceptionV3) in training mode, the auxiliary logits."""
    name = aux_head_name(model)
    if name is None or not model.training:
        return model(x), None
    features = model.forward_preaux(x)
    aux = model.get_submodule(name)(features)
    features = model.forward_postaux(features)
    return model.forward_head(features), aux


# --- weights -------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors or .pth/.pt/.bin file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CxrlensError(f"weights file not found: {path}; pass the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or unsafe file
        raise CxrlensError(
            f"cannot read weights from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
            "it must be a .safetensors file or a .pth holding only tensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrlensError(f"{path} does not hold a state dict of tensors")
    return state


_PREFIXES = ("module.", "model.", "net.", "backbone.", "_orig_mod.")
_HEAD_ALIASES = {"classifier.": "fc.", "last_linear.": "classif.", "head.fc.": "fc."}


def remap_keys(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DDP, Lightning) and map classifier names between torchvision and timm."""
    out = {}
    for key, value in state.items():
        new = key
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if new.startswith(prefix) and new not in target_keys:
                    new, changed = new[len(prefix) :], True
        if new not in target_keys:
            for old, replacement in _HEAD_ALIASES.items():
                if new.startswith(old) and replacement + new[len(old) :] in target_keys:
                    new = replacement + new[len(old) :]
        out[new] = value
    return out


def load_weights(model: nn.Module, path: str | Path, strict_head: bool = False) -> list[str]:
    """Load local weights into ``model``; return the names of parameters left at initialisation.

    Keys are remapped (prefixes, classifier names). Classifier tensors whose shape differs (e.g. an
    ImageNet head of 1000 classes) are skipped unless ``strict_head``. Anything else that does not
    fit is an error, because it means the file belongs to another architecture.
    """
    target = model.state_dict()
    state = remap_keys(read_state_dict(path), set(target))
    head_names = _classifier_names(model)
    loadable, skipped_head = {}, []
    for key, value in state.items():
        if key not in target:
            continue
        if target[key].shape != value.shape:
            if key.rsplit(".", 1)[0] in head_names and not strict_head:
                skipped_head.append(key)
                continue
            raise CxrlensError(
                f"{path}: tensor '{key}' has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target[key].shape)}; the file is for another architecture or class count"
            )
        loadable[key] = value
    aux = aux_head_name(model)
    backbone_keys = [k for k in target if k.rsplit(".", 1)[0] not in head_names
                     and (aux is None or not k.startswith(f"{aux}."))]
    matched = sum(k in loadable for k in backbone_keys)
    if matched < 0.9 * len(backbone_keys):
        raise CxrlensError(
            f"{path}: only {matched} of {len(backbone_keys)} backbone tensors match this model; "
            "check --model matches the architecture the weights were trained for"
        )
    model.load_state_dict(loadable, strict=False)
    return sorted(set(target) - set(loadable))


def _classifier_names(model: nn.Module) -> set[str]:
    names = set()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    aux = aux_head_name(model)
    for name, module in model.named_modules():  # the main classifier and the auxiliary head's linear layers
        if module is classifier or (aux is not None and name.startswith(f"{aux}.") and isinstance(module, nn.Linear)):
            names.add(name)
    return names


def activation_call_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each activation module runs in one forward pass (should be 1 for every module)."""
    counts: dict[str, int] = {}

    def counter(name: str) -> Callable:
        def hook(module, args, output):
            counts[name] = counts.get(name, 0) + 1

        return hook

    handles = [
        module.register_forward_hook(counter(name))
        for name, module in model.named_modules()
        if isinstance(module, ACTIVATION_TYPES)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts
