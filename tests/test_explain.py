"""Correctness of cxrlens.explain: the rewrite, completeness, equality with Captum, options, errors.

Small inputs (64-80 px) keep the file fast on two CPU cores. Test models are untrained but in a
trained-looking state (cxrlens.testing.trained_like: BatchNorm weights and statistics as after
training), so residual branches and every ReLU inside them carry signal. Where a tolerance comes from:
* exact properties (DeepLIFT completeness, the reported deltas, equality with Captum) are checked in
  float64 against a first-order rounding bound (n + L) * u * (magnitudes): n summed terms, L layers,
  u = unit roundoff. Float64 puts that bound near 1e-12 of the magnitudes, so a wrong rule (errors of
  1e-3 and more) fails, and no CPU's choice of float32 kernels can (their differences are ~1e-6);
* float32 runs are held to the same bound with float32's u, which covers kernels chosen differently
  for different batch compositions, thread counts and instruction sets (``make test`` reruns these
  tests with one thread and with AVX2 and SSE4.1 kernels: scripts/numerics.sh);
* channels_last: a different summation order per convolution; bfloat16 autocast: 8-bit mantissas.
"""

from __future__ import annotations

import copy
import os
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
from cxrlens.testing import trained_like

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


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach(), reference.detach()
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def rounding_bound(model: nn.Module, n_terms: int, *magnitudes: torch.Tensor) -> torch.Tensor:
    """First-order bound on the float rounding of a quantity built from ``n_terms`` summed
    attributions through the model's layers: (n_terms + L) * u * (sum of the magnitudes), per image
    and target, with L the number of modules (one rounding per layer on each path) and u the unit
    roundoff of the model's dtype (Higham, Accuracy and Stability of Numerical Algorithms, ch. 4)."""
    dtype = next(model.parameters()).dtype
    unit_roundoff = torch.finfo(dtype).eps / 2
    layers = sum(1 for _ in model.modules())
    return (n_terms + layers) * unit_roundoff * sum(m.abs() for m in magnitudes)


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """Tiny inputs gain nothing from intra-op threads, and on a busy two-core machine the waiting
    OpenMP threads spin and multiply the wall time: one thread by default. CXRLENS_TEST_THREADS
    changes it (scripts/numerics.sh reruns the numerical tests with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CXRLENS_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return xrays(64, n=2)


@pytest.fixture(scope="module")
def resnet(x64: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """Registry ResNet18 (3 classes, trained-looking BatchNorm from four other X-rays), explainable copy."""
    torch.manual_seed(0)
    model = trained_like(create_model("resnet18", num_classes=3), xrays(64, n=6)[2:])
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
    toy, x = _Toy().double().eval(), torch.rand(2, 3, 12, 12, dtype=torch.float64)
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
    with torch.no_grad():
        ends = toy(torch.cat([x, torch.zeros_like(x)]))
    assert (result.delta.abs() <= rounding_bound(toy, x[0].numel(), result.maps.abs().sum((2, 3)), ends[:2],
                                                 ends[2:])).all()


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
    "dtype",
    [torch.float64, pytest.param(torch.float32, marks=pytest.mark.numerics)],  # float64 is robust by construction
    ids=["float64", "float32"],
)
@pytest.mark.parametrize(
    ("name", "build", "size", "output"), ARCHITECTURES,
    ids=[f"{b.__name__.strip('_')}-{n}" for n, b, _, _ in ARCHITECTURES],
)
def test_deeplift_completeness(name: str, build, size: int, output: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    images = xrays(size, n=5).to(dtype)
    model, x = trained_like(build(name).to(dtype), images[1:]), images[:1]
    result = attribute(model, x, TARGETS, method="deeplift", output=output)  # rewrites the model
    with torch.no_grad():  # another batch composition than attribute's: other kernels, other rounding
        ends = model(torch.cat([x, torch.zeros_like(x)]))[:, TARGETS]
    if output == "sigmoid":
        ends = ends.sigmoid()
    expected = ends[:1] - ends[1:]
    total = result.maps.sum((2, 3))
    error = (total - expected).abs()
    bound = rounding_bound(model, x[0].numel(), result.maps.abs().sum((2, 3)), ends[:1], ends[1:])
    assert (error <= bound).all(), (error, bound, expected)
    if dtype == torch.float64:  # and relative, whatever the scale: a broken rule errs by >= 1e-4
        assert (error / expected.abs()).max() < 1e-9, (error, expected)
    # The reported delta is that error, up to the same rounding.
    assert ((result.delta - (total - expected)).abs() <= bound).all(), (result.delta, total - expected, bound)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["resnet18", "densenet161"])
def test_test_models_exercise_every_branch(name: str) -> None:
    """The state the tests use is not degenerate: gradients reach every pixel, and two seeds give
    different maps (with timm's zero-initialised residual BatchNorm, 93 % of pixels got zero gradient
    and two seeds' ResNet18 saliency maps correlated at Spearman 0.998)."""
    from scipy.stats import spearmanr

    images = xrays(64, n=6)
    maps = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = trained_like(create_model(name, num_classes=3), images[2:], seed=seed)
        maps.append(attribute(model, images[:1], [0], method="saliency").maps.flatten())
        assert (maps[-1] == 0).float().mean() < 0.05
    assert spearmanr(maps[0].numpy(), maps[1].numpy()).statistic < 0.8


def _conv_relu_pool() -> tuple[nn.Module, nn.Module]:
    """conv-ReLU-maxpool(2x2, not overlapping)-linear, and the same net with an identity 1x1 conv
    between the ReLU and the pool, which changes neither the function nor DeepLIFT's rescale rule."""
    torch.manual_seed(3)
    conv, pool, head = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    identity = nn.Conv2d(4, 4, 1, bias=False)
    nn.init.dirac_(identity.weight)
    plain = nn.Sequential(conv, nn.ReLU(), pool, head)
    separated = nn.Sequential(conv, nn.ReLU(), identity, pool, head)
    return plain.double().eval(), separated.double().eval()


def test_deeplift_relu_feeding_maxpool() -> None:
    """Captum 0.9's DeepLIFT is wrong whenever a ReLU module feeds a max-pool directly (even a
    non-overlapping 2x2 one) and right once an identity 1x1 conv sits between them. Ours is complete
    and the same either way, and equals Captum where Captum is right."""
    import captum.attr as ca

    x = xrays(8, n=2).double()
    plain, separated = _conv_relu_pool()
    ours = attribute(plain, x, TARGETS, method="deeplift", output="logit", per_channel=True)
    with torch.no_grad():
        expected = (plain(x) - plain(torch.zeros_like(x)))[:, TARGETS]
    bound = rounding_bound(plain, x[0].numel(), ours.maps.abs().sum((2, 3)), expected)
    assert ((ours.maps.sum((2, 3)) - expected).abs() <= bound).all()
    same = attribute(separated, x, TARGETS, method="deeplift", output="logit", per_channel=True)
    assert relative_error(same.channel_maps, ours.channel_maps) <= 1e-12  # float64 rounding, a few ulps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = torch.stack([ca.DeepLift(separated).attribute(x, target=t) for t in TARGETS], 1)
        captum_plain = torch.stack([ca.DeepLift(plain).attribute(x, target=t) for t in TARGETS], 1)
    assert relative_error(ours.channel_maps, captum) <= 1e-12
    # Documents the peer's deviation (see BENCHMARKS.md); if Captum fixes it, this line says so.
    assert relative_error(captum_plain, captum) > 1e-3


def test_deeplift_maxpool_matches_explicit_rule(resnet, x64) -> None:
    """DeepLIFT through conv-BN-ReLU-maxpool(3x3/2, overlapping)-head, against the rescale rule and
    the cross-maximum max-pool rule written out by hand."""
    model, _ = resnet
    model, x = copy.deepcopy(model).double(), x64[:1].double()
    stem, pool = nn.Sequential(model.conv1, model.bn1).eval(), model.maxpool
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3)).double().eval()
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
    # float64: both within (n + L) u = 2e-12 of the maps' scale (rounding_bound); a wrong rule errs by >= 1e-4
    assert relative_error(ours.channel_maps[:, 0], expected) <= 1e-9
    with torch.no_grad():
        ends = net(torch.cat([x, torch.zeros_like(x)]))[:, :1]
    assert (ours.delta.abs() <= rounding_bound(net, x[0].numel(), ours.maps.abs().sum((2, 3)), ends[:1],
                                               ends[1:])).all()


