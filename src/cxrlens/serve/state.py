"""The app's settings (:class:`ServeConfig`) and everything its routes share (:class:`AppState`)."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request

from cxrlens.data import MAX_PIXELS
from cxrlens.errors import CxrlensError
from cxrlens.serve.engine import LruCache, ModelBank, RequestError, TestSplit
from cxrlens.serve.guards import MB
from cxrlens.serve.jobs import JobQueue
from cxrlens.serve.ratings import RatingsStore

DEFAULT_STUDY_METHODS = ("grad_cam", "integrated_gradients", "guided_backprop")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the web app.

    threshold: 'study' (0.51), 'tuned' (each run's validation thresholds) or a number; split: the data
    set's split that is browsed and rated; study_methods: attribution methods shown to raters;
    study_images: images per rater (stratified by class); allowed_hosts: host names served besides the
    loopback names (the ``Host`` header of every request must be one of them); abandon_after_s: a
    polled job nobody has asked about for this long is dropped."""

    max_upload_mb: float = 20
    ratings_db: str | Path = "runs/ratings.sqlite"
    max_pixels: int = MAX_PIXELS
    max_waiting: int = 32
    threshold: str | float = "study"
    split: str = "test"
    study_methods: tuple[str, ...] = DEFAULT_STUDY_METHODS
    study_images: int = 24
    seed: int = 0
    allowed_hosts: tuple[str, ...] = ()
    abandon_after_s: float = 30.0

    def __post_init__(self) -> None:
        from cxrlens.explain import METHODS

        object.__setattr__(self, "study_methods", tuple(self.study_methods))
        object.__setattr__(self, "allowed_hosts", tuple(host_name(h) for h in self.allowed_hosts))
        for name in ("max_upload_mb", "max_pixels", "max_waiting", "abandon_after_s"):
            if not getattr(self, name) > 0:
                raise CxrlensError(f"{name} must be positive, got {getattr(self, name)!r}")
        for method in self.study_methods:
            if method not in METHODS:
                raise CxrlensError(f"unknown study method '{method}'; choose from: {', '.join(METHODS)}")
        for host in self.allowed_hosts:
            if not host or "/" in host or "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
                raise CxrlensError(f"allowed host '{host}' is not a host name (e.g. xrays.example.org or *.lan)")

    @property
    def file_limit(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def hosts(self) -> list[str]:
        """Every host name the app answers to."""
        return list(dict.fromkeys(("127.0.0.1", "localhost", "[::1]", *self.allowed_hosts)))


def host_name(host: str) -> str:
    """A host name as the ``Host`` header carries it: lower case, IPv6 addresses in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class AppState:
    """What the routes share: models, data set, ratings, the job queue and a few caches."""

    config: ServeConfig
    bank: ModelBank
    test: TestSplit | None
    store: RatingsStore
    queue: JobQueue
    static: dict[str, tuple[bytes, str]]
    study_order: list[int]
    uploads: LruCache = field(default_factory=lambda: LruCache(64))  # upload id -> preprocessed tensors
    tokens: LruCache = field(default_factory=lambda: LruCache(50_000))  # study token -> hidden model etc.
    explained: LruCache = field(default_factory=lambda: LruCache(32))  # (index, method, cls) -> maps
    thumbnails: LruCache = field(default_factory=lambda: LruCache(512))
    jobs: LruCache = field(default_factory=lambda: LruCache(64))  # job id -> Job, for polling
    timings: dict[tuple[str, str], float] = field(default_factory=dict)  # (method, model) -> seconds

    @classmethod
    def build(cls, run_dirs: list[str | Path], data: str | Path | None, config: ServeConfig) -> AppState:
        bank = ModelBank(run_dirs, config.threshold)
        test = TestSplit(data, bank.classes, config.split) if data is not None else None
        return cls(
            config=config, bank=bank, test=test, store=RatingsStore(config.ratings_db),
            queue=JobQueue(config.max_waiting, config.abandon_after_s), static=static_files(),
            study_order=study_sample(test, config.study_images, config.seed) if test is not None else [],
        )

    def need_test(self) -> TestSplit:
        if self.test is None:
            raise RequestError(404, "this server has no data set; start it with --data DATA")
        return self.test


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the state of the app serving this request."""
    return request.app.state.cxrlens


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every front-end file, read once: requests look names up here and never touch the disk."""
    root = importlib.resources.files("cxrlens.serve") / "static"
    files = {}
    for entry in root.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return files


def study_sample(test: TestSplit, n: int, seed: int) -> list[int]:
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
