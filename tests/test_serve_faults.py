"""The web server against bad requests and abandoned work.

A corpus of hostile or broken requests, each answered with its status code while the server keeps
answering; explanation jobs with progress and cancellation; and clients that leave: their queued work
is dropped and running work stops at the next forward pass, so the next user does not wait for it.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from conftest import CXR3, XRAY, make_run
from PIL import Image
from serve_helpers import LOCAL, dicom_bytes, live_server, png_with_size, upload, wait_for

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

MB = 1024 * 1024


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("faults")
    return [make_run(root / "resnet18-a", 1), make_run(root / "resnet18-b", 2)]


def _app(runs: list[Path]):
    from cxrlens.serve import create_app

    return create_app(runs, data=CXR3, ratings_db=runs[0].parent / "ratings.sqlite", max_upload_mb=1,
                      max_waiting=8, study_images=2, study_methods=("saliency",), allowed_hosts=("xrays.example.org",))


@pytest.fixture(scope="module")
def app(runs):
    return _app(runs)


@pytest.fixture(scope="module")
def live_app(runs):
    """Its own app: a live server's shutdown closes the app's queue."""
    return _app(runs)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app, base_url=LOCAL)


def _png_of_xray() -> bytes:
    buffer = io.BytesIO()
    Image.open(XRAY).convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


def _ratings(client, **body):
    return client.post("/api/ratings", json={"rater": "ann", "image_id": "a.jpg",
                                             "ratings": [{"token": "forged", "score": 3}], **body})


JPEG = XRAY.read_bytes()
with warnings.catch_warnings():  # pydicom warns that NaN is no valid DS value: that is the point
    warnings.simplefilter("ignore")
    NAN_DICOM = dicom_bytes(np.full((32, 32), 100), RescaleSlope="NaN")
# name -> (request, expected status)
FAULTS = {
    "oversize upload": (lambda c: upload(c, b"\xff\xd8\xff" + bytes(2 * MB)), 413),
    "png bomb": (lambda c: upload(c, png_with_size(30_000, 30_000), "bomb.png", "image/png"), 413),
    "dicom bomb": (lambda c: upload(c, dicom_bytes(np.zeros((4, 4)), rows=60_000, cols=60_000), "b.dcm"), 413),
    "truncated jpeg": (lambda c: upload(c, JPEG[: len(JPEG) // 2]), 400),
    "truncated png": (lambda c: upload(c, _png_of_xray()[:5000], "cut.png", "image/png"), 400),
    "zero bytes": (lambda c: upload(c, b""), 400),
    "text renamed .png": (lambda c: upload(c, b"name,finding\na.png,covid\n", "x.png", "image/png"), 415),
    "corrupt dicom": (lambda c: upload(c, bytes(128) + b"DICM" + bytes(300), "x.dcm"), 400),
    "dicom with NaN slope": (lambda c: upload(c, NAN_DICOM, "nan.dcm", "application/dicom"), 400),
    "traversal in static": (lambda c: c.get("/static/..%2F..%2Fengine.py"), 404),
    "traversal in dataset": (lambda c: c.get("/api/dataset/..%2F..%2Fetc%2Fpasswd/image"), 404),
    "xss in rater": (lambda c: c.get("/api/study/next", params={"rater": "<script>alert(1)</script>"}), 422),
    "sql in rater": (lambda c: _ratings(c, rater="x'; DROP TABLE ratings; --"), 422),
    "sql in image id": (lambda c: _ratings(c, image_id="a.jpg'; DROP TABLE ratings; --"), 400),
    "malformed json": (lambda c: c.post("/api/explain", content=b"{", headers={"content-type": "application/json"}),
                       422),
    "unknown method": (lambda c: c.post("/api/explain", json={"index": 0, "method": "rm -rf", "cls": "Normal"}), 400),
    "unknown class": (lambda c: c.post("/api/jobs/explain", json={"index": 0, "cls": "Cancer"}), 400),
    "unknown job": (lambda c: c.get("/api/jobs/" + "x" * 16), 404),
    "foreign host (DNS rebinding)": (lambda c: c.get("/api/ratings.csv", headers={"host": "evil.example"}), 400),
    "foreign origin upload": (lambda c: upload(c, JPEG, headers={"origin": "http://evil.example"}), 403),
    "other port of the same host": (lambda c: upload(c, JPEG, headers={"origin": "http://localhost:8080"}), 403),
    "opaque origin": (lambda c: upload(c, JPEG, headers={"origin": "null"}), 403),
    "cross-site fetch": (lambda c: c.delete("/api/jobs/x", headers={"sec-fetch-site": "cross-site"}), 403),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_request_gets_its_status_and_the_server_goes_on(client, fault):
    send, status = FAULTS[fault]
    response = send(client)
    assert response.status_code == status, response.text
    if response.headers["content-type"].startswith("application/json"):
        assert response.json()["detail"]
    assert client.get("/api/info").status_code == 200


def test_after_the_corpus_the_server_still_predicts_and_keeps_its_ratings(client):
    for send, _ in FAULTS.values():
        send(client)
    assert upload(client, JPEG).status_code == 200
    assert client.get("/api/ratings.csv").text.startswith('"rater","time"')  # the table is still there


def test_served_host_names_and_same_origin_requests_pass(client):
    for host in ("localhost", "127.0.0.1:8000", "[::1]:8000", "xrays.example.org"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    assert upload(client, JPEG, headers={"origin": "http://localhost"}).status_code == 200  # the app's own page
    assert upload(client, JPEG, headers={"sec-fetch-site": "same-origin"}).status_code == 200
    assert upload(client, JPEG).status_code == 200  # curl sends no Origin
    assert client.get("/api/info", headers={"origin": "http://evil.example"}).status_code == 200  # reads: SOP


def test_host_names_of_a_bind_address_and_bad_ones():
    from cxrlens.errors import CxrlensError
    from cxrlens.serve.app import hosts_for_bind
    from cxrlens.serve.state import ServeConfig

    assert hosts_for_bind("127.0.0.1", ()) == () and hosts_for_bind("::1", ("a.lan",)) == ("a.lan",)
    assert hosts_for_bind("192.168.1.5", ()) == ("192.168.1.5",)  # a specific address: its own name
    assert hosts_for_bind("0.0.0.0", ()) == ()  # a wildcard: only the names given with --allowed-host
    assert ServeConfig(allowed_hosts=("Xrays.Example.org", "fe80::1")).hosts[3:] == ["xrays.example.org", "[fe80::1]"]
    for bad in ("*", "evil.example/path", "a.*.lan", ""):
        with pytest.raises(CxrlensError, match="not a host name"):
            ServeConfig(allowed_hosts=(bad,))


def test_ratings_csv_escapes_formulas(client, app):
    app.state.cxrlens.store.add("@evil", "=HYPERLINK(\"http://evil.example\")", "+cls",
                                [("-2+3", "\tmethod", 4), ("plain", "saliency", 5)])
    rows = list(csv.DictReader(io.StringIO(client.get("/api/ratings.csv").text)))
    mine = [r for r in rows if r["rater"].endswith("@evil")]
    assert len(mine) == 2
    for row in mine:
        assert row["rater"] == "'@evil" and row["cls"] == "'+cls"
        assert row["image_id"] == "'=HYPERLINK(\"http://evil.example\")"
    assert {r["model"] for r in mine} == {"'-2+3", "plain"}
    assert {r["method"] for r in mine} == {"'\tmethod", "saliency"}
    assert {r["score"] for r in mine} == {"4", "5"}


# --- jobs: progress and cancellation -------------------------------------------------------------


class Hold:
    """Stops the worker at the first forward pass of one model until released, and counts the passes
    (``hold=False``: only counts)."""

    def __init__(self, model, hold: bool = True) -> None:
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0
        if not hold:
            self.release.set()
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(60), "the test never released the model"

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.handle.remove()


def _poll(client, job_id: str, until: set[str]) -> dict:
    status = {}

    def reached() -> bool:
        nonlocal status
        status = client.get(f"/api/jobs/{job_id}").json()
        return status["state"] in until

    wait_for(reached, f"job state in {until}")
    return status


def test_explain_job_reports_each_model_as_it_finishes(client, app):
    bank = app.state.cxrlens.bank
    with Hold(bank.members[1].run.model) as hold:
        job = client.post("/api/jobs/explain", json={"index": 0, "method": "occlusion", "cls": "Normal"})
        assert job.status_code == 202, job.text
        assert hold.entered.wait(60)
        midway = client.get(f"/api/jobs/{job.json()['id']}").json()
        assert midway["state"] == "running" and midway["models_total"] == 2
        assert midway["models_done"] == 1 and [m["model"] for m in midway["maps"]] == ["resnet18-a"]
        assert midway["estimate_seconds"] is not None and midway["estimate_seconds"] >= 0
    done = _poll(client, job.json()["id"], {"done", "failed"})
    assert done["state"] == "done" and done["models_done"] == 2 and done["estimate_seconds"] == 0
    whole = client.post("/api/explain", json={"index": 0, "method": "occlusion", "cls": "Normal"}).json()
    assert [m["heatmap"] for m in done["maps"]] == [m["heatmap"] for m in whole["maps"]]  # same maps either way


def test_cancelling_a_queued_job_drops_it_and_a_running_one_stops_it(client, app):
    queue = app.state.cxrlens.queue
    before = dict(queue.stats)
    gate = threading.Event()
    queue.submit(lambda job: gate.wait(60), "gate")
    queued = client.post("/api/jobs/explain", json={"index": 0, "method": "saliency", "cls": "Normal"}).json()
    assert queued["state"] == "queued" and queued["position"] == 1
    assert client.delete(f"/api/jobs/{queued['id']}").json()["state"] == "cancelled"
    gate.set()
    wait_for(lambda: queue.stats["dropped"] == before.get("dropped", 0) + 1, "the cancelled job to be dropped")

    with Hold(app.state.cxrlens.bank.members[0].run.model) as hold:
        running = client.post("/api/jobs/explain", json={"index": 1, "method": "occlusion", "cls": "Normal"}).json()
        assert hold.entered.wait(60)
        assert client.delete(f"/api/jobs/{running['id']}").json()["state"] == "running"  # stops at the next pass
    stopped = _poll(client, running["id"], {"cancelled", "done", "failed"})
    assert stopped["state"] == "cancelled" and stopped["models_done"] == 0
    assert hold.calls == 1  # no forward pass ran after the one that was held
    assert queue.stats["started"] == before.get("started", 0) + 2  # the gate and the stopped job


def test_a_job_nobody_polls_is_dropped(tmp_path):
    from cxrlens.serve import create_app

    app = create_app([make_run(tmp_path / "r", 3)], data=CXR3, ratings_db=tmp_path / "r.sqlite",
                     abandon_after_s=0.05)
    client, queue = TestClient(app, base_url=LOCAL), app.state.cxrlens.queue
    gate = threading.Event()
    queue.submit(lambda job: gate.wait(60), "gate")
    job = client.post("/api/jobs/explain", json={"index": 0, "method": "saliency", "cls": "Normal"}).json()
    wait_for(lambda: queue.pending == 1, "the unpolled job to give up its place")
    gate.set()
    wait_for(lambda: queue.stats["dropped"] == 1, "the worker to drop the job")
    assert queue.stats["started"] == 1 and client.get(f"/api/jobs/{job['id']}").json()["state"] == "cancelled"


# --- clients that leave, against a real server ---------------------------------------------------


def _open_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a complete POST on a raw connection and leave it open without reading the answer."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_abandoned_requests_do_not_delay_the_next_predict(live_app):
    """N explanations whose clients gave up while one job ran: the next predict waits for that one
    job only; none of the N is started."""
    queue, n = live_app.state.cxrlens.queue, 6
    before = dict(queue.stats)
    gate = threading.Event()
    with live_server(live_app) as url:
        running = queue.submit(lambda job: gate.wait(60), "slow job")
        wait_for(lambda: running.state == "running", "the slow job to start")
        sockets = [_open_request(url, "/api/explain", {"index": i, "method": "occlusion", "cls": "Normal"})
                   for i in range(n)]
        wait_for(lambda: queue.pending == 1 + n, "the abandoned requests to be queued")
        for sock in sockets:
            sock.close()
        wait_for(lambda: queue.pending == 1, "the server to notice the clients left")
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            response=httpx.post(url + "/api/predict", files={"file": ("x.jpg", JPEG, "image/jpeg")}, timeout=120)))
        thread.start()
        wait_for(lambda: queue.pending == 2, "the predict to be queued")
        gate.set()
        thread.join(120)
    assert result["response"].status_code == 200
    assert queue.stats["started"] == before.get("started", 0) + 2  # the slow job and the predict, nothing else
    assert queue.stats["dropped"] == before.get("dropped", 0) + n


def test_a_running_explanation_stops_when_its_client_leaves(live_app):
    queue, bank = live_app.state.cxrlens.queue, live_app.state.cxrlens.bank
    cancelled = queue.stats["cancelled"]
    with live_server(live_app) as url, Hold(bank.members[0].run.model) as hold, \
            Hold(bank.members[1].run.model, hold=False) as other:
        sock = _open_request(url, "/api/explain", {"index": 0, "method": "occlusion", "cls": "Normal"})
        assert hold.entered.wait(60)
        sock.close()
        wait_for(lambda: queue.running is not None and queue.running.cancel_requested, "the disconnect")
        hold.release.set()
        wait_for(lambda: queue.stats["cancelled"] == cancelled + 1, "the job to stop")
        assert hold.calls == 1 and other.calls == 0  # stopped at the next forward pass, second model never ran
        assert httpx.post(url + "/api/predict", files={"file": ("x.jpg", JPEG, "image/jpeg")},
                          timeout=120).status_code == 200
