"""The HTML report: one self-contained file with the tables and figures of real run-folder outputs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CXR3
from conftest import make_run as make_untrained_run

CHROMIUM = Path("/usr/bin/chromium")


def make_run(path: Path, seed: int, size: int = 64) -> Path:
    """A run folder with untrained weights and a three-epoch history.csv as training writes it."""
    make_untrained_run(path, seed, size)
    history = pd.DataFrame({
        "epoch": [0, 1, 2], "step": [10, 20, 30], "train_loss": [0.69, 0.55, 0.41], "val_loss": [0.68, 0.6, 0.52],
        "val_f1/COVID-19": [0.1, 0.4, 0.6], "val_f1/Pneumonia": [0.5, 0.6, 0.7], "val_f1/Normal": [0.2, 0.5, 0.8],
        "lr": [1e-3, 5e-4, 1e-4], "seconds": [3.0, 3.1, 3.2],
    })
    history.to_csv(path / "history.csv", index=False)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """Run folders with evaluations, an ensemble, explanations, NAP-style and scorecard outputs and
    ratings, each written by the project's own writers where that is cheap."""
    from cxrlens.data import XrayDataset, load_manifest
    from cxrlens.ensemble import combine
    from cxrlens.evaluate import write_evaluation
    from cxrlens.explain.report import explain_images
    from cxrlens.runs import load_run
    from cxrlens.serve.ratings import RatingsStore

    root = tmp_path_factory.mktemp("report")
    runs = [make_run(root / "resnet18-a", 1), make_run(root / "resnet18-b", 2)]
    config = json.loads((runs[1] / "config.json").read_text())  # as --allow-leaks records what it let through
    config.update(allow_leaks=True, leaks=["rows 2 (train), 9 (test): one patient in two splits"])
    (runs[1] / "config.json").write_text(json.dumps(config))
    test = load_manifest(CXR3).split("test")
    classes = list(test.taxonomy.classes)
    rng = np.random.default_rng(0)
    probs = []
    for k, run in enumerate(runs):  # scores that rank positives higher, so AUROCs are meaningful
        p = np.clip(0.25 + 0.5 * test.targets + rng.normal(0, 0.2 + 0.1 * k, test.targets.shape), 0, 1)
        probs.append(p)
        write_evaluation(run / "eval-test", f"{run.name} [test]", p, test.targets, test.frame, classes, 0.51)
    stacked = np.stack(probs)
    thresholds = np.full((2, len(classes)), 0.51)
    for vote in ("soft", "majority"):
        scores, t = combine(stacked, vote, thresholds)
        write_evaluation(root / "ensemble" / vote, f"{vote} vote [test]", scores, test.targets, test.frame, classes, t)

    models = {runs[0].name: load_run(runs[0]).model}  # one model keeps the fixture fast
    one = XrayDataset(test.select(np.arange(len(test)) == 0), 64)
    explain_images(models, one[0][0][None], classes, ["saliency"], ["COVID-19"], root / "explain", image_ids=["img0"])

    nap = root / "nap"  # nap_stats.json as cxrlens.nap.run_nap writes it (the layout its result_stats returns)
    nap.mkdir()
    (nap / "nap_stats.json").write_text(json.dumps({"classes": classes, "files": [], "models": {
        "resnet18-a": {"groups": [{"name": "COVID-19", "expression": "COVID-19", "images": 53}],
                       "layers": {"layer4": {"shape": [512, 2, 2], "dead_maps": 12, "dead_share": 12 / 512}}}}}))
    (nap / "nap_dead_maps.png").write_bytes((root / "resnet18-a" / "eval-test" / "roc.png").read_bytes())

    score = root / "score"  # the two files of cxrlens.score.scorecard the report reads as text
    score.mkdir()
    (score / "verdicts.json").write_text(json.dumps({"resnet18-a": {
        "summary": "resnet18-a: shortcut risk high (source decodable)", "statements": ["a probe tells the source"],
        "flags": ["source decodable"]}}))
    pd.DataFrame({"model": ["resnet18-a", "resnet18-b"], "method": ["saliency", "saliency"], "class": ["COVID-19"] * 2,
                  "lung_focus": [0.41, 0.63]}).to_csv(score / "scorecard.csv", index=False)

    store = RatingsStore(root / "ratings.sqlite")
    for rater, scores_ in (("r1", (5, 1)), ("r2", (4, 1)), ("r3", (5, 2))):
        store.add(rater, "img0.jpg", "COVID-19", [("resnet18-a", "saliency", scores_[0]),
                                                  ("resnet18-b", "grad_cam", scores_[1])])
    return {"root": root, "runs": runs, "classes": classes}


