"""Extension points, used from outside the package: a toy attribution method and a toy CNN registered here
(one registration each, nothing in cxrlens edited) work end to end: attribute, training, the CLI's explain,
the scorecard and the web app's method list."""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CXR3, XRAY, run_cli
from torch import nn

from cxrlens.errors import CxrlensError
from cxrlens.explain import METHODS, ExplainConfig, MethodContext, MethodResult, UiParam, attribute, register_method
from cxrlens.explain.rules import guided_relus
from cxrlens.models import MODELS, create_model, register_model

TOY_METHOD = "toy_gradient_power"
TOY_MODEL = "toy_cnn"
SIZE = 32  # px: the toy model's input side in these tests


class ToyCNN(nn.Module):
    """Two stages and a linear head: a CNN as small as a test can train in seconds."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), norm=nn.BatchNorm2d(8),
                                              act=nn.ReLU(), pool=nn.MaxPool2d(2)))
        self.block = nn.Sequential(OrderedDict(conv=nn.Conv2d(8, 16, 3, padding=1), act=nn.ReLU()))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def toy_gradient_power(ctx: MethodContext, x: torch.Tensor, p: dict) -> MethodResult:
    """|input gradient| ** power, through guided ReLUs when ``guided`` (which needs the explainable rewrite)."""
    assert len(ctx.targets) == 1  # registered with batched_targets=False: called once per target
    with guided_relus(ctx.model) if p["guided"] else nullcontext():
        grads, scores = ctx.input_gradients(x)
    return MethodResult(grads.abs() ** p["power"], scores=scores)


@pytest.fixture(scope="module")
def toy_registry():
    """The two registrations a user writes; removed afterwards so the rest of the suite sees the stock registry."""
    register_method(
        TOY_METHOD,
        description="input gradient magnitude to a power (a test's method)",
        defaults={"power": 2.0, "guided": False},
        signed=False,
        needs_rewrite=lambda p: p["guided"],
        batched_targets=False,
        ui=(UiParam("power", "float", 1.0, low=0.5, high=4.0),),
    )(toy_gradient_power)
    # Grad-CAM's layer is the spec's "stem", not the last spatial stage an unregistered model would get.
    register_model(TOY_MODEL, gradcam_layer="stem", nap_layers=("stem", "block"), min_size=8, input_size=SIZE,
                   demo_epochs=1)(ToyCNN)
    yield
    METHODS.pop(TOY_METHOD)
    MODELS.pop(TOY_MODEL)


@pytest.fixture(scope="module")
def toy_run(toy_registry, tmp_path_factory) -> Path:
    """The toy model trained for one epoch on a few real X-rays, by the real training code."""
    from cxrlens.runs import TrainConfig
    from cxrlens.train import train

    out = tmp_path_factory.mktemp("toy") / TOY_MODEL
    config = TrainConfig(model=TOY_MODEL, out=str(out), epochs=1, image_size=SIZE, max_images=24, batch_size=8,
                         accelerator="cpu")
    return train(config, progress=False)


def test_a_taken_method_name_is_refused_unless_replaced(toy_registry) -> None:
    register = register_method(TOY_METHOD, description="another", defaults={"power": 1.0, "guided": False})
    with pytest.raises(CxrlensError, match=f"an attribution method '{TOY_METHOD}' is already registered"):
        register(toy_gradient_power)
    original = METHODS[TOY_METHOD]
    register_method(TOY_METHOD, description="another", defaults={"power": 1.0, "guided": False},
                    replace=True)(toy_gradient_power)
    assert METHODS[TOY_METHOD].description == "another"
    METHODS[TOY_METHOD] = original  # the other tests use the first registration


def test_toy_method_knows_itself_and_matches_stock_methods(toy_registry, real_batch) -> None:
    method = METHODS[TOY_METHOD]
    assert method.cost == "gradient" and not method.batched_targets and not method.has_convergence_delta()
    assert not method.needs_rewrite() and method.needs_rewrite({"guided": True}) and not method.signed()
    smooth = METHODS["smoothgrad"]  # SmoothGrad wraps it: the toy's capabilities flow through
    assert smooth.needs_rewrite({"base": TOY_METHOD, "base_params": {"guided": True}})
    assert not smooth.needs_rewrite({"base": TOY_METHOD}) and not smooth.signed({"base": TOY_METHOD})
    assert smooth.interactive_params(SIZE, {"base": TOY_METHOD})["base_params"] == {"power": 1.0}

    torch.manual_seed(0)
    model = create_model(TOY_MODEL, 3).eval()
    x = real_batch[0][:3, :, ::2, ::2].contiguous()  # 32 px
    targets = [0, 2]
    # Same gradients, taken one target per call (toy) or all targets from one graph (saliency, where the other
    # target's zero gradient adds exact zeros): the same float32 operations, so equal to rounding (1e-6 is ~8 ulps).
    toy = attribute(model, x, targets, method=TOY_METHOD, per_channel=True)
    saliency = attribute(model, x, targets, method="saliency", per_channel=True)
    torch.testing.assert_close(toy.channel_maps, saliency.channel_maps ** 2, rtol=1e-6, atol=0)
    assert toy.meta["signed"] is False and toy.delta is None
    assert torch.equal(toy.scores, saliency.scores)  # the same forward pass, column by column
    guided = attribute(model, x, targets, method=TOY_METHOD, guided=True, power=1.0, per_channel=True)
    reference = attribute(model, x, targets, method="guided_backprop", per_channel=True)
    torch.testing.assert_close(guided.channel_maps, reference.channel_maps.abs(), rtol=1e-6, atol=0)
    # SmoothGrad over the toy runs the toy once per target on the noisy copies.
    smoothed = attribute(model, x, targets, method="smoothgrad", base=TOY_METHOD, n_samples=2)
    assert smoothed.maps.shape == (3, 2, SIZE, SIZE) and bool((smoothed.maps >= 0).all())


def test_toy_model_spec_drives_training_demo_and_grad_cam(toy_run) -> None:
    from cxrlens.runs import load_run

    run = load_run(toy_run)
    assert isinstance(run.model, ToyCNN) and run.config.model == TOY_MODEL
    assert MODELS[TOY_MODEL].demo_epochs == 1  # what `cxrlens demo` trains it for (no table to edit)
    x = torch.rand(1, 3, SIZE, SIZE)
    assert attribute(run.model, x, [0], method="grad_cam", model_name=TOY_MODEL).meta["layer"] == "stem"
    assert attribute(run.model, x, [0], method="grad_cam").meta["layer"] == "block"  # unregistered: last stage


def test_cli_explain_with_toy_model_and_method(toy_run, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "explain"
    code, stdout, err = run_cli(monkeypatch, capsys, "explain", "--run", str(toy_run), "--data", str(CXR3),
                                "--max-images", "2", "--methods", f"{TOY_METHOD},grad_cam,saliency",
                                "--targets", "COVID-19,Normal", "--out", str(out))
    assert code == 0, err
    assert "explained 2 image(s) with 1 model(s)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["models"][TOY_MODEL]["methods"]
    assert methods[TOY_METHOD]["params"] == {"power": 2.0, "guided": False} and methods[TOY_METHOD]["signed"] is False
    assert methods["grad_cam"]["layer"] == "stem"
    image = summary["images"][0]
    maps = np.load(out / "maps" / image / TOY_MODEL / f"{TOY_METHOD}.npy")
    assert maps.shape == (2, SIZE, SIZE) and (maps >= 0).all() and maps.max() > 0
    assert (out / "overlays" / image / TOY_MODEL / f"{TOY_METHOD}__Normal.png").is_file()
    # The job's config is kept beside its outputs and reads back to the same job.
    config = ExplainConfig.load(out)
    assert config.runs == [str(toy_run)] and config.max_images == 2 and config.targets == "COVID-19,Normal"
    assert list(config.methods) == [TOY_METHOD, "grad_cam", "saliency"]
    assert config.settings.output == "sigmoid"
    # The HTML report shows the toy method's maps like any other's.
    from cxrlens.report import ReportConfig, build_report

    html = build_report(ReportConfig([toy_run], tmp_path / "report.html", explain=out)).read_text()
    section = html[html.index('<section id="explain">'):]
    assert TOY_METHOD in section[: section.index("</section>")]


def test_scorecard_asks_the_method_whether_to_rewrite(toy_run, tmp_path, monkeypatch) -> None:
    import cxrlens.explain
    from cxrlens.score import ScoreConfig, run_scorecard

    rewrites: list[str] = []
    real = cxrlens.explain.make_explainable

    def counted(model: nn.Module, example: torch.Tensor) -> nn.Module:  # the real rewrite, counted
        rewrites.append(type(model).__name__)
        return real(model, example)

    monkeypatch.setattr(cxrlens.explain, "make_explainable", counted)
    config = ScoreConfig(methods=[TOY_METHOD], method_params={TOY_METHOD: {"guided": True}}, shortcut=False,
                         max_images=4, steps=4, sanity_images=1, robustness_images=1, bootstrap=20)
    card = run_scorecard([toy_run], tmp_path / "card", config)
    assert rewrites == ["ToyCNN"]  # once per model, because the method said it needs the rewrite with these params
    assert set(card.table["method"]) == {TOY_METHOD} and card.table["lung_focus"].notna().all()


def test_web_app_offers_the_toy_method_with_its_ui_parameters(toy_run, tmp_path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cxrlens.serve import create_app

    client = TestClient(create_app([toy_run], ratings_db=tmp_path / "ratings.sqlite"), base_url="http://localhost")
    listed = {m["name"]: m for m in client.get("/api/info").json()["methods"]}
    assert listed[TOY_METHOD]["params"] == [{"name": "power", "type": "float", "default": 1.0, "min": 0.5, "max": 4.0}]
    assert listed[TOY_METHOD]["signed"] is False and listed[TOY_METHOD]["cost"] == "gradient"
    base = next(p for p in listed["smoothgrad"]["params"] if p["name"] == "base")
    assert TOY_METHOD in base["choices"]
    uploaded = client.post("/api/predict", files={"file": ("x.jpg", XRAY.read_bytes(), "image/jpeg")})
    upload_id = uploaded.json()["upload_id"]
    body = client.post("/api/explain", json={"upload_id": upload_id, "method": TOY_METHOD, "cls": "COVID-19"}).json()
    assert body["description"] == METHODS[TOY_METHOD].description
    assert body["maps"][0]["params"] == {"power": 1.0, "guided": False}  # the interactive value, not the default 2.0
