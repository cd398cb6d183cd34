"""Correctness of cxrlens.explain: the rewrite, completeness, equality with Captum, options, errors.

Small inputs (64-80 px, untrained seeded models in eval mode) keep the file fast on two CPU cores.
Tolerances stated here:
* DeepLIFT completeness: |sum(attr) - (f(x) - f(b))| <= 1e-3 |f(x) - f(b)| + 1e-5, every architecture;
* equality with Captum: max |ours - captum| <= 1e-4 max |captum|;
* channels_last: max difference <= 1e-4 of the map's maximum;
* bfloat16 autocast: relative L2 difference <= 0.25 and cosine similarity >= 0.98.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.explain import METHODS, RewriteError, attribute, find_hazards, make_explainable
from cxrlens.explain.rewrite import CallSiteSplit
from cxrlens.models import create_model

TARGETS = [0, 2]
_IMAGE_DIRS = [
    Path(__file__).resolve().parents[1] / "data" / "cxr3" / "images",
    Path("/work/shared/data/cxr3/images"),
]


def xrays(size: int, n: int = 1) -> torch.Tensor:
    """``n`` real chest X-rays, resized, grey repeated to 3 channels, in [0, 1]: [n, 3, size, size]."""
    for folder in _IMAGE_DIRS:
        paths = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
        if len(paths) == n:
            arrays = [
                np.asarray(Image.open(p).convert("L").resize((size, size), Image.BICUBIC), dtype=np.float32)
                for p in paths
            ]
            return torch.from_numpy(np.stack(arrays) / 255.0)[:, None].repeat(1, 3, 1, 1)
    # No data checked out: a smooth synthetic image with structure at several scales.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.5 + 0.25 * torch.sin(7 * xx) * torch.cos(5 * yy) + 0.2 * torch.exp(-((xx - 0.4) ** 2) * 20)
    return torch.stack([(base + 0.05 * k).clamp(0, 1) for k in range(n)])[:, None].repeat(1, 3, 1, 1)


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set BatchNorm running statistics from ``images`` (one forward pass in train mode), as training
    would: an untrained network with initial statistics has exploding or vanishing activations and an
    output that barely depends on its input, which would make completeness tests vacuous."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy two-core machine the waiting
    OpenMP threads spin and multiply the wall time; one thread keeps this file fast everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return xrays(64, n=2)


@pytest.fixture(scope="module")
def resnet(x64: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """Registry ResNet18 (3 classes, BatchNorm calibrated on four other X-rays), explainable copy."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(create_model("resnet18", num_classes=3), xrays(64, n=6)[2:])
    return model, make_explainable(model, x64[:1])


# --- rewrite -------------------------------------------------------------------------------------

class _Branchy(nn.Module):
    """Untraceable (data-dependent branch) and calls one ReLU module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            x = self.relu(x - 0.05)
        return self.relu(x + 0.02)


class _Toy(nn.Module):
    """Every hazard at once: functional and in-place activations, ``+=``, a functional max-pool,
    a module used twice in a Sequential and twice in forward, and untraceable code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        shared = nn.ReLU()
        self.seq = nn.Sequential(shared, nn.Conv2d(4, 4, 1), shared)
        self.branchy = _Branchy()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        y = F.relu(self.conv2(x))
        y += x
        y = self.act(y - 0.1)
        y = (y - 0.01).relu_()
        y = torch.relu(y - 0.02) + (y - 0.03).relu()
        z = F.max_pool2d(y, 2)
        z = self.seq(z).sigmoid() - 0.5
        z = self.branchy(z)
        return self.fc(z.mean((2, 3)))


def test_rewrite_fixes_every_hazard_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    toy, x = _Toy().eval(), torch.rand(2, 3, 12, 12)
    hazards, reused = find_hazards(toy, x)
    assert any("functional relu" in h for h in hazards) and any("max_pool2d" in h for h in hazards)
    assert any("in-place" in h for h in hazards) and reused
    explainable = make_explainable(toy, x)
    assert find_hazards(explainable, x) == ([], {})
    assert isinstance(explainable.branchy.relu, CallSiteSplit)  # module-level fallback
    with torch.no_grad():
        torch.testing.assert_close(explainable(x), toy(x))
    assert not any(p.requires_grad for p in explainable.parameters())
    assert all(p.requires_grad for p in toy.parameters())  # the original is untouched
    # DeepLIFT on the rewritten toy is complete, which needs every hazard fixed.
    result = attribute(explainable, x, [0, 1, 2], method="deeplift", output="logit")
    assert result.delta.abs().max() < 1e-5


