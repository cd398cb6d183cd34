"""The FastAPI app: HTML/JS pages served from memory, and a JSON API under /api.

Safety, because clinicians' machines hold patient data:

* ``serve`` binds 127.0.0.1 unless told otherwise (there is no login);
* a request body larger than the upload cap is refused with 413 before it is read, and images whose
  header declares more than ``max_pixels`` are refused before decoding (decompression bombs);
* the image type is sniffed from content (PNG, JPEG, DICOM), never taken from the file name;
* no request path reaches the file system: pages are looked up in an in-memory table, data-set
  images by their row index in the manifest;
* user errors become 4xx with a one-line message;
* model work runs in ONE worker thread behind a bounded queue: when ``max_waiting`` requests are
  already waiting the app answers 503 at once, so bursts neither crash it nor exhaust memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import random
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from cxrlens.errors import CxrlensError
from cxrlens.serve.engine import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_METHOD,
    LruCache,
    ModelBank,
    RequestError,
    TestSplit,
    data_url,
    decode_upload,
    describe_methods,
    display_png,
)
from cxrlens.serve.ratings import RatingsStore

MB = 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries on top of the file itself
DEFAULT_STUDY_METHODS = ("grad_cam", "integrated_gradients", "guided_backprop")
RATER_PATTERN = r"^[A-Za-z0-9 _.@-]{1,64}$"
PAGES = {"/": "index.html", "/browse": "browse.html", "/study": "study.html"}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# the pages load nothing from elsewhere: this header makes the browser enforce it
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "object-src 'none'; frame-ancestors 'none'; base-uri 'none'")


# --- API schema ----------------------------------------------------------------------------------


class Prediction(BaseModel):
    name: str = Field(description="run folder name, or 'soft vote' / 'majority vote'")
    detail: str
    probs: dict[str, float] = Field(description="per class: sigmoid probability (majority vote: share of votes)")
    positive: dict[str, bool] = Field(description="per class: above the threshold")


class PredictOut(BaseModel):
    upload_id: str = Field(description="refer to this image in /api/explain for a while after the upload")
    name: str
    width: int
    height: int
    xray: str = Field(description="the uploaded image as a PNG data URL (contrast-stretched, long side <= 512)")
    classes: list[str]
    models: list[Prediction]
    ensembles: list[Prediction]


class ExplainIn(BaseModel):
    upload_id: str | None = Field(None, description="from /api/predict")
    index: int | None = Field(None, description="row of the data set's test split, instead of an upload")
    method: str = DEFAULT_METHOD
    cls: str = Field(description="class to explain, by name or index")


class HeatMap(BaseModel):
    model: str
    arch: str
    xray: str = Field(description="the model's input image (PNG data URL)")
    heatmap: str = Field(description="RGBA PNG data URL of the same size, to lay over the X-ray")
    signed: bool
    score: float | None = Field(description="the explained output (sigmoid probability of the class)")
    seconds: float
    params: dict[str, Any]


class ExplainOut(BaseModel):
    method: str
    description: str
    cls: str
    maps: list[HeatMap]


class DatasetItem(BaseModel):
    index: int
    label: str
    source: str
    truth: list[str]
    predicted: list[str] = Field(description="positive classes of the soft-vote ensemble")
    probs: dict[str, float]
    correct: bool = Field(description="the soft vote gets every class right")
    models_correct: dict[str, bool]


class DatasetOut(BaseModel):
    split: str
    total: int
    matched: int
    sources: list[str]
    items: list[DatasetItem]


class DatasetDetail(BaseModel):
    index: int
    label: str
    source: str
    truth: dict[str, bool]
    classes: list[str]
    models: list[Prediction]
    ensembles: list[Prediction]


class StudyMap(BaseModel):
    token: str = Field(description="opaque; the hidden model and method stay on the server")
    label: str
    xray: str
    heatmap: str


class StudyNext(BaseModel):
    done: bool
    position: int = 0
    total: int = 0
    image_id: str | None = None
    cls: str | None = None
    maps: list[StudyMap] = []


class RatingIn(BaseModel):
    token: str = Field(max_length=64)
    score: int = Field(ge=1, le=5, description="1 = looks elsewhere ... 5 = looks at the pathology")


class RatingsIn(BaseModel):
    rater: str = Field(pattern=RATER_PATTERN)
    image_id: str = Field(max_length=200)
    ratings: list[RatingIn] = Field(min_length=1, max_length=200)


class RatingsSaved(BaseModel):
    saved: int


# --- the bounded inference queue -----------------------------------------------------------------


class InferenceQueue:
    """One worker thread runs model work in arrival order; at most ``max_waiting`` jobs wait.

    Serialising keeps memory to one image's activations and gradients at a time, and torch already
    uses every core inside one call; a full queue answers 503 instead of piling up uploads."""

    def __init__(self, max_waiting: int = 32) -> None:
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrlens-model")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def _done(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._pending > self.max_waiting:  # one running + max_waiting queued
                raise RequestError(503, f"server busy: {self.max_waiting} requests are waiting; try again shortly")
            self._pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._done)  # also fires when a waiting job is cancelled
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- upload size cap -----------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload larger than the limit of {limit / MB:g} MB; send a smaller image")


SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would swallow errors raised while reading
    the body): refuse bodies over ``max_bytes`` by Content-Length before reading, stop reading a body
    without one (chunked) as soon as it grows past the limit, and add security headers."""

    def __init__(self, app: Any, max_bytes: int, file_limit: int) -> None:
        self.app, self.max_bytes, self.file_limit = app, max_bytes, file_limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = BodyTooLarge(self.file_limit)
            status = 413 if length.isdigit() else 400
            response = JSONResponse({"detail": error.detail if status == 413 else "bad Content-Length"}, status)
            await response(scope, receive, _with_headers(send))
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.file_limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as error:
            if started:
                raise
            await JSONResponse({"detail": error.detail}, 413)(scope, receive, _with_headers(send))


