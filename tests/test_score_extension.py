"""A scorecard metric registered from outside cxrlens is a new column everywhere: the per-image rows,
the table with its bootstrap interval, the markdown, the JSON with its facts, the rankings in its
direction, and the HTML report; no cxrlens file is edited."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LUNGMASKS, make_run

from cxrlens.score import SCORECARD_METRICS, MetricInputs, ScoreConfig, mass_share, register_metric, run_scorecard

TOY = "toy_outside_lungs"


@pytest.fixture
def toy_metric():
    @register_metric(TOY, higher_is_better=False, needs_model=False, map_sign="positive")
    def outside_lungs(x: MetricInputs) -> torch.Tensor:
        """Share of the positive attribution outside the lungs."""
        return mass_share(x.maps, ~x.masks["lungs"])

    yield outside_lungs
    SCORECARD_METRICS.pop(TOY)


def test_toy_metric_registered_outside_the_package_runs_end_to_end(toy_metric, tmp_path):
    from cxrlens.report import ReportConfig, build_report

    runs = [make_run(tmp_path / "runs" / name, seed) for name, seed in (("a", 1), ("b", 2))]
    out = tmp_path / "card"
    config = ScoreConfig(masks=str(LUNGMASKS), methods=["saliency"], max_images=3, steps=2, sanity_images=0,
                         robustness_images=0, bootstrap=20, shortcut=False, rank_by=[TOY, "lung_focus"])
    card = run_scorecard(runs, out, config)

    # computed per image: the positive mass outside the lungs is 1 - the mass inside (float64 sums of
    # the same 64 x 64 pixels, so they agree to rounding: 1e-12)
    images = pd.read_csv(out / "images.csv")
    assert images[TOY].notna().all()
    np.testing.assert_allclose(images[TOY], images["outside_lungs"], rtol=0, atol=1e-12)
    # summarised with its interval, after the built-in columns
    table = pd.read_csv(out / "scorecard.csv")
    assert {TOY, f"{TOY}_low", f"{TOY}_high", f"{TOY}_n"} <= set(table)
    assert (table[f"{TOY}_low"] <= table[TOY]).all() and (table[TOY] <= table[f"{TOY}_high"]).all()
    assert list(SCORECARD_METRICS)[-1] == TOY and f"| {TOY} |" in (out / "scorecard.md").read_text()
    # its facts and its direction: lower is better, so the model with less evidence outside ranks first
    saved = json.loads((out / "scorecard.json").read_text())
    assert saved["metrics"][TOY] == {"higher_is_better": False, "needs_model": False, "map_sign": "positive",
                                     "description": "Share of the positive attribution outside the lungs."}
    ranking = card.rankings[TOY]
    assert [r["rank"] for r in ranking] == [1, 2] and ranking[0][TOY] <= ranking[1][TOY]
    focus = card.rankings["lung_focus"]
    assert focus[0]["model"] == ranking[0]["model"]  # the same order read from the other side
    # and the report shows the column
    html = build_report(ReportConfig(runs, tmp_path / "report.html", score=out)).read_text()
    assert TOY in html


def test_registering_a_taken_name_is_refused(toy_metric):
    from cxrlens.errors import CxrlensError

    with pytest.raises(CxrlensError, match="already registered"):
        register_metric(TOY, higher_is_better=True, needs_model=False, map_sign="positive")(toy_metric)
    with pytest.raises(CxrlensError, match="map_sign"):
        register_metric("other", higher_is_better=True, needs_model=False, map_sign="signed")