def test_rewrite_torchvision_resnet_keeps_class_and_names() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None, num_classes=3).eval(), torch.rand(1, 3, 64, 64)
    assert find_hazards(model, x)[1]  # one ReLU per block, called twice
    explainable = make_explainable(model, x)
    assert find_hazards(explainable, x) == ([], {})
    assert isinstance(explainable, torchvision.models.ResNet)
    assert {"layer4", "layer4.1.relu", "layer4.1.relu_1"} <= set(dict(explainable.named_modules()))


def test_rewrite_refuses_functional_relu_in_untraceable_code() -> None:
    class Hidden(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) if x.sum() > -1e9 else x

    model, x = nn.Sequential(nn.Conv2d(3, 2, 3), Hidden()).eval(), torch.rand(1, 3, 8, 8)
    with pytest.raises(RewriteError, match="functional relu"):
        make_explainable(model, x)
    with pytest.warns(UserWarning, match="functional relu"):
        make_explainable(model, x, strict=False)


# --- completeness ----------------------------------------------------------------------------------

def _registry(name: str) -> nn.Module:
    return create_model(name, num_classes=3)


def _torchvision(name: str) -> nn.Module:
    if name == "inception_v3":
        return torchvision.models.inception_v3(weights=None, num_classes=3, aux_logits=False, init_weights=False)
    return getattr(torchvision.models, name)(weights=None, num_classes=3)


ARCHITECTURES = [
    ("resnet18", _registry, 64, "sigmoid"),
    ("resnet34", _registry, 64, "logit"),
    ("inception_v3", _registry, 75, "logit"),
    ("inception_resnet_v2", _registry, 75, "logit"),
    ("densenet161", _registry, 64, "logit"),
    ("resnet18", _torchvision, 64, "sigmoid"),
    ("densenet161", _torchvision, 64, "logit"),
    ("inception_v3", _torchvision, 75, "logit"),
]


@pytest.mark.parametrize(
    ("name", "build", "size", "output"), ARCHITECTURES,
    ids=[f"{b.__name__.strip('_')}-{n}" for n, b, _, _ in ARCHITECTURES],
)
def test_deeplift_completeness(name: str, build, size: int, output: str) -> None:
    torch.manual_seed(0)
    images = xrays(size, n=5)
    model, x = calibrate_batchnorm(build(name), images[1:]), images[:1]
    result = attribute(model, x, TARGETS, method="deeplift", output=output)  # rewrites the model
    with torch.no_grad():
        ends = model(torch.cat([x, torch.zeros_like(x)]))[:, TARGETS]
    if output == "sigmoid":
        ends = ends.sigmoid()
    expected = ends[:1] - ends[1:]
    total = result.maps.sum((2, 3))
    error = (total - expected).abs()
    assert (error <= 1e-3 * expected.abs() + 1e-5).all(), (error, expected)
    assert (error / expected.abs()).max() < 1e-3, (error, expected)  # relative, whatever the scale
    # The reported delta is that error, up to the float rounding of the outputs.
    assert ((result.delta - (total - expected)).abs() <= 1e-5 * ends.abs().max() + 1e-6).all()


