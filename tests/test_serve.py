"""The web app's JSON API, through FastAPI's TestClient: real X-rays, hostile uploads, the reader study."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CXR3, XRAY, make_run
from PIL import Image
from serve_helpers import LOCAL, dicom_bytes, png_with_size, upload

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return [make_run(root / "resnet18-a", 1), make_run(root / "resnet18-b", 2)]


@pytest.fixture(scope="module")
def client(runs, tmp_path_factory) -> TestClient:
    from cxrlens.serve import create_app

    db = tmp_path_factory.mktemp("serve-db") / "ratings.sqlite"
    app = create_app(runs, data=CXR3, ratings_db=db, study_images=4, study_methods=("grad_cam", "saliency"))
    return TestClient(app, base_url=LOCAL)


# --- predict -------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_predict_real_xray_matches_the_library(client, runs):
    from cxrlens.data import load_image_tensor
    from cxrlens.runs import load_run, predict

    response = upload(client, XRAY.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["classes"] == ["COVID-19", "Pneumonia", "Normal"]
    assert [m["name"] for m in body["models"]] == ["resnet18-a", "resnet18-b"]
    assert [e["name"] for e in body["ensembles"]] == ["soft vote", "majority vote"]
    assert body["xray"].startswith("data:image/png;base64,")
    expected = np.stack([predict(load_run(r).model, load_image_tensor(XRAY, 64)[None])[0].numpy() for r in runs])
    got = np.array([[m["probs"][c] for c in body["classes"]] for m in body["models"]])
    # The same model and input through another code path (other batches, other kernels): float32 logits
    # agree to (K + L) u with K <= 4,608 terms per output, L ~ 70 layers, u = 6e-8, i.e. 3e-4 of their
    # scale (~1); sigmoids have slope <= 1/4, so 1e-4.
    np.testing.assert_allclose(got, expected, atol=1e-4)
    soft = np.array([body["ensembles"][0]["probs"][c] for c in body["classes"]])
    np.testing.assert_allclose(soft, expected.mean(0), atol=1e-4)
    votes = (expected > 0.51).mean(0)
    majority = body["ensembles"][1]
    for c, v in zip(body["classes"], votes, strict=True):
        assert majority["probs"][c] == pytest.approx(v)
        assert majority["positive"][c] == (v > 0.5)


def test_dicom_upload_predicts_like_the_same_image_as_jpeg(client):
    grey = np.asarray(Image.open(XRAY).convert("L"), dtype=np.uint16) * 16  # 12-bit, as a detector would store
    response = upload(client, dicom_bytes(grey), "scan.dcm", "application/dicom")
    assert response.status_code == 200, response.text
    jpeg = upload(client, XRAY.read_bytes()).json()
    for a, b in zip(response.json()["models"], jpeg["models"], strict=True):
        for c in jpeg["classes"]:  # percentile clipping is scale-invariant: the model inputs are bit-identical
            assert a["probs"][c] == pytest.approx(b["probs"][c], abs=1e-6)  # so the outputs, up to the JSON's rounding


def test_type_is_sniffed_from_content_not_name(client):
    assert upload(client, XRAY.read_bytes(), "misnamed.png", "image/png").status_code == 200


def test_explain_gives_one_heat_map_per_model(client):
    upload_id = upload(client, XRAY.read_bytes()).json()["upload_id"]
    response = client.post("/api/explain", json={"upload_id": upload_id, "method": "grad_cam", "cls": "COVID-19"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "grad_cam" and body["cls"] == "COVID-19"
    assert [m["model"] for m in body["maps"]] == ["resnet18-a", "resnet18-b"]
    import base64

    heat = Image.open(io.BytesIO(base64.b64decode(body["maps"][0]["heatmap"].split(",", 1)[1])))
    assert heat.mode == "RGBA" and heat.size == (64, 64)
    bad = client.post("/api/explain", json={"upload_id": upload_id, "method": "nonsense", "cls": "COVID-19"})
    assert bad.status_code == 400 and "unknown attribution method" in bad.json()["detail"]
    missing = client.post("/api/explain", json={"upload_id": "0" * 20, "method": "saliency", "cls": "Normal"})
    assert missing.status_code == 404
    by_index = client.post("/api/explain", json={"index": 0, "method": "saliency", "cls": "Normal"})
    assert by_index.status_code == 200


# --- hostile uploads -----------------------------------------------------------------------------


def test_oversize_upload_is_refused_with_413(runs, tmp_path):
    from cxrlens.serve import create_app

    small = TestClient(create_app(runs[:1], max_upload_mb=0.05, ratings_db=tmp_path / "r.sqlite"), base_url=LOCAL)
    big = b"\xff\xd8\xff" + bytes(200_000)
    response = upload(small, big)
    assert response.status_code == 413
    assert "limit of" in response.json()["detail"]

    def chunks():  # a well-formed multipart body without Content-Length: the cap must hold while streaming
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n\xff\xd8\xff'
        for _ in range(40):
            yield bytes(10_000)
        yield b"\r\n--x--\r\n"

    streamed = small.post("/api/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413
    assert upload(small, XRAY.read_bytes()).status_code == 200  # 16 kB fits


@pytest.mark.parametrize(
    "make",
    [lambda: png_with_size(30_000, 30_000), lambda: dicom_bytes(np.zeros((4, 4)), rows=60_000, cols=60_000)],
    ids=["png", "dicom"],
)
def test_decompression_bomb_is_refused_before_decoding(client, make):
    response = upload(client, make(), "bomb.png", "image/png")
    assert response.status_code == 413
    assert "megapixels" in response.json()["detail"]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"just some text, not an image", 415),
        (b"GIF89a" + bytes(100), 415),
        (b"", 400),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), 400),  # PNG signature, broken body
        (b"\xff\xd8\xff\xe0" + bytes(100), 400),  # JPEG signature, broken body
        (bytes(128) + b"DICM" + bytes(50), 400),  # DICOM preamble, nothing after it
    ],
    ids=["text", "gif", "empty", "broken-png", "broken-jpeg", "broken-dicom"],
)
def test_bad_uploads_get_a_4xx_with_a_message(client, data, status):
    response = upload(client, data, "file.png", "image/png")
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_no_request_path_reaches_the_file_system(client):
    assert client.get("/static/common.js").status_code == 200
    for path in ("/static/..%2Fapp.py", "/static/%2e%2e/app.py", "/static/app.py", "/api/dataset/-1/image",
                 "/api/dataset/100000/image"):
        assert client.get(path).status_code == 404, path
    assert client.get("/api/dataset/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert client.get("/api/dataset/abc/image").status_code == 422
    assert client.post("/api/predict").status_code == 422  # no file at all


def test_pages_and_schema_load_nothing_from_elsewhere(client):
    for page in ("/", "/browse", "/study"):
        response = client.get(page)
        assert response.status_code == 200
        assert "http://" not in response.text and "https://" not in response.text
        assert "default-src 'self'" in response.headers["content-security-policy"]
    schema = client.get("/api/openapi.json").json()
    for path in ("/api/predict", "/api/explain", "/api/dataset", "/api/study/next", "/api/ratings", "/api/ratings.csv"):
        assert path in schema["paths"]
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def test_inference_queue_answers_503_when_full():
    from cxrlens.serve.engine import RequestError
    from cxrlens.serve.jobs import JobQueue

    queue = JobQueue(max_waiting=1)
    release = threading.Event()

    async def scenario():
        running = asyncio.ensure_future(queue.run(lambda job: release.wait(10)))
        waiting = asyncio.ensure_future(queue.run(lambda job: "second"))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as error:
            await queue.run(lambda job: "third")
        assert error.value.status == 503
        release.set()
        return await running, await waiting

    assert asyncio.run(scenario()) == (True, "second")
    assert queue.pending == 0
    queue.shutdown()


# --- data set ------------------------------------------------------------------------------------


def test_browse_filters_by_class_source_and_correctness(client):
    everything = client.get("/api/dataset", params={"limit": 500}).json()
    assert everything["total"] == everything["matched"] == len(everything["items"]) > 100
    normal = client.get("/api/dataset", params={"cls": "Normal", "limit": 500}).json()
    assert normal["matched"] > 0 and all(it["label"] == "Normal" for it in normal["items"])
    source = everything["sources"][0]
    by_source = client.get("/api/dataset", params={"source": source, "limit": 500}).json()
    assert all(it["source"] == source for it in by_source["items"])
    right = client.get("/api/dataset", params={"correct": "correct"}).json()["matched"]
    wrong = client.get("/api/dataset", params={"correct": "incorrect"}).json()["matched"]
    assert right + wrong == everything["total"]
    detail = client.get("/api/dataset/0").json()
    assert set(detail["truth"]) == {"COVID-19", "Pneumonia", "Normal"}
    assert client.get("/api/dataset/0/image").headers["content-type"] == "image/png"


# --- reader study --------------------------------------------------------------------------------


def test_ratings_round_trip_and_csv_export(client):
    first = client.get("/api/study/next", params={"rater": "alice"}).json()
    assert not first["done"] and first["total"] == 4
    assert len(first["maps"]) == 4  # 2 models x 2 methods
    assert {m["label"] for m in first["maps"]} == {"A", "B", "C", "D"}
    assert all("model" not in m and "method" not in m for m in first["maps"])  # anonymised
    scores = [{"token": m["token"], "score": s} for m, s in zip(first["maps"], (1, 2, 4, 5), strict=True)]
    saved = client.post("/api/ratings", json={"rater": "alice", "image_id": first["image_id"], "ratings": scores})
    assert saved.status_code == 201 and saved.json() == {"saved": 4}

    second = client.get("/api/study/next", params={"rater": "alice"}).json()
    assert second["image_id"] != first["image_id"] and second["position"] == 2

    rows = list(csv.DictReader(io.StringIO(client.get("/api/ratings.csv").text)))
    mine = [r for r in rows if r["rater"] == "alice" and r["image_id"] == first["image_id"]]
    assert len(mine) == 4
    assert {r["model"] for r in mine} == {"resnet18-a", "resnet18-b"}
    assert {r["method"] for r in mine} == {"grad_cam", "saliency"}
    assert sorted(int(r["score"]) for r in mine) == [1, 2, 4, 5]
    assert all(r["time"] and r["cls"] == first["cls"] for r in mine)

    # a second rater on the same image: agreement becomes computable
    bob = client.get("/api/study/next", params={"rater": "bob"}).json()
    if bob["image_id"] == first["image_id"]:
        ratings = [{"token": m["token"], "score": 3} for m in bob["maps"]]
        client.post("/api/ratings", json={"rater": "bob", "image_id": bob["image_id"], "ratings": ratings})
    summary = client.get("/api/ratings/summary").json()
    assert summary["n_ratings"] >= 4 and "alice" in summary["raters"]
    assert set(summary["by_model"]) == {"resnet18-a", "resnet18-b"}
    assert set(summary["by_method"]) == {"grad_cam", "saliency"}


def test_bad_ratings_are_refused(client):
    item = client.get("/api/study/next", params={"rater": "carol"}).json()
    token = item["maps"][0]["token"]
    post = lambda **body: client.post("/api/ratings", json={"rater": "carol", "image_id": item["image_id"], **body})  # noqa: E731
    assert post(ratings=[{"token": token, "score": 6}]).status_code == 422
    assert post(ratings=[{"token": "forged", "score": 3}]).status_code == 400
    assert post(ratings=[{"token": token, "score": 3}, {"token": token, "score": 4}]).status_code == 400
    assert post(ratings=[]).status_code == 422
    wrong_image = client.post("/api/ratings", json={"rater": "carol", "image_id": "other.jpg",
                                                    "ratings": [{"token": token, "score": 3}]})
    assert wrong_image.status_code == 400
    assert client.get("/api/study/next", params={"rater": "<script>"}).status_code == 422


def test_fleiss_kappa_textbook_example():
    from cxrlens.serve.ratings import fleiss_kappa

    # Fleiss (1971) as worked in Wikipedia's "Fleiss' kappa": 10 subjects, 14 raters, 5 categories
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert np.isnan(fleiss_kappa([[1, 0]]))  # one rating per item: no agreement to measure


def test_fleiss_kappa_agrees_with_statsmodels():
    """Ours allows a different number of raters per item, which statsmodels does not; where every item
    has the same number, both are the same closed formula (float64 rounding only, hence 1e-12)."""
    from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_kappa

    from cxrlens.serve.ratings import fleiss_kappa

    rng = np.random.default_rng(0)
    for n_raters in (2, 3, 7):
        for _ in range(20):
            scores = rng.integers(0, 5, size=(int(rng.integers(2, 30)), n_raters))
            scores[:, 1:] = np.where(rng.random(scores[:, 1:].shape) < 0.5, scores[:, :1], scores[:, 1:])  # agree
            table = np.stack([(scores == k).sum(1) for k in range(5)], 1)
            assert fleiss_kappa(table.tolist()) == pytest.approx(statsmodels_kappa(table), rel=1e-12, abs=1e-12)


def test_ratings_store_summary(tmp_path):
    from cxrlens.serve.ratings import RatingsStore

    store = RatingsStore(tmp_path / "r.sqlite")
    for rater, scores in (("r1", (5, 1)), ("r2", (5, 1)), ("r3", (5, 2))):
        store.add(rater, "img1", "COVID-19", [("m1", "grad_cam", scores[0]), ("m2", "saliency", scores[1])])
    store.add("r1", "img1", "COVID-19", [("m1", "grad_cam", 4)])  # a re-rating replaces the score
    summary = store.summary()
    assert summary["n_ratings"] == 6 and summary["n_maps_multi_rated"] == 2
    assert summary["by_model"]["m1"]["mean"] == pytest.approx(14 / 3)
    assert summary["by_method"]["saliency"]["mean"] == pytest.approx(4 / 3)
    expected = [[0, 0, 0, 1, 2], [2, 1, 0, 0, 0]]
    from cxrlens.serve.ratings import fleiss_kappa

    assert summary["fleiss_kappa"] == pytest.approx(fleiss_kappa(expected))
