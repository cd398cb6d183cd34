"""The web app for clinicians: upload an X-ray, see every model's predictions and explanation maps,
browse a test split with ground truth, and run a reader study.

``create_app(run_dirs, ...)`` builds the FastAPI app, ``serve(run_dirs, ...)`` runs it with uvicorn
(loopback by default). Imports are lazy so that :mod:`cxrlens.serve.ratings` (used by the HTML
report) works without loading FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(*args: Any, **kwargs: Any) -> FastAPI:
    """See :func:`cxrlens.serve.app.create_app`."""
    from cxrlens.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """See :func:`cxrlens.serve.app.serve`."""
    from cxrlens.serve.app import serve as _serve

    _serve(*args, **kwargs)


__all__ = ["create_app", "serve"]