def test_deeplift_maxpool_matches_explicit_rule(resnet, x64) -> None:
    """DeepLIFT through conv-BN-ReLU-maxpool(3x3/2, overlapping)-head, against the rescale rule and
    the cross-maximum max-pool rule written out by hand."""
    model, _ = resnet
    x = x64[:1]
    stem, pool = nn.Sequential(model.conv1, model.bn1).eval(), model.maxpool
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3)).eval()
    net = nn.Sequential(model.conv1, model.bn1, model.act1, pool, head).eval()

    def safe_div(a: torch.Tensor, b: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        far = b.abs() > 1e-10
        return torch.where(far, a / torch.where(far, b, torch.ones_like(b)), fallback)

    def route(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:  # max-pool's own backward
        leaf = inputs.clone().requires_grad_(True)
        return torch.autograd.grad(pool(leaf), leaf, grads)[0]

    with torch.no_grad():
        z, z0 = stem(x), stem(torch.zeros_like(x))
        h, h0 = z.clamp(min=0), z0.clamp(min=0)
        p, p0 = pool(h), pool(h0)
    m_relu = safe_div(h - h0, z - z0, (z > 0).float())
    pooled = p.clone().requires_grad_(True)
    g = torch.autograd.grad(head(pooled)[0, 0], pooled)[0]
    cross = torch.maximum(p, p0)
    contributions = route(h, g * (cross - p0)) + route(h0, g * (p - cross))
    m_h = safe_div(contributions, h - h0, route(h, g))
    leaf = x.clone().requires_grad_(True)
    expected = x * torch.autograd.grad((stem(leaf) * m_h * m_relu).sum(), leaf)[0]

    ours = attribute(net, x, [0], method="deeplift", output="logit", per_channel=True)
    assert relative_error(ours.channel_maps[:, 0], expected) <= 1e-5
    assert ours.delta.abs().max() <= 1e-5 * (net(x) - net(torch.zeros_like(x))).abs().max().item() + 1e-7


def test_integrated_gradients_delta(resnet, x64) -> None:
    _, model = resnet
    x = x64[:1]
    with torch.no_grad():
        ends = model(torch.cat([x, torch.zeros_like(x)]))[:, TARGETS]
    expected = ends[:1] - ends[1:]
    for integration in ("riemann_trapezoid", "gausslegendre"):
        deltas = []
        for n_steps in (2, 6, 24):
            result = attribute(model, x, TARGETS, method="integrated_gradients", output="logit",
                               n_steps=n_steps, integration=integration, max_batch=24)
            # Completeness holds within the reported delta (checked against an independent forward).
            torch.testing.assert_close(result.delta, result.maps.sum((2, 3)) - expected, atol=1e-5, rtol=1e-4)
            deltas.append(result.delta.abs().sum().item())
        assert deltas[2] < deltas[1] < deltas[0], (integration, deltas)


# --- equality with Captum ------------------------------------------------------------------------

def _captum_runs(model: nn.Module, x: torch.Tensor) -> dict:
    import captum.attr as ca

    f = nn.Sequential(model, nn.Sigmoid()).eval()  # the study explains the sigmoid outputs

    def per_target(fn):
        return lambda: torch.stack([fn(t).detach() for t in TARGETS], 1)

    return {
        "saliency": ({}, per_target(lambda t: ca.Saliency(f).attribute(x, target=t))),
        "input_x_gradient": ({}, per_target(lambda t: ca.InputXGradient(f).attribute(x, target=t))),
        "guided_backprop": ({}, per_target(lambda t: ca.GuidedBackprop(f).attribute(x, target=t))),
        # (Captum's riemann_trapezoid weights sum to (n-1)/n, not 1, so we compare the others.)
        "integrated_gradients": (
            {"n_steps": 8, "integration": "gausslegendre"},
            per_target(lambda t: ca.IntegratedGradients(f).attribute(x, target=t, n_steps=8)),
        ),
        "integrated_gradients_riemann_right": (
            {"n_steps": 4, "integration": "riemann_right"},
            per_target(lambda t: ca.IntegratedGradients(f).attribute(
                x, target=t, n_steps=4, method="riemann_right")),
        ),
        "deeplift": ({}, per_target(lambda t: ca.DeepLift(f).attribute(x, target=t))),  # see below
        # 64 px, window 16, stride 10: the last window is cut off, as in Captum.
        "occlusion": (
            {"window": 16, "stride": 10},
            per_target(lambda t: ca.Occlusion(f).attribute(
                x, target=t, sliding_window_shapes=(3, 16, 16), strides=(3, 10, 10), perturbations_per_eval=8)),
        ),
        "grad_cam": (
            {"interpolate": "nearest", "layer": "layer4"},
            per_target(lambda t: ca.LayerAttribution.interpolate(
                ca.LayerGradCam(f, model.layer4).attribute(x, target=t, relu_attributions=True), x.shape[2:])),
        ),
        "guided_grad_cam": (
            {"interpolate": "nearest", "layer": "layer4"},
            per_target(lambda t: ca.GuidedGradCam(f, model.layer4).attribute(x, target=t)),
        ),
    }


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "guided_backprop", "integrated_gradients",
                                    "integrated_gradients_riemann_right", "deeplift", "occlusion", "grad_cam",
                                    "guided_grad_cam"])
