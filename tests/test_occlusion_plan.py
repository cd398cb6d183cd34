"""How occlusion decides between the incremental and the plain sweep: explicit checks, each with its reason."""

from __future__ import annotations

import json

import torch
from conftest import XRAY, make_run, run_cli
from torch import nn

from cxrlens.explain import attribute

TARGETS = [0, 2]


class FixedSize(nn.Module):
    """A first layer that accepts one input size only (as some patch embeddings do), checked in Python."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (64, 64):
            raise ValueError(f"expected 64x64 inputs, got {tuple(x.shape[-2:])}")
        return x


def small_cnn(fixed_size: bool = False) -> nn.Module:
    """Most of its work at full and half resolution, where cutting after the early layers pays off."""
    torch.manual_seed(0)
    layers = [FixedSize()] if fixed_size else []
    layers += [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
               nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).eval()


def test_occlusion_reports_which_sweep_it_ran_and_why() -> None:
    net, x = small_cnn(), torch.rand(2, 3, 64, 64)
    fast = attribute(net, x, TARGETS, method="occlusion", window=8, stride=4)
    assert fast.meta["incremental_layer"] is not None
    assert fast.meta["occlusion_plan"].startswith(f"incremental up to layer {fast.meta['incremental_layer']} (about")
    full = attribute(net, x, TARGETS, method="occlusion", window=8, stride=4, incremental=False)
    assert full.meta["incremental_layer"] is None
    assert full.meta["occlusion_plan"] == "brute force, because incremental=False"
    # Output drops are differences of nearly equal sigmoid outputs: a few float32 ulps of the outputs.
    assert (fast.maps - full.maps).abs().max() <= 1e-6 * full.scores.abs().max()
    few = attribute(net, x, TARGETS, method="occlusion", window=32, stride=16)  # 3 x 3 windows
    assert few.meta["occlusion_plan"].startswith("brute force, because 9 windows are too few")


def test_an_untraceable_first_layer_means_the_plain_sweep() -> None:
    net, x = small_cnn(fixed_size=True), torch.rand(1, 3, 64, 64)
    result = attribute(net, x, TARGETS, method="occlusion", window=8, stride=4)
    plan = result.meta["occlusion_plan"]
    assert result.meta["incremental_layer"] is None
    # Its shape check is data-dependent control flow: kept whole, it would have to see whole images.
    assert plan.startswith("brute force, because layer 0, the first on the image, cannot be traced (TraceError: ")
    reference = attribute(net, x, TARGETS, method="occlusion", window=8, stride=4, incremental=False)
    assert torch.equal(result.maps, reference.maps)  # the same full passes


def test_cli_explain_approximate(tmp_path, monkeypatch, capsys) -> None:
    run = make_run(tmp_path / "run", seed=0)

    def explain(*extra: str) -> tuple[int, str]:
        code, _, err = run_cli(monkeypatch, capsys, "explain", "--run", str(run), "--image", str(XRAY), "--targets",
                               "COVID-19", "--out", str(tmp_path / "out"), *extra)
        return code, err

    code, err = explain("--methods", "saliency", "--approximate")
    assert code == 2 and err.strip() == ("error: --approximate applies to occlusion; add occlusion to --methods or "
                                         "drop --approximate")
    assert not (tmp_path / "out").exists()
    code, err = explain("--methods", "occlusion", "--approximate")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["models"]["run"]["methods"]["occlusion"]
    assert record["params"]["approximate"] is True and record["occlusion_plan"].startswith("approximate: ")
    (error,) = record["approximation_error"]  # one image, its error per explained class
    assert error["windows_checked"] > 0 and len(error["map_error"]) == len(error["map_error_relative"]) == 1