def test_integrated_gradients_delta(resnet, x64) -> None:
    """The reported delta is the completeness error sum(attr) - (f(x) - f(baseline)), checked against
    an independent forward pass in float64 on the realistic ResNet."""
    model, _ = resnet
    model, x = copy.deepcopy(model).double(), x64[:1].double()
    with torch.no_grad():
        ends = model(torch.cat([x, torch.zeros_like(x)]))[:, TARGETS]
    expected = ends[:1] - ends[1:]
    for integration in ("riemann_trapezoid", "gausslegendre"):
        result = attribute(model, x, TARGETS, method="integrated_gradients", output="logit", n_steps=6,
                           integration=integration, max_batch=4)
        total = result.maps.sum((2, 3))
        bound = rounding_bound(model, x[0].numel(), result.maps.abs().sum((2, 3)), ends[:1], ends[1:])
        assert ((result.delta - (total - expected)).abs() <= bound).all()


class _Cubic(nn.Module):
    """f_k(x) = (w_k . x)^3: along the path from 0, d f / d alpha = 3 alpha^2 s^3 (s = w . x), so each
    quadrature rule's error is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 3 * 8 * 8, dtype=torch.float64, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.w.T / 20) ** 3


@pytest.mark.parametrize(
    ("integration", "relative_error_of"),
    [
        ("gausslegendre", lambda n: 0.0),  # exact for polynomials of degree <= 2n - 1
        ("riemann_trapezoid", lambda n: 1 / (2 * (n - 1) ** 2)),
        ("riemann_middle", lambda n: -1 / (4 * n**2)),
        ("riemann_right", lambda n: (n + 1) * (2 * n + 1) / (2 * n**2) - 1),
        ("riemann_left", lambda n: (n - 1) * (2 * n - 1) / (2 * n**2) - 1),
    ],
)
def test_integrated_gradients_quadrature_error(integration: str, relative_error_of) -> None:
    model, x = _Cubic().eval(), xrays(8, n=2).double()
    with torch.no_grad():
        expected = model(x)[:, TARGETS]  # f(0) = 0
    for n_steps in (2, 5, 17):
        result = attribute(model, x, TARGETS, method="integrated_gradients", output="logit", n_steps=n_steps,
                           integration=integration)
        predicted = expected * relative_error_of(n_steps)
        # float64: a few hundred roundings of values of size |expected| (bound: 1e-12 of it)
        torch.testing.assert_close(result.delta, predicted, rtol=0, atol=1e-12 * float(expected.abs().max()))


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


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "guided_backprop", "integrated_gradients",
                                    "integrated_gradients_riemann_right", "deeplift", "occlusion", "grad_cam",
                                    "guided_grad_cam"])
def test_matches_captum(resnet, x64, method: str) -> None:
    _, model = resnet
    model, x = copy.deepcopy(model).double(), x64.double()
    if method == "deeplift":
        # Captum's DeepLIFT is wrong where a ReLU module feeds a max-pool directly, as ResNet's stem
        # does (test_deeplift_relu_feeding_maxpool), and its max-pool rule overwrites where overlapping
        # windows share an arg-max (captum issue 1276): compare without the max-pool.
        model.maxpool = nn.Identity()
    params, run_captum = _captum_runs(model, x)[method]
    ours = attribute(model, x, TARGETS, method=method.split("_riemann")[0], per_channel=True, max_batch=8,
                     **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = run_captum()
    assert ours.channel_maps.shape[:2] == reference.shape[:2] == (len(x), 2)
    # float64: both sides are within (n + L) u = 2e-12 of the exact maps' scale (see rounding_bound);
    # 1e-9 leaves room for cancellation, while any difference in the method is 1e-4 or more. Captum
    # keeps its quadrature weights and its occlusion sums in float32: a few float32 roundings
    # (u = 6e-8) per value there, so 16 u.
    tolerance = 16 * torch.finfo(torch.float32).eps / 2 if method.startswith(("integrated", "occlusion")) else 1e-9
    assert relative_error(ours.channel_maps.expand_as(reference), reference) <= tolerance
    assert relative_error(ours.maps, reference.sum(2)) <= tolerance


def test_occlusion_equals_brute_force() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    ).double().eval()
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
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
    expected = torch.zeros(2, 2, 6, 7, dtype=torch.float64)
    for i in range(6):
        for j in range(7):
            expected[:, :, i, j] = drop((i, j, 1, 1))
    # float64; drops are differences of sigmoids in (0, 1): a few roundings of size u = 1.1e-16 each.
    exact = {"atol": 1e-14, "rtol": 0}
    torch.testing.assert_close(result.channel_maps, expected[:, :, None].expand(2, 2, 3, 6, 7), **exact)
    torch.testing.assert_close(result.maps, 3 * expected, **exact)

    # Window 3x2, stride 2: overlapping windows, the last column's cut off, averaged per pixel.
    result = attribute(model, x, TARGETS, method="occlusion", window=(3, 2), stride=2, max_batch=4)
    total, count = torch.zeros(2, 2, 6, 7, dtype=torch.float64), torch.zeros(6, 7, dtype=torch.float64)
    for y0 in (0, 2, 4):
        for x0 in (0, 2, 4, 6):
            total[:, :, y0: y0 + 3, x0: x0 + 2] += drop((y0, x0, 3, 2))[:, :, None, None]
            count[y0: y0 + 3, x0: x0 + 2] += 1
    assert count.min() >= 1
    torch.testing.assert_close(result.maps, 3 * total / count, **exact)


def test_smoothgrad_averages_the_base_method(resnet, x64) -> None:
    _, model = resnet
    model, x = copy.deepcopy(model).double(), x64.double()
    result = attribute(model, x, TARGETS, method="smoothgrad", n_samples=3, stdev=0.1, seed=7,
                       base="input_x_gradient", per_channel=True)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((3 * 2, *x.shape[1:]), generator=generator, dtype=torch.float64)
    noisy = x.repeat(3, 1, 1, 1) + 0.1 * noise
    each = attribute(model, noisy, TARGETS, method="input_x_gradient", per_channel=True, max_batch=1).channel_maps
    # Other batch compositions, other kernels: float64 rounding, far below 1e-9 of the maps' scale.
    assert relative_error(result.channel_maps, each.view(3, 2, *each.shape[1:]).mean(0)) <= 1e-9


# --- options -------------------------------------------------------------------------------------

# bfloat16 keeps 8 significant bits (unit roundoff 2^-8): a pre-activation within 0.4 % of zero can
# change its ReLU gate, which no rounding bound on the maps covers. The cosine similarities to float32
# measured with AVX-512-bf16, AVX2 and SSE4.1 kernels (scripts/numerics.sh) were at least: saliency
# 0.953, integrated gradients 0.850 (4 steps: the gates flip along the whole path), DeepLIFT 0.982,
# Grad-CAM 0.999, occlusion 0.995. Each floor below allows twice the measured distance from 1.
BF16_COSINE_FLOOR = {"saliency": 0.90, "integrated_gradients": 0.70, "deeplift": 0.96, "grad_cam": 0.99,
                     "occlusion": 0.99}


@pytest.mark.numerics
@pytest.mark.parametrize("method", list(BF16_COSINE_FLOOR))
def test_channels_last_and_bf16_within_tolerance(resnet, x64, method: str) -> None:
    _, model = resnet
    params = {"integrated_gradients": {"n_steps": 4}, "occlusion": {"window": 32, "stride": 16}}.get(method, {})
    reference = attribute(model, x64[:1], TARGETS, method=method, **params)
    fast = attribute(model, x64[:1], TARGETS, method=method, channels_last=True, **params).maps
    # channels_last only reorders each convolution's sums: float32 (u = 6e-8) over K <= 4,608 terms
    # moves a value by ~sqrt(K) u = 4e-6 of its scale per layer, ~1e-4 over ResNet18's 20 layers.
    assert relative_error(fast, reference.maps) <= 1e-4
    half = attribute(model, x64[:1], TARGETS, method=method, autocast_bf16=True, **params)
    assert not torch.equal(half.maps, reference.maps)  # bfloat16 did run
    # Scores in (0, 1) after a few bfloat16 roundings: within 4 u = 0.016.
    assert (half.scores - reference.scores).abs().max() <= 4 * 2**-8
    cosine = float(F.cosine_similarity(half.maps.flatten(), reference.maps.flatten(), dim=0))
    assert cosine >= BF16_COSINE_FLOOR[method], cosine
    # The model's own settings come back afterwards.
    assert model.conv1.weight.is_contiguous()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_channels_last_gives_back_the_callers_weights(resnet, x64, memory_format: torch.memory_format) -> None:
    model = copy.deepcopy(resnet[1]).to(memory_format=memory_format)
    weights = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    with torch.no_grad():
        before = model(x64)
    attribute(model, x64, TARGETS, method="saliency", channels_last=True)
    # The very tensors the caller had, in their memory format: outputs identical to the bit.
    assert {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()} == weights
    with torch.no_grad():
        assert torch.equal(model(x64), before)


def test_rewrite_is_cached_until_the_model_changes(x64, monkeypatch) -> None:
    import cxrlens.explain.rewrite as rewrite

    rewrites = []
    real = rewrite.make_explainable
    monkeypatch.setattr(rewrite, "make_explainable", lambda m, e, **k: rewrites.append(1) or real(m, e, **k))
    torch.manual_seed(0)
    model = trained_like(create_model("resnet18", num_classes=3), xrays(64, n=6)[2:])
    first = attribute(model, x64, TARGETS, method="guided_backprop")
    attribute(model, x64, TARGETS, method="deeplift")
    assert torch.equal(attribute(model, x64, TARGETS, method="guided_backprop").maps, first.maps)
    assert len(rewrites) == 1  # the first call pays, the others reuse its copy
    with torch.no_grad():  # an optimiser step: weights changed in place
        model.fc.weight.mul_(-1)
    stepped = attribute(model, x64, TARGETS, method="guided_backprop")
    assert len(rewrites) == 2 and not torch.equal(stepped.maps, first.maps)
    model.fc.weight = nn.Parameter(model.fc.weight.detach() * 2)  # a replaced parameter
    replaced = attribute(model, x64, TARGETS, method="guided_backprop")
    assert len(rewrites) == 3
    # Equal to a rewrite made now (float32, the same operations in the same order).
    assert torch.equal(replaced.maps, attribute(real(model, x64[:1]), x64, TARGETS, method="guided_backprop").maps)


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
                        nn.Linear(4 * 5 * 5, 3)).double()
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    trained_like(net, torch.rand(4, 3, 12, 12, dtype=torch.float64))
    result = attribute(net, x, TARGETS, method="deeplift", output="logit")
    with torch.no_grad():
        ends = net(torch.cat([x, torch.zeros_like(x)]))[:, TARGETS]
    error = (result.maps.sum((2, 3)) - (ends[:2] - ends[2:])).abs()
    assert (error <= rounding_bound(net, x[0].numel(), result.maps.abs().sum((2, 3)), ends[:2], ends[2:])).all()


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
    return trained_like(nn.Sequential(*layers), xrays(64, n=4))


@pytest.mark.parametrize("squeeze_excite", [False, True])
def test_incremental_occlusion_equals_full_sweep(squeeze_excite: bool) -> None:
    net, x = _small_cnn(squeeze_excite).double(), xrays(64, n=6)[4:].double()
    baseline = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    params = {"window": 8, "stride": 4, "baseline": baseline}
    fast = attribute(net, x, TARGETS, method="occlusion", max_batch=32, **params)
    full = attribute(net, x, TARGETS, method="occlusion", max_batch=32, incremental=False, **params)
    # Only where it is exact and saves work: never with the global operation in the prefix.
    layer = fast.meta["incremental_layer"]
    assert layer is not None and (not squeeze_excite or int(layer) < 5), layer
    # Crops and whole images run through other kernels: float64 rounding of outputs in (0, 1), a few
    # hundred roundings of u = 1.1e-16 at most, while a misplaced crop changes drops by 1e-4 or more.
    assert (fast.maps - full.maps).abs().max() <= 1e-12