def test_matches_captum(resnet, x64, method: str) -> None:
    _, model = resnet
    x = x64
    if method == "deeplift":
        # Captum's max-pool rule deviates from the rescale rule (max_unpool overwrites where
        # overlapping windows share an arg-max, captum issue 1276, and it differs from the explicit
        # evaluation in test_deeplift_maxpool_matches_explicit_rule), so compare without the max-pool.
        model = copy.deepcopy(model)
        model.maxpool = nn.Identity()
    params, run_captum = _captum_runs(model, x)[method]
    ours = attribute(model, x, TARGETS, method=method.split("_riemann")[0], per_channel=True, max_batch=8,
                     **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = run_captum()
    assert ours.channel_maps.shape[:2] == reference.shape[:2] == (len(x), 2)
    assert relative_error(ours.channel_maps.expand_as(reference), reference) <= 1e-4
    assert relative_error(ours.maps, reference.sum(2)) <= 1e-4


def test_occlusion_equals_brute_force() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    ).eval()
    x = torch.rand(2, 3, 6, 7)
    with torch.no_grad():
        base = model(x).sigmoid()[:, TARGETS]

    def drop(window: tuple[int, int, int, int]) -> torch.Tensor:  # [B, T] for a (y, x, h, w) window
        y0, x0, h, w = window
        occluded = x.clone()
        occluded[:, :, y0: y0 + h, x0: x0 + w] = 0
        with torch.no_grad():
            return base - model(occluded).sigmoid()[:, TARGETS]

    # Window 1, stride 1: each pixel's attribution is the output drop when that pixel is zeroed.
    result = attribute(model, x, TARGETS, method="occlusion", window=1, stride=1, max_batch=5, per_channel=True)
    expected = torch.zeros(2, 2, 6, 7)
    for i in range(6):
        for j in range(7):
            expected[:, :, i, j] = drop((i, j, 1, 1))
    torch.testing.assert_close(result.channel_maps, expected[:, :, None].expand(2, 2, 3, 6, 7), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.maps, 3 * expected, atol=1e-6, rtol=1e-5)

    # Window 3x2, stride 2: overlapping windows, the last column's cut off, averaged per pixel.
    result = attribute(model, x, TARGETS, method="occlusion", window=(3, 2), stride=2, max_batch=4)
    total, count = torch.zeros(2, 2, 6, 7), torch.zeros(6, 7)
    for y0 in (0, 2, 4):
        for x0 in (0, 2, 4, 6):
            total[:, :, y0: y0 + 3, x0: x0 + 2] += drop((y0, x0, 3, 2))[:, :, None, None]
            count[y0: y0 + 3, x0: x0 + 2] += 1
    assert count.min() >= 1
    torch.testing.assert_close(result.maps, 3 * total / count, atol=1e-6, rtol=1e-5)


def test_smoothgrad_averages_the_base_method(resnet, x64) -> None:
    _, model = resnet
    result = attribute(model, x64, TARGETS, method="smoothgrad", n_samples=3, stdev=0.1, seed=7,
                       base="input_x_gradient", per_channel=True)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((3 * 2, *x64.shape[1:]), generator=generator)
    noisy = x64.repeat(3, 1, 1, 1) + 0.1 * noise
    each = attribute(model, noisy, TARGETS, method="input_x_gradient", per_channel=True).channel_maps
    torch.testing.assert_close(result.channel_maps, each.view(3, 2, *each.shape[1:]).mean(0), atol=1e-7, rtol=1e-4)


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "deeplift", "grad_cam", "occlusion"])
def test_channels_last_and_bf16_within_tolerance(resnet, x64, method: str) -> None:
    _, model = resnet
    params = {"integrated_gradients": {"n_steps": 4}, "occlusion": {"window": 32, "stride": 16}}.get(method, {})
    reference = attribute(model, x64[:1], TARGETS, method=method, **params).maps
    fast = attribute(model, x64[:1], TARGETS, method=method, channels_last=True, **params).maps
    assert relative_error(fast, reference) <= 1e-4
    half = attribute(model, x64[:1], TARGETS, method=method, autocast_bf16=True, **params).maps
    assert float((half - reference).norm() / reference.norm()) <= 0.25
    assert float(F.cosine_similarity(half.flatten(), reference.flatten(), dim=0)) >= 0.98
    # The model's own settings come back afterwards.
    assert model.conv1.weight.is_contiguous()


