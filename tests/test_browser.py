"""The web app in a real browser: Debian's headless Chromium driven by Playwright against uvicorn.

Screenshots go to a temporary folder; set CXRLENS_SCREENSHOTS=docs to refresh docs/screenshot-*.png.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import CXR3, XRAY, make_run
from serve_helpers import live_server

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed at /usr/bin/chromium (run scripts/install_browser.sh)",
                allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is not installed (pip install '.[test]')")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from cxrlens.serve import create_app

    root = tmp_path_factory.mktemp("browser")
    runs = [make_run(root / "resnet18-a", 1), make_run(root / "resnet18-b", 2)]
    return create_app(runs, data=CXR3, ratings_db=root / "ratings.sqlite", study_images=3,
                      study_methods=("grad_cam", "saliency"))


@pytest.fixture(scope="module")
def server(app):
    """uvicorn serving the app on a free loopback port, in a thread of this process."""
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.errors = errors
        yield page
        browser.close()


def wait_until(page, script: str, timeout: float = 30.0) -> None:
    """Poll a JS function until it returns true. Playwright's wait_for_function evaluates strings with
    eval(), which the app's Content-Security-Policy (rightly) forbids; evaluate() is not affected."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {script}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("CXRLENS_SCREENSHOTS")
    folder = ROOT / target if target else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_upload_predict_explain_and_slider(server, page, shots):
    page.goto(server + "/")
    page.set_input_files("#file", str(XRAY))
    page.click("#upload-button")
    table = page.locator("#predictions-table")
    table.wait_for()
    names = table.locator("tbody td:first-child").all_text_contents()
    assert names == ["resnet18-a", "resnet18-b", "soft vote", "majority vote"]

    overlays = page.locator("#heatmaps img.overlay")
    overlays.nth(1).wait_for()
    assert overlays.count() == 2
    wait_until(page, "() => [...document.querySelectorAll('#heatmaps img')]"
                     ".every(i => i.complete && i.naturalWidth > 0)")
    assert "grad cam" in page.locator("#explain-caption").text_content()

    # move the slider with the mouse, as a user would: the overlays follow
    slider = page.locator("#opacity")
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2)
    value = int(slider.input_value())
    assert 5 <= value <= 35
    opacity = float(overlays.first.evaluate("img => getComputedStyle(img).opacity"))
    assert opacity == pytest.approx(value / 100, abs=0.011)
    assert page.locator("#opacity-value").text_content() == f"{value} %"
    page.keyboard.press("End")
    assert float(overlays.last.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(1.0)
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")  # 1 %: the X-ray shows through
    for _ in range(54):
        page.keyboard.press("ArrowRight")
    assert slider.input_value() == "55"

    # another method and class re-explains
    page.select_option("#method", "saliency")
    wait_until(page, "() => document.querySelector('#explain-caption').textContent.startsWith('saliency')")
    assert overlays.count() == 2
    page.screenshot(path=str(shots / "screenshot-upload.png"), full_page=True)

    # a bad upload shows the server's message, not a crash
    page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
    page.click("#upload-button")
    wait_until(page, "() => document.querySelector('#status').classList.contains('error')")
    assert "not a PNG, JPEG or DICOM" in page.locator("#status").text_content()
    assert not [e for e in page.errors if "415" not in e], page.errors


def test_browse_test_split_with_filters(server, page, shots):
    page.goto(server + "/browse")
    cards = page.locator("#grid .card")
    cards.first.wait_for()
    total = int(page.locator("#count").text_content().split(" of ")[1].split()[0])
    assert total > 100
    page.select_option("#filter-class", "COVID-19")
    wait_until(page, "() => { const cards = [...document.querySelectorAll('#grid .card')]; "
                     "return cards.length > 0 && cards.every(c => c.textContent.includes('COVID-19')); }")
    cards.first.click()
    truth_row = page.locator("#detail-predictions tbody tr").first
    truth_row.wait_for()
    assert truth_row.locator("td").first.text_content() == "ground truth"
    page.locator("#heatmaps img.overlay").nth(1).wait_for()
    wait_until(page, "() => [...document.querySelectorAll('#grid img')].slice(0, 6).every(i => i.complete)")
    page.screenshot(path=str(shots / "screenshot-browse.png"), full_page=False)


def test_reader_study_rating_reaches_the_csv_export(server, page, shots):
    page.goto(server + "/study")
    page.fill("#rater", "Dr Test")
    page.click("#start")
    maps = page.locator(".study-map")
    maps.nth(3).wait_for()
    assert maps.count() == 4  # 2 models x 2 methods, anonymised as A-D
    assert page.locator("#progress").text_content() == "image 1 of 3"
    labels = maps.locator("h3").all_text_contents()
    assert sorted(labels) == ["Map A", "Map B", "Map C", "Map D"]
    submit = page.locator("#submit")
    assert submit.is_disabled()
    for i in range(4):
        maps.nth(i).locator("label").nth(i % 5).click()  # scores 1, 2, 3, 4 in display order
    assert submit.is_enabled()
    page.screenshot(path=str(shots / "screenshot-study.png"), full_page=True)
    submit.click()
    wait_until(page, "() => document.querySelector('#progress').textContent === 'image 2 of 3'")

    with page.expect_download() as download_info:
        page.click("#export")
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    mine = [r for r in rows if r["rater"] == "Dr Test"]
    assert len(mine) == 4
    assert sorted(int(r["score"]) for r in mine) == [1, 2, 3, 4]
    assert {r["model"] for r in mine} == {"resnet18-a", "resnet18-b"}
    assert {r["method"] for r in mine} == {"grad_cam", "saliency"}

    page.click("#summary-box summary")
    page.locator("#summary table").first.wait_for()
    assert "Fleiss' kappa" in page.locator("#summary").text_content()


def test_long_explanation_shows_each_model_and_cancel_frees_the_worker(server, app, page):
    """The second model's first forward pass waits until the test lets it go: the page must show the
    first model's map with the progress line, and Cancel must stop the job there."""
    state = app.state.cxrlens
    page.goto(server + "/")
    page.set_input_files("#file", str(XRAY))
    page.click("#upload-button")
    wait_until(page, "() => document.querySelectorAll('#heatmaps img.overlay').length === 2")
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        assert release.wait(60), "the test never released the model"

    cancelled_before, errors_before = state.queue.stats["cancelled"], len(page.errors)
    handle = state.bank.members[1].run.model.register_forward_pre_hook(hold)
    try:
        page.select_option("#method", "occlusion")
        assert entered.wait(60)
        wait_until(page, "() => document.querySelectorAll('#heatmaps img.overlay').length === 1 && "
                         "document.querySelector('#explain-status').textContent.includes('1 of 2 models done')")
        assert "s left" in page.locator("#explain-status").text_content()  # estimated from the first model
        cancel = page.locator("#explain-cancel")
        assert cancel.is_visible()
        cancel.click()
        wait_until(page, "() => document.querySelector('#explain-status').textContent === 'cancelling ...'")
    finally:
        release.set()
        handle.remove()
    wait_until(page, "() => document.querySelector('#explain-status').textContent.includes('cancelled after 1 of 2')")
    assert state.queue.stats["cancelled"] == cancelled_before + 1  # stopped inside the second model
    assert page.locator("#heatmaps img.overlay").count() == 1
    assert not page.locator("#explain-cancel").is_visible()
    page.select_option("#method", "saliency")  # the worker is free again
    wait_until(page, "() => document.querySelector('#explain-caption').textContent.startsWith('saliency')")
    assert page.locator("#heatmaps img.overlay").count() == 2
    assert not page.errors[errors_before:], page.errors
