"""ASGI middleware that guards the app before any route runs.

* :class:`BodyLimit`: a body over the upload cap is refused with 413 before it is read (by its
  Content-Length, or as soon as a chunked body grows past the cap), and every response carries the
  security headers (Content-Security-Policy etc.);
* Starlette's ``TrustedHostMiddleware`` (added in ``app.py``): only the served host names, so a page
  on another site cannot reach the app through DNS rebinding;
* :class:`SameOrigin`: a state-changing request (anything but GET/HEAD/OPTIONS) sent by a page of
  another origin is refused with 403; requests without an ``Origin`` header (curl, scripts) pass.

Pure ASGI classes: Starlette's BaseHTTPMiddleware would swallow errors raised while reading the body.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.responses import JSONResponse

MB = 1024 * 1024
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# the pages load nothing from elsewhere: this header makes the browser enforce it
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "object-src 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload larger than the limit of {limit / MB:g} MB; send a smaller image")


def with_security_headers(send: Callable) -> Callable:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return wrapped


class BodyLimit:
    """Refuse bodies over ``max_bytes`` (413) and add the security headers to every response."""

    def __init__(self, app: Callable, max_bytes: int, file_limit: int) -> None:
        self.app, self.max_bytes, self.file_limit = app, max_bytes, file_limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = with_security_headers(send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            detail = BodyTooLarge(self.file_limit).detail if length.isdigit() else "bad Content-Length"
            await JSONResponse({"detail": detail}, 413 if length.isdigit() else 400)(scope, receive, send)
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
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as error:
            if started:
                raise
            await JSONResponse({"detail": error.detail}, 413)(scope, receive, send)


def _netloc(scheme: str, host: str | None, port: int | None) -> tuple[str, int] | None:
    if not host:
        return None
    return host.lower(), port or (443 if scheme == "https" else 80)


def _origin_of(value: str) -> tuple[str, int] | None:
    """'http://host:port' -> (host, port); None for 'null' or anything unparsable."""
    try:
        parts = urlsplit(value)
        return _netloc(parts.scheme, parts.hostname, parts.port) if parts.scheme in ("http", "https") else None
    except ValueError:
        return None


class SameOrigin:
    """403 for a state-changing request that a page of another origin sent.

    Browsers send ``Origin`` with every cross-origin request and every POST/PUT/DELETE; it must name
    this very server (the host and port of the ``Host`` header). Without ``Origin``, a browser's
    ``Sec-Fetch-Site`` of 'cross-site' or 'same-site' (another port or subdomain) is refused too; a
    request with neither (curl, scripts) passes, as it cannot come from a web page."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS and not self._allowed(scope):
            response = JSONResponse({"detail": "cross-origin request refused: use the app's own pages"}, 403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _allowed(scope: dict) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if origin is None:
            return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        scheme = scope.get("scheme", "http")
        try:
            own = urlsplit(f"{scheme}://{headers.get('host', '')}")
            server = _netloc(scheme, own.hostname, own.port)
        except ValueError:
            return False
        return server is not None and _origin_of(origin) == server
