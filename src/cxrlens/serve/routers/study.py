"""The reader study: anonymised, shuffled maps of the rater's next image; 1-5 scores; export and summary."""

from __future__ import annotations

import random
import secrets
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response

from cxrlens.io import to_jsonable
from cxrlens.serve.engine import RequestError
from cxrlens.serve.jobs import Job
from cxrlens.serve.schemas import RATER_PATTERN, RatingsIn, RatingsSaved, StudyNext
from cxrlens.serve.state import AppState, app_state

router = APIRouter(prefix="/api", tags=["ratings"])


def map_label(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < 26 else f"{letters[i // 26 - 1]}{letters[i % 26]}"


def _image_id(state: AppState, index: int) -> str:
    return Path(state.need_test().path(index)).name


def _maps_of(state: AppState, index: int, cls: str, job: Job) -> list[dict]:
    """Every study method's maps of one image, cached across raters; each map gets a fresh token."""
    tensors = None
    maps = []
    for method in state.config.study_methods:
        key = (index, method, cls)
        result = state.explained.get(key)
        if result is None:
            tensors = tensors if tensors is not None else state.bank.preprocess(state.need_test().pixels(index))
            result = state.bank.explain(tensors, method, cls, check=job.check)
            state.explained.put(key, result)
        for m in result["maps"]:
            token = secrets.token_urlsafe(12)
            state.tokens.put(token, (_image_id(state, index), cls, m["model"], method))
            maps.append({"token": token, "xray": m["xray"], "heatmap": m["heatmap"]})
    return maps


def _study_work(state: AppState, rater: str, job: Job) -> dict:
    test = state.need_test()
    done = state.store.rated_images(rater)
    order = list(state.study_order)
    random.Random(f"order:{rater}").shuffle(order)  # each rater's own order, stable across visits
    remaining = [i for i in order if _image_id(state, i) not in done]
    if not remaining:
        return {"done": True, "position": len(order), "total": len(order)}
    index = remaining[0]
    cls = test.label(index)
    maps = _maps_of(state, index, cls, job)
    random.SystemRandom().shuffle(maps)  # order must not give the model or method away
    for i, m in enumerate(maps):
        m["label"] = map_label(i)
    return {"done": False, "position": len(order) - len(remaining) + 1, "total": len(order),
            "image_id": _image_id(state, index), "cls": cls, "maps": maps}


@router.get("/study/next", response_model=StudyNext, responses={404: {}, 503: {}})
async def study_next(request: Request, rater: str = Query(..., pattern=RATER_PATTERN),
                     state: AppState = Depends(app_state)) -> dict:
    """The rater's next unrated image with its explanation maps, anonymised and shuffled."""
    state.need_test()
    return await state.queue.run(lambda job: _study_work(state, rater, job), request.receive, "study")


@router.post("/ratings", response_model=RatingsSaved, status_code=201, responses={400: {}})
def add_ratings(body: RatingsIn, state: AppState = Depends(app_state)) -> dict:
    """Store a rater's 1-5 scores for the maps of one image (tokens from /api/study/next)."""
    resolved = []
    seen = set()
    for rating in body.ratings:
        hidden = state.tokens.get(rating.token)
        if hidden is None:
            raise RequestError(400, "unknown or expired map token; reload the study page")
        image_id, cls, model, method = hidden
        if image_id != body.image_id:
            raise RequestError(400, f"map token belongs to another image than {body.image_id}")
        if rating.token in seen:
            raise RequestError(400, "the same map is rated twice in one request")
        seen.add(rating.token)
        resolved.append((model, method, rating.score))
    _, cls, _, _ = state.tokens.get(body.ratings[0].token)
    return {"saved": state.store.add(body.rater, body.image_id, cls, resolved)}


@router.get("/ratings.csv", response_class=PlainTextResponse, responses={200: {"content": {"text/csv": {}}}})
def ratings_csv(state: AppState = Depends(app_state)) -> Response:
    """Every rating: rater, time, image id, class, hidden model and method, score. Cells that a spreadsheet
    would run as a formula are escaped."""
    return Response(state.store.to_csv(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="ratings.csv"'})


@router.get("/ratings/summary")
def ratings_summary(state: AppState = Depends(app_state)) -> dict:
    """Fleiss' kappa between raters and mean score per model, method and model x method."""
    return to_jsonable(state.store.summary())
