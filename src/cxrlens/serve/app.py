"""The FastAPI app: HTML/JS pages served from memory, and a JSON API under /api.

Safety, because clinicians' machines hold patient data:

* ``serve`` binds 127.0.0.1 unless told otherwise (there is no login);
* only the served host names are answered (loopback names, plus ``allowed_hosts``): 400 otherwise,
  which stops DNS rebinding; a state-changing request from a page of another origin gets 403;
* a request body larger than the upload cap is refused with 413 before it is read, and images whose
  header declares more than ``max_pixels`` (by default ``cxrlens.data.MAX_PIXELS``, the cap the CLI
  readers use too) are refused before decoding (decompression bombs);
* the image type is sniffed from content (PNG, JPEG, DICOM), never taken from the file name;
* no request path reaches the file system: pages are looked up in an in-memory table, data-set
  images by their row index in the manifest;
* user errors become 4xx with a one-line message;
* model work runs in ONE worker thread behind a bounded queue (503 when full); work whose client has
  gone is dropped before it starts or stopped between forward passes (see :mod:`cxrlens.serve.jobs`).

The routes live in :mod:`cxrlens.serve.routers`, what they share in :class:`cxrlens.serve.state.AppState`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cxrlens.errors import CxrlensError
from cxrlens.runtime import keep_freed_memory
from cxrlens.serve.engine import RequestError
from cxrlens.serve.guards import LOOPBACK_HOSTS, BodyLimit, SameOrigin
from cxrlens.serve.routers import ROUTERS
from cxrlens.serve.state import AppState, ServeConfig, host_name

FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries on top of the file itself
WILDCARDS = ("0.0.0.0", "::", "")


def create_app(
    run_dirs: Sequence[str | Path], data: str | Path | None = None, config: ServeConfig | None = None,
    **options: Any,
) -> FastAPI:
    """Build the web app for the models of ``run_dirs``; ``data`` (a folder or manifest) is browsed
    and used for the reader study. ``options`` override fields of ``config`` (see :class:`ServeConfig`)."""
    config = dataclasses.replace(config or ServeConfig(), **options)
    state = AppState.build(list(run_dirs), data, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.queue.open()
        yield
        state.queue.shutdown()

    app = FastAPI(
        title="cxrlens",
        version="0.1.0",
        description="Chest X-ray classifiers with explanations. Research use only, not for diagnosis.",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; the schema is at /api/openapi.json
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.cxrlens = state
    _add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # the last added runs first: body cap and security headers, then Host, then Origin
    app.add_middleware(SameOrigin)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.hosts, www_redirect=False)
    app.add_middleware(BodyLimit, max_bytes=config.file_limit + FORM_OVERHEAD, file_limit=config.file_limit)
    return app


def _add_error_handlers(app: FastAPI) -> None:
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


def serve(
    run_dirs: Sequence[str | Path],
    data: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **options: Any,
) -> None:
    """Run the app with uvicorn until interrupted; loopback only unless ``host`` says otherwise.

    ``options`` are :class:`ServeConfig` fields. A specific ``host`` address is added to the allowed
    host names; behind a wildcard (0.0.0.0, ::) give the names clients use as ``allowed_hosts``."""
    import uvicorn

    keep_freed_memory()  # as the CLI does: also when the server is started from Python (bench/soak.py)
    options["allowed_hosts"] = hosts_for_bind(host, options.get("allowed_hosts", ()))
    if host_name(host) not in LOOPBACK_HOSTS:
        print(f"warning: serving on {host}: anyone who can reach this address can upload images and read "
              "ratings (the app has no login)")
    app = create_app(run_dirs, data, **options)
    shown = host_name(host) if host not in WILDCARDS else "127.0.0.1"
    print(f"cxrlens web app on http://{shown}:{port}/ (Ctrl+C to stop); answering host names: "
          f"{', '.join(app.state.cxrlens.config.hosts)}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def hosts_for_bind(host: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """The extra host names to answer when bound to ``host``: a specific address is one of them; a
    wildcard (0.0.0.0, ::) adds nothing, as clients reach it by names only the user knows."""
    extra = () if host in WILDCARDS or host_name(host) in LOOPBACK_HOSTS else (host_name(host),)
    return (*allowed, *extra)
