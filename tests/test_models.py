"""Model registry: five architectures, any input size, InceptionV3's aux head, explanation safety,
local weights (safetensors, .pth with weights_only) and their clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from cxrlens.errors import CxrlensError
from cxrlens.models import MODELS, activation_call_counts, create_model, forward_with_aux, load_weights


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_is_explanation_safe_and_sized_freely(name):
    torch.manual_seed(0)
    model = create_model(name, 3).eval()
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)], "in-place op left"
    size = MODELS[name].min_size + 5  # an odd size: adaptive pooling must cope
    x = torch.rand(1, 3, size, size)
    counts = activation_call_counts(model, x)
    assert counts and max(counts.values()) == 1, {k: v for k, v in counts.items() if v > 1}
    relus = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU) and not n.startswith("AuxLogits")]
    assert sorted(counts) == sorted(relus)  # every ReLU module runs once (the aux head only in training)
    assert model(x).shape == (1, 3)
    for layer in (*MODELS[name].nap_layers, MODELS[name].gradcam_layer):
        assert layer in dict(model.named_modules())


def test_inception_aux_head_in_training_only():
    model = create_model("inception_v3", 3)
    x = torch.rand(2, 3, 96, 96)  # far below 299 px: the adaptive aux head still works
    model.train()
    logits, aux = forward_with_aux(model, x)
    assert logits.shape == aux.shape == (2, 3)
    model.eval()
    logits, aux = forward_with_aux(model, x)
    assert aux is None and torch.allclose(logits, model(x))


def test_safetensors_and_pth_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18", 3).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    x = torch.rand(1, 3, 64, 64)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        torch.manual_seed(1)
        target = create_model("resnet18", 3, weights=path).eval()
        assert torch.equal(target(x), source(x))


def test_torchvision_imagenet_layout_loads_with_new_head(tmp_path):
    """A torchvision checkpoint (1000-class head) loads into our 3-class model; only the head stays new."""
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18_imagenet.pth")
    model = create_model("resnet18", 3)
    untouched = load_weights(model, tmp_path / "resnet18_imagenet.pth")
    assert untouched == ["fc.bias", "fc.weight"]
    assert torch.equal(model.conv1.weight, tv.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)


def test_bad_weights_get_clear_errors(tmp_path):
    with pytest.raises(CxrlensError, match="weights file not found: .*missing.pth"):
        create_model("resnet18", 3, weights=tmp_path / "missing.pth")
    torch.save(create_model("resnet18", 3).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CxrlensError, match="only 0 of .* backbone tensors match"):
        create_model("densenet161", 3, weights=tmp_path / "r18.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CxrlensError, match="cannot read weights from .*junk.safetensors"):
        create_model("resnet18", 3, weights=tmp_path / "junk.safetensors")


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a .pth that would run code on load is rejected, not executed."""
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"conv1.weight": _Exploit()}, fh)
    with pytest.raises(CxrlensError, match="cannot read weights from .*evil.pth"):
        create_model("resnet18", 3, weights=tmp_path / "evil.pth")


def test_unknown_model_name():
    with pytest.raises(CxrlensError, match="unknown model 'vgg16'; choose one of: resnet18, resnet34"):
        create_model("vgg16", 3)


def test_a_taken_model_name_is_refused_and_the_registry_is_unchanged():
    from cxrlens.models import MODELS, register_model

    before = MODELS["resnet18"]
    with pytest.raises(CxrlensError, match="a model 'resnet18' is already registered; pick another name"):
        register_model("resnet18", gradcam_layer="stem", nap_layers=("stem",))(lambda num_classes: torch.nn.Identity())
    assert MODELS["resnet18"] is before
