"""HTML pages and front-end files, served from memory, and /api/info."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from cxrlens.serve.engine import DEFAULT_METHOD, describe_methods
from cxrlens.serve.state import AppState, app_state

PAGES = {"/": "index.html", "/browse": "browse.html", "/study": "study.html"}

router = APIRouter()


def _file(state: AppState, name: str) -> Response:
    content, media = state.static[name]
    return Response(content, media_type=media, headers={"Cache-Control": "no-cache"})


def _page_route(name: str):
    def page(state: AppState = Depends(app_state)) -> Response:
        return _file(state, name)

    return page


for _route, _name in PAGES.items():
    router.add_api_route(_route, _page_route(_name), methods=["GET"], include_in_schema=False)


@router.get("/favicon.ico", include_in_schema=False)
def favicon(state: AppState = Depends(app_state)) -> Response:
    return _file(state, "favicon.svg")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str, state: AppState = Depends(app_state)) -> Response:
    if name not in state.static:  # a lookup in a dict: no path from the request reaches the disk
        raise HTTPException(404, "not found")
    return _file(state, name)


@router.get("/api/info", tags=["info"])
def info(state: AppState = Depends(app_state)) -> dict:
    """Models, classes, attribution methods and limits of this server."""
    config, test = state.config, state.test
    return {
        "classes": list(state.bank.classes),
        "models": state.bank.info(),
        "methods": describe_methods(min(p.size for p in state.bank.preprocesses)),
        "default_method": DEFAULT_METHOD,
        "max_upload_mb": config.max_upload_mb,
        "max_megapixels": config.max_pixels / 1e6,
        "dataset": None if test is None else {
            "split": test.split, "n": len(test), "sources": sorted(set(test.manifest.frame["source"])),
        },
        "study": None if test is None else {"methods": list(config.study_methods), "n_images": len(state.study_order)},
        "queue": {"pending": state.queue.pending, **state.queue.stats},  # dropped/cancelled: work of clients gone
    }