@pytest.fixture(scope="module")
def report(study) -> tuple[Path, str]:
    from cxrlens.report import ReportConfig, build_report

    root = study["root"]
    out = build_report(ReportConfig(
        study["runs"], root / "out" / "report.html", data=CXR3, ensemble=root / "ensemble", explain=root / "explain",
        nap=root / "nap", score=root / "score", ratings=root / "ratings.sqlite"))
    return out, out.read_text()


def test_report_is_self_contained(report):
    path, text = report
    assert path.is_file() and list(path.parent.iterdir()) == [path]  # atomic: no temporary files left
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text, re.I)
    assert "@import" not in text and "url(" not in text


def test_report_embeds_every_figure_with_a_caption(report):
    _, text = report
    figures = re.findall(r"<figure>(.*?)</figure>", text, re.S)
    # curves + 2 runs x (confusion, roc) + 2 votes x (confusion, roc) + explain grid + NAP figure
    assert len(figures) >= 11
    for figure in figures:
        src = re.search(r'src="data:image/png;base64,([^"]+)"', figure)
        assert src, figure[:200]
        assert base64.b64decode(src.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
        caption = re.search(r"<figcaption>(.*?)</figcaption>", figure, re.S)
        assert caption and len(caption.group(1)) > 30


def test_report_tables_hold_the_numbers(report, study):
    _, text = report
    for table_id in ("run-settings", "data-classes", "data-sources", "f1-ours", "f1-study", "class-metrics", "nap-dead",
                     "scorecard-table", "ratings-by_model", "ratings-by_method"):
        assert f'id="{table_id}"' in text, table_id
    assert text.count('class="sortable"') >= 10 and "table.sortable" in text
    metrics = json.loads((study["runs"][0] / "eval-test" / "metrics.json").read_text())
    ours = re.search(r'id="f1-ours".*?</table>', text, re.S).group(0)
    row = re.search(r"<tr><td>resnet18-a</td>(.*?)</tr>", ours).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[:3] == [f"{metrics['classes'][c]['f1']:.3f}" for c in study["classes"]]
    for label in ("soft vote", "majority vote"):
        assert f"<td>{label}</td>" in ours
    study_table = re.search(r'id="f1-study".*?</table>', text, re.S).group(0)
    assert "<td>ResNet18</td><td>0.875</td><td>0.936</td><td>0.891</td>" in study_table  # paper.md, fold 0
    assert "0.888" in study_table  # ensemble, COVID-19 F1 mean over folds
    assert "shortcut risk high" in text and "0.630" in text  # verdict and scorecard cell
    assert "Fleiss&#x27; kappa" in text or "Fleiss' kappa" in text
    assert "12" in re.search(r'id="nap-dead".*?</table>', text, re.S).group(0)
    audit = re.search(r'id="data-audit".*?</table>', text, re.S).group(0)
    assert "<td>leaks between splits</td><td>0</td>" in audit  # the vendored split is clean
    allowed = re.search(r'id="run-leaks".*?</table>', text, re.S).group(0)
    assert "<td>resnet18-b</td><td>1</td>" in allowed and "one patient in two splits" in allowed
    assert "resnet18-a" not in allowed


def test_report_says_which_command_makes_missing_outputs(tmp_path):
    from cxrlens.report import ReportConfig, build_report

    run = make_run(tmp_path / "fresh", 3)
    text = build_report(ReportConfig([run], tmp_path / "r.html", score=tmp_path / "nothing",
                                     ratings=tmp_path / "none.sqlite")).read_text()
    assert "cxrlens evaluate --run" in text
    assert "run `cxrlens score`" in text
    assert "reader study in `cxrlens serve`" in text


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (run scripts/install_browser.sh)")
def test_report_tables_sort_in_a_browser(report):
    sync_api = pytest.importorskip("playwright.sync_api")
    path, _ = report
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        page.goto(path.as_uri())
        column = "#class-metrics tbody td:nth-child(6)"  # F1
        page.click("#class-metrics th:nth-child(6)")
        values = [float(v) for v in page.locator(column).all_text_contents()]
        assert values == sorted(values)
        page.click("#class-metrics th:nth-child(6)")
        values = [float(v) for v in page.locator(column).all_text_contents()]
        assert values == sorted(values, reverse=True)
        browser.close()
