"""Helpers of the web-app tests: hostile images, uploads, and a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import dicom_bytes, png_with_size  # noqa: F401  (hostile images for the web tests)

LOCAL = "http://localhost"  # TestClient's base URL: a served host name (its default 'testserver' is not)


def upload(client, data: bytes, name: str = "x.jpg", mime: str = "image/jpeg", **kwargs):
    return client.post("/api/predict", files={"file": (name, data, mime)}, **kwargs)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until true; a deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def live_server(app) -> Iterator[str]:
    """uvicorn serving ``app`` on a free loopback port, in a thread of this process; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; uvicorn serves on this very socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