def test_grad_cam_default_layers(resnet, x64) -> None:
    model, explainable = resnet
    assert attribute(model, x64, [1], method="grad_cam", model_name="resnet18").meta["layer"] == "layer4"
    # Without a registry name: the last module with a spatial output.
    torch.manual_seed(0)
    user_model = torchvision.models.resnet18(weights=None, num_classes=3)
    assert attribute(user_model, x64, [1], method="grad_cam").meta["layer"] == "layer4"


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "lime"}, "unknown attribution method 'lime'; choose one of: occlusion"),
        ({"method": "grad_cam", "layer": "layer9"}, "unknown layer 'layer9'; valid layers include: conv1"),
        ({"method": "occlusion", "window": 65, "stride": 4}, "window 65x65 is larger than the 64x64 image"),
        ({"method": "occlusion", "window": 0}, "window must be a positive int"),
        ({"method": "saliency", "n_steps": 3}, "unknown parameter 'n_steps' for method 'saliency'"),
        ({"method": "integrated_gradients", "integration": "simpson"}, "unknown integration 'simpson'"),
        ({"method": "saliency", "output": "softmax"}, "output must be one of sigmoid, logit"),
        ({"method": "saliency", "targets": [5]}, "target class 5 does not exist; the model has 3 outputs"),
        ({"method": "deeplift", "baseline": torch.zeros(3, 8, 8)}, "baseline must be a number or a tensor"),
        ({"method": "smoothgrad", "base": "occlusion"}, "smoothgrad cannot wrap 'occlusion'"),
    ],
)
def test_bad_inputs_are_user_errors(resnet, x64, kwargs: dict, message: str) -> None:
    _, model = resnet
    kwargs = dict(kwargs)
    targets = kwargs.pop("targets", TARGETS)
    with pytest.raises(CxrlensError) as info:
        attribute(model, x64[:1], targets, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_registry_is_complete() -> None:
    assert set(METHODS) == {
        "occlusion", "saliency", "guided_backprop", "input_x_gradient", "integrated_gradients",
        "deeplift", "grad_cam", "guided_grad_cam", "smoothgrad",
    }


def test_deeplift_maxpool_without_known_indices() -> None:
    """A max-pool subclass (like timm's MaxPool2dSame) is routed through its own backward."""

    class SamePool(nn.MaxPool2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(F.pad(x, (0, 1, 0, 1), value=-float("inf")))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), SamePool(3, 2), nn.Flatten(),
                        nn.LazyLinear(3))
    x = torch.rand(2, 3, 12, 12)
    calibrate_batchnorm(net, torch.rand(4, 3, 12, 12))
    result = attribute(net, x, TARGETS, method="deeplift", output="logit")
    with torch.no_grad():
        expected = (net(x) - net(torch.zeros_like(x)))[:, TARGETS]
    assert ((result.maps.sum((2, 3)) - expected).abs() <= 1e-5 * expected.abs() + 1e-7).all()


def _small_cnn(squeeze_excite: bool = False) -> nn.Module:
    """Most of its work is at full and half resolution, where incremental occlusion pays off."""

    class Gate(nn.Module):  # squeeze-excitation: a global operation inside the prefix
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x.mean((2, 3), keepdim=True))

    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()]
    layers += [Gate()] if squeeze_excite else []  # module 5
    layers += [nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
               nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)]
    torch.manual_seed(0)
    return calibrate_batchnorm(nn.Sequential(*layers), xrays(64, n=4))


@pytest.mark.parametrize("squeeze_excite", [False, True])
def test_incremental_occlusion_equals_full_sweep(squeeze_excite: bool) -> None:
    net, x = _small_cnn(squeeze_excite), xrays(64, n=6)[4:]
    baseline = torch.rand(2, 3, 64, 64)
    params = {"window": 8, "stride": 4, "baseline": baseline}
    fast = attribute(net, x, TARGETS, method="occlusion", max_batch=32, **params)
    full = attribute(net, x, TARGETS, method="occlusion", max_batch=32, incremental=False, **params)
    # Only where it is exact and saves work: never with the global operation in the prefix.
    layer = fast.meta["incremental_layer"]
    assert layer is not None and (not squeeze_excite or int(layer) < 5), layer
    # Output drops are differences of nearly equal sigmoid outputs (here ~1e-4 of them): compare at the
    # outputs' precision, a few float32 ulps.
    assert (fast.maps - full.maps).abs().max() <= 1e-6 * full.scores.abs().max()
