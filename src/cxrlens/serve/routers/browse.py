"""The data set's split: a filtered list with the ensemble's predictions, one image's details, thumbnails.
Images are addressed by their row in the manifest: no path comes from the request."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from cxrlens.serve.engine import display_png
from cxrlens.serve.schemas import DatasetDetail, DatasetOut
from cxrlens.serve.state import AppState, app_state

router = APIRouter(prefix="/api/dataset", tags=["dataset"])


@router.get("", response_model=DatasetOut, responses={404: {}, 503: {}})
async def dataset(
    request: Request,
    cls: str | None = Query(None, description="true label (most specific class)"),
    source: str | None = None,
    correct: Literal["all", "correct", "incorrect"] = "all",
    offset: int = Query(0, ge=0),
    limit: int = Query(60, ge=1, le=500),
    state: AppState = Depends(app_state),
) -> dict:
    """The test split with ground truth and the soft-vote ensemble's predictions, filtered."""
    test = state.need_test()
    items = await state.queue.run(lambda job: test.items(state.bank), request.receive, "dataset")
    chosen = [
        it for it in items
        if (not cls or it["label"] == cls)
        and (not source or it["source"] == source)
        and (correct == "all" or it["correct"] == (correct == "correct"))
    ]
    return {"split": test.split, "total": len(items), "matched": len(chosen),
            "sources": sorted({it["source"] for it in items}), "items": chosen[offset: offset + limit]}


def _detail_work(state: AppState, index: int) -> dict:
    test = state.need_test()
    probs = test.compute_probs(state.bank)[:, test.check(index), :]
    return {"index": index, "label": test.label(index), "source": str(test.manifest.frame["source"].iat[index]),
            "truth": test.truth(index), **state.bank.predictions(probs)}


@router.get("/{index}", response_model=DatasetDetail, responses={404: {}})
async def dataset_item(index: int, request: Request, state: AppState = Depends(app_state)) -> dict:
    """Ground truth and every model's prediction for one test image."""
    state.need_test().check(index)
    return await state.queue.run(lambda job: _detail_work(state, index), request.receive, "dataset")


@router.get("/{index}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}, 404: {}})
def dataset_image(index: int, state: AppState = Depends(app_state)) -> Response:
    """A test image as PNG (long side <= 512), addressed by its row: no path comes from the request."""
    test = state.need_test()
    test.check(index)
    png = state.thumbnails.get(index)
    if png is None:
        png = display_png(test.pixels(index))
        state.thumbnails.put(index, png)
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