def _with_headers(send: Callable) -> Callable:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return wrapped


# --- the app -------------------------------------------------------------------------------------


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every front-end file, read once: requests look names up here and never touch the disk."""
    root = importlib.resources.files("cxrlens.serve") / "static"
    files = {}
    for entry in root.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return files


def _clean_name(name: str | None) -> str:
    """An upload's file name, only for messages."""
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:80] or "upload"


def create_app(
    run_dirs: Sequence[str | Path],
    data: str | Path | None = None,
    max_upload_mb: float = 20,
    ratings_db: str | Path = "runs/ratings.sqlite",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_waiting: int = 32,
    threshold: str | float = "study",
    split: str = "test",
    study_methods: Sequence[str] = DEFAULT_STUDY_METHODS,
    study_images: int = 24,
    seed: int = 0,
) -> FastAPI:
    """Build the web app for the models of ``run_dirs``.

    data: a data set (folder or manifest) whose ``split`` is browsed and used for the reader study;
    threshold: 'study' (0.51), 'tuned' (each run's validation thresholds) or a number; study_methods:
    attribution methods shown to raters; study_images: images per rater (stratified by class).
    """
    from cxrlens.explain import METHODS

    bank = ModelBank(run_dirs, threshold)
    for method in study_methods:
        if method not in METHODS:
            raise CxrlensError(f"unknown study method '{method}'; choose from: {', '.join(METHODS)}")
    test = TestSplit(data, bank.classes, split) if data is not None else None
    store = RatingsStore(ratings_db)
    queue = InferenceQueue(max_waiting)
    file_limit = int(max_upload_mb * MB)
    static = _static_files()
    uploads = LruCache(64)  # upload id -> preprocessed tensors, for follow-up explain requests
    tokens = LruCache(50_000)  # study token -> (image_id, cls, model, method)
    explained = LruCache(32)  # (index, method, cls) -> explain result, shared by raters
    thumbnails = LruCache(512)
    study_order = _study_sample(test, study_images, seed) if test is not None else []

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(
        title="cxrlens",
        version="0.1.0",
        description="Chest X-ray classifiers with explanations. Research use only, not for diagnosis.",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; the schema is at /api/openapi.json
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.bank, app.state.queue, app.state.store, app.state.test = bank, queue, store, test

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "2"} if exc.status == 503 else None
        return JSONResponse({"detail": str(exc)}, exc.status, headers=headers)

    @app.exception_handler(CxrlensError)
    async def _user_error(_: Request, exc: CxrlensError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: f"<{len(b)} bytes>"})
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}", "errors": errors}, 422)

    # -- pages --

    def _page(name: str) -> Response:
        content, media = static[name]
        return Response(content, media_type=media, headers={"Cache-Control": "no-cache"})

    for route, page in PAGES.items():
        app.add_api_route(route, (lambda page=page: _page(page)), methods=["GET"], include_in_schema=False)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return _page("favicon.svg")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:  # a lookup in a dict: no path from the request reaches the disk
            raise HTTPException(404, "not found")
        return _page(name)

    # -- info --

    @app.get("/api/info", tags=["info"])
    def info() -> dict:
        """Models, classes, attribution methods and limits of this server."""
        return {
            "classes": list(bank.classes),
            "models": bank.info(),
            "methods": describe_methods(min(bank.sizes)),
            "default_method": DEFAULT_METHOD,
            "max_upload_mb": max_upload_mb,
            "max_megapixels": max_pixels / 1e6,
            "dataset": None if test is None else {
                "split": test.split, "n": len(test), "sources": sorted(set(test.manifest.frame["source"])),
            },
            "study": None if test is None else {"methods": list(study_methods), "n_images": len(study_order)},
        }

    # -- predict and explain --

    def _predict_work(data: bytes, name: str) -> dict:
        pixels = decode_upload(data, name, max_pixels)
        tensors = bank.preprocess(pixels)
        upload_id = hashlib.sha256(data).hexdigest()[:20]
        uploads.put(upload_id, tensors)
        out = bank.predict_image(tensors)
        height, width = pixels.shape
        return {"upload_id": upload_id, "name": name, "width": width, "height": height,
                "xray": data_url(display_png(pixels)), **out}

    @app.post("/api/predict", response_model=PredictOut, tags=["predict"],
              responses={400: {}, 413: {}, 415: {}, 503: {}})
    async def predict(file: UploadFile = File(..., description="PNG, JPEG or DICOM")) -> dict:
        """Every model's and both ensembles' per-class predictions for one uploaded X-ray."""
        data = await file.read(file_limit + 1)
        if len(data) > file_limit:
            raise RequestError(413, f"upload larger than the limit of {max_upload_mb:g} MB; send a smaller image")
        return await queue.run(_predict_work, data, _clean_name(file.filename))

    def _tensors_for(body: ExplainIn) -> dict:
        if (body.upload_id is None) == (body.index is None):
            raise RequestError(400, "give exactly one of upload_id (from /api/predict) or index (a test image)")
        if body.upload_id is not None:
            tensors = uploads.get(body.upload_id)
            if tensors is None:
                raise RequestError(404, "upload not found (expired or never sent); upload the image again")
            return tensors
        if test is None:
            raise RequestError(404, "this server has no data set; start it with --data")
        return bank.preprocess(test.pixels(body.index))

    def _explain_work(body: ExplainIn) -> dict:
        return bank.explain(_tensors_for(body), body.method, body.cls)

    @app.post("/api/explain", response_model=ExplainOut, tags=["explain"], responses={400: {}, 404: {}, 503: {}})
    async def explain(body: ExplainIn) -> dict:
        """Heat maps of one attribution method for one class, by every model, as PNG data URLs."""
        return await queue.run(_explain_work, body)

    # -- the data set --

    def _need_test() -> TestSplit:
        if test is None:
            raise RequestError(404, "this server has no data set; start it with --data DATA")
        return test

    @app.get("/api/dataset", response_model=DatasetOut, tags=["dataset"], responses={404: {}, 503: {}})
    async def dataset(
        cls: str | None = Query(None, description="true label (most specific class)"),
        source: str | None = None,
        correct: Literal["all", "correct", "incorrect"] = "all",
        offset: int = Query(0, ge=0),
        limit: int = Query(60, ge=1, le=500),
    ) -> dict:
        """The test split with ground truth and the soft-vote ensemble's predictions, filtered."""
        split_ = _need_test()
        items = await queue.run(split_.items, bank)
        chosen = [
            it for it in items
            if (not cls or it["label"] == cls)
            and (not source or it["source"] == source)
            and (correct == "all" or it["correct"] == (correct == "correct"))
        ]
        return {"split": split_.split, "total": len(items), "matched": len(chosen),
                "sources": sorted({it["source"] for it in items}), "items": chosen[offset: offset + limit]}

    def _detail_work(index: int) -> dict:
        split_ = _need_test()
        split_.check(index)
        probs = split_.compute_probs(bank)[:, index, :]
        frame = split_.manifest.frame
        return {"index": index, "label": split_.label(index), "source": str(frame["source"].iat[index]),
                "truth": split_.truth(index), **bank.predictions(probs)}

    @app.get("/api/dataset/{index}", response_model=DatasetDetail, tags=["dataset"], responses={404: {}})
    async def dataset_item(index: int) -> dict:
        """Ground truth and every model's prediction for one test image."""
        _need_test().check(index)
        return await queue.run(_detail_work, index)

    @app.get("/api/dataset/{index}/image", tags=["dataset"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {}})
    def dataset_image(index: int) -> Response:
        """A test image as PNG (long side <= 512), addressed by its row: no path comes from the request."""
        split_ = _need_test()
        split_.check(index)
        png = thumbnails.get(index)
        if png is None:
            png = display_png(split_.pixels(index))
            thumbnails.put(index, png)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    # -- reader study --

    def _image_id(index: int) -> str:
        return Path(_need_test().path(index)).name

    def _study_work(rater: str) -> dict:
        split_ = _need_test()
        done = store.rated_images(rater)
        order = list(study_order)
        random.Random(f"order:{rater}").shuffle(order)  # each rater's own order, stable across visits
        remaining = [i for i in order if _image_id(i) not in done]
        if not remaining:
            return {"done": True, "position": len(order), "total": len(order)}
        index = remaining[0]
        cls = split_.label(index)
        tensors = None
        maps = []
        for method in study_methods:
            key = (index, method, cls)
            result = explained.get(key)
            if result is None:
                tensors = tensors if tensors is not None else bank.preprocess(split_.pixels(index))
                result = bank.explain(tensors, method, cls)
                explained.put(key, result)
            for m in result["maps"]:
                token = secrets.token_urlsafe(12)
                tokens.put(token, (_image_id(index), cls, m["model"], method))
                maps.append({"token": token, "xray": m["xray"], "heatmap": m["heatmap"]})
        random.SystemRandom().shuffle(maps)  # order must not give the model or method away
        for i, m in enumerate(maps):
            m["label"] = _map_label(i)
        return {"done": False, "position": len(order) - len(remaining) + 1, "total": len(order),
                "image_id": _image_id(index), "cls": cls, "maps": maps}

    @app.get("/api/study/next", response_model=StudyNext, tags=["ratings"], responses={404: {}, 503: {}})
    async def study_next(rater: str = Query(..., pattern=RATER_PATTERN)) -> dict:
        """The rater's next unrated image with its explanation maps, anonymised and shuffled."""
        _need_test()
        return await queue.run(_study_work, rater)

    @app.post("/api/ratings", response_model=RatingsSaved, status_code=201, tags=["ratings"],
              responses={400: {}})
    def add_ratings(body: RatingsIn) -> dict:
        """Store a rater's 1-5 scores for the maps of one image (tokens from /api/study/next)."""
        resolved = []
        seen = set()
        for rating in body.ratings:
            hidden = tokens.get(rating.token)
            if hidden is None:
                raise RequestError(400, "unknown or expired map token; reload the study page")
            image_id, cls, model, method = hidden
            if image_id != body.image_id:
                raise RequestError(400, f"map token belongs to another image than {body.image_id}")
            if rating.token in seen:
                raise RequestError(400, "the same map is rated twice in one request")
            seen.add(rating.token)
            resolved.append((model, method, rating.score))
        _, cls, _, _ = tokens.get(body.ratings[0].token)
        return {"saved": store.add(body.rater, body.image_id, cls, resolved)}

    @app.get("/api/ratings.csv", tags=["ratings"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/csv": {}}}})
    def ratings_csv() -> Response:
        """Every rating: rater, time, image id, class, hidden model and method, score."""
        return Response(store.to_csv(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="ratings.csv"'})

    @app.get("/api/ratings/summary", tags=["ratings"])
    def ratings_summary() -> dict:
        """Fleiss' kappa between raters and mean score per model, method and model x method."""
        return _jsonable(store.summary())

    app.add_middleware(Guard, max_bytes=file_limit + FORM_OVERHEAD, file_limit=file_limit)
    return app


def _map_label(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < 26 else f"{letters[i // 26 - 1]}{letters[i % 26]}"


def _jsonable(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _study_sample(test: TestSplit, n: int, seed: int) -> list[int]:
    """Up to ``n`` test images, the same number per label where possible (round robin over labels)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i in range(len(test)):
        by_label.setdefault(test.label(i), []).append(i)
    pools = [list(rng.permutation(v)) for _, v in sorted(by_label.items())]
    chosen: list[int] = []
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop()))
    return chosen


def serve(
    run_dirs: Sequence[str | Path],
    data: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 20,
    ratings_db: str | Path = "runs/ratings.sqlite",
    **options: Any,
) -> None:
    """Run the app with uvicorn until interrupted; loopback only unless ``host`` says otherwise."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this address can upload images and read "
              "ratings (the app has no login)")
    app = create_app(run_dirs, data, max_upload_mb, ratings_db, **options)
    print(f"cxrlens web app on http://{host}:{port}/ (Ctrl+C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
