"""Incremental occlusion equals brute force on every registry architecture and on every local operation.

Everything runs in float64 on real X-rays, so "equal" can be held to a bound derived from the
arithmetic, far below what a misplaced box, a wrong padding or a stale stored map would cost (1e-4 and
more of the outputs): the incremental and the full pass compute every value with the same operations,
except that a convolution on a crop may sum its K products in another order (Higham, Accuracy and
Stability of Numerical Algorithms, ch. 3: |error| <= K u sum|terms|), and each of the L modules on a
path adds at most one more rounding of its output. So the outputs differ by at most (K + L) u times
their magnitude, to first order, with K the largest fan-in, L the module count and u = 2^-53.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxrlens.data import load_image_tensor
from cxrlens.explain import attribute
from cxrlens.explain import incremental as inc
from cxrlens.explain.occlusion import CHECK_BLOCK, Runner, full_scores, sweep_scores, window_starts
from cxrlens.models import create_model
from cxrlens.testing import trained_like

IMAGES = Path(__file__).resolve().parents[1] / "data" / "cxr3" / "images"
TARGETS = [0, 2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def xrays(size: int, n: int) -> torch.Tensor:
    """``n`` real chest X-rays of the vendored set, preprocessed as for a model: [n, 3, size, size], float64."""
    return torch.stack([load_image_tensor(p, size) for p in sorted(IMAGES.glob("*.jpg"))[:n]]).double()


def rounding_bound(model: nn.Module, magnitude: torch.Tensor) -> float:
    """(K + L) u |outputs|: K the largest fan-in of a convolution or linear layer, L the module count."""
    fan_in = max(m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    layers = sum(1 for _ in model.modules())
    return (fan_in + layers) * torch.finfo(torch.float64).eps / 2 * float(magnitude.abs().max())


def spread_windows(starts: list[int]) -> list[tuple[int, int]]:
    """Corners (the last ones cut off by the border), edges and inner windows of a sweep."""
    a, b, c = starts[0], starts[len(starts) // 3], starts[-1]
    return [(a, a), (a, c), (c, a), (c, c), (b, b), (a, b), (b, c), (starts[1], starts[-2])]


def sweep_versus_brute_force(model: nn.Module, size: int, window: int, stride: int,
                             shares: tuple[float, ...] = inc.DENSE_SHARES) -> tuple[inc.Plan, torch.Tensor,
                                                                                     torch.Tensor]:
    """A plan for the whole sweep (on the first X-ray), and logits of spread windows both ways."""
    images = xrays(size, 5)
    model = trained_like(model.double(), images[1:])
    x, base = images[:1], torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    starts = window_starts(size, window, stride)
    windows = [(y0, x0) for y0 in starts for x0 in starts]
    gm, _ = inc.trace(model)
    runner = Runner(model, lambda out: out)
    with torch.inference_mode():
        p = inc.plan(gm, inc.shapes_of(gm, x), inc.input_boxes(windows, (window, window), (size, size), per_axis=True),
                     shares=shares)
        sample = spread_windows(starts)
        ours = sweep_scores(runner, p, x, base, sample, (window, window), max_batch=5)
        reference = full_scores(runner, x[0], base[0], sample, (window, window), max_batch=5)
    return p, ours, reference


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("resnet34", 64), ("inception_v3", 80),
                                            ("inception_resnet_v2", 80), ("densenet161", 64)])
def test_registry_models_equal_brute_force(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    p, ours, reference = sweep_versus_brute_force(model, size, window=6, stride=2)
    assert p.box_convs >= 6 and p.cost < 1, (p.last_box, p.cost)  # it engages, beyond the first layers
    assert (ours - reference).abs().max() <= rounding_bound(model, reference)
    # Occluding moved the logits by far more than that: the check is not vacuous.
    assert (reference - reference.mean(0)).abs().max() > 1e6 * rounding_bound(model, reference)


class _Branches(nn.Module):
    """Inception-like: branches of different reach (1x1, 1x5 then 5x1, a pooling that does not count its
    padding, a dilated 3x3), concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(c, 4, (1, 5), padding=(0, 2)), nn.ReLU(),
                                nn.Conv2d(4, 4, (5, 1), padding=(2, 0)))
        self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(c, 4, 1))
        self.b4 = nn.Conv2d(c, 4, 3, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class _LocalOps(nn.Module):
    """Every local operation the engine computes on boxes: an even-sized strided stem, a ceil-mode max-pool,
    Inception branches, a residual block with an in-place addition and a strided 1x1 convolution (whose
    input box need not lie inside its window), in-place ReLUs (stored maps must not change), functional
    pooling, an unpadded convolution and a dense block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 4, 2, 1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.branches = _Branches(6)
        self.conv_a = nn.Conv2d(16, 8, 3, 1, 1)
        self.bn_a = nn.BatchNorm2d(8)
        self.shortcut = nn.Conv2d(16, 8, 1, 1)
        self.down = nn.Conv2d(8, 8, 1, 2)
        self.valid = nn.Conv2d(8, 8, 3)
        self.dense = nn.ModuleList([nn.Conv2d(8 + 4 * i, 4, 3, padding=1) for i in range(3)])
        self.fc = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.branches(self.pool(self.stem(x)))
        y = self.bn_a(self.conv_a(x))
        y += self.shortcut(x)
        F.relu(y, inplace=True)  # y itself is now its activation
        y = F.max_pool2d(y - 0.1, 3, 1, 1)  # of signed values: its padding must count as -inf
        x = F.avg_pool2d(F.relu(self.down(y), inplace=True), 3, 1, 1)
        features = [self.valid(x)]
        for conv in self.dense:
            features.append(F.relu(conv(torch.cat(features, 1))))
        return self.fc(torch.cat(features, 1).mean((2, 3)))


def test_every_local_operation_on_boxes_equals_brute_force() -> None:
    torch.manual_seed(0)
    model = _LocalOps()
    # Only a box covering its whole map goes dense: every node that can run on a box does.
    p, ours, reference = sweep_versus_brute_force(model, 96, window=5, stride=3, shares=(1.0,))
    on_boxes = [s for s in p.steps if s.mode == inc.BOX]
    modules = {type(s.module) for s in on_boxes}
    functions = {s.node.target for s in on_boxes if s.node.op == "call_function"}
    assert {nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d} <= modules
    assert {torch.cat, F.max_pool2d, F.avg_pool2d, F.relu, operator.add} <= functions
    assert any(s.window is not None and s.window.exclude_pad for s in on_boxes)
    assert (ours - reference).abs().max() <= rounding_bound(model, reference)
    assert (reference - reference.mean(0)).abs().max() > 1e6 * rounding_bound(model, reference)


def local_ops(size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    images = xrays(size, 5)
    return trained_like(_LocalOps().double(), images[2:]), images[:2]


def test_attribute_reports_the_plan_and_equals_the_full_sweep() -> None:
    model, x = local_ops(96)
    fast = attribute(model, x, TARGETS, method="occlusion", window=8, stride=4)
    full = attribute(model, x, TARGETS, method="occlusion", window=8, stride=4, incremental=False)
    layer = fast.meta["incremental_layer"]
    assert layer is not None and fast.meta["occlusion_plan"].startswith(f"incremental up to layer {layer} (about")
    assert "approximation_error" not in fast.meta  # approximate mode is never the default
    # Maps are means of output drops (sigmoids in (0, 1)): the bound above with magnitude 1.
    assert (fast.maps - full.maps).abs().max() <= rounding_bound(model, torch.ones(1))


@pytest.mark.parametrize(("approximate", "plan"), [
    (True, "approximate: one window position in 2 per axis swept (144 of 529 windows), the others interpolated; "),
    (0.3, "approximate: boxes at most 30% of each side; incremental up to layer "),
])
def test_approximate_mode_reports_its_measured_error(approximate: bool | float, plan: str) -> None:
    model, x = local_ops(96)
    x = x[:1]
    params = {"window": 8, "stride": 4}  # overlapping windows: each pixel's value is a mean of several drops
    result = attribute(model, x, TARGETS, method="occlusion", approximate=approximate, **params)
    exact = attribute(model, x, TARGETS, method="occlusion", incremental=False, **params)
    assert result.meta["occlusion_plan"].startswith(plan)
    (report,) = result.meta["approximation_error"]  # one image
    top, bottom, left, right = report["checked_pixels"]
    assert bottom - top == right - left == CHECK_BLOCK and report["windows_checked"] > 0
    # The reported error is the largest difference from the exact map on those pixels (maps are 3 channels x
    # the mean drop: occlusion covers all channels), up to float64 rounding.
    difference = (result.maps - exact.maps)[0, :, top:bottom, left:right].abs().flatten(1).max(1).values / 3
    torch.testing.assert_close(torch.tensor(report["map_error"], dtype=torch.float64), difference, rtol=0,
                               atol=rounding_bound(model, torch.ones(1)))
    largest = result.maps[0].abs().flatten(1).max(1).values / 3
    torch.testing.assert_close(torch.tensor(report["map_error_relative"], dtype=torch.float64), difference / largest)
    assert max(report["map_error"]) > 1e-6  # approximating does change the maps
