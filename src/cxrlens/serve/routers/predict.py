"""Predict an uploaded X-ray, explain it (or a test image) at once or as a job with progress."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Depends, File, Request, UploadFile

from cxrlens.serve.engine import ExplainProgress, RequestError, data_url, decode_upload, display_png
from cxrlens.serve.jobs import Job
from cxrlens.serve.schemas import ExplainIn, ExplainOut, JobOut, PredictOut
from cxrlens.serve.state import AppState, app_state

router = APIRouter(prefix="/api")


def clean_name(name: str | None) -> str:
    """An upload's file name, only for messages."""
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:80] or "upload"


def _predict_work(state: AppState, data: bytes, name: str) -> dict:
    pixels = decode_upload(data, name, state.config.max_pixels)
    tensors = state.bank.preprocess(pixels)
    upload_id = hashlib.sha256(data).hexdigest()[:20]
    state.uploads.put(upload_id, tensors)
    height, width = pixels.shape
    return {"upload_id": upload_id, "name": name, "width": width, "height": height,
            "xray": data_url(display_png(pixels)), **state.bank.predict_image(tensors)}


@router.post("/predict", response_model=PredictOut, tags=["predict"], responses={400: {}, 413: {}, 415: {}, 503: {}})
async def predict(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM"),
                  state: AppState = Depends(app_state)) -> dict:
    """Every model's and both ensembles' per-class predictions for one uploaded X-ray."""
    limit = state.config.file_limit
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise RequestError(413, f"upload larger than the limit of {state.config.max_upload_mb:g} MB; "
                                "send a smaller image")
    name = clean_name(file.filename)
    return await state.queue.run(lambda job: _predict_work(state, data, name), request.receive, "predict")


def _tensors_for(state: AppState, body: ExplainIn) -> dict:
    if (body.upload_id is None) == (body.index is None):
        raise RequestError(400, "give exactly one of upload_id (from /api/predict) or index (a test image)")
    if body.upload_id is not None:
        tensors = state.uploads.get(body.upload_id)
        if tensors is None:
            raise RequestError(404, "upload not found (expired or never sent); upload the image again")
        return tensors
    test = state.need_test()
    test.check(body.index)
    return state.bank.preprocess(test.pixels(body.index))


@router.post("/explain", response_model=ExplainOut, tags=["explain"], responses={400: {}, 404: {}, 503: {}})
async def explain(request: Request, body: ExplainIn, state: AppState = Depends(app_state)) -> dict:
    """Heat maps of one attribution method for one class, by every model, as PNG data URLs.
    Stops when the client goes away; for progress per model, use /api/jobs/explain."""
    state.bank.describe(body.method, body.cls)

    def work(job: Job) -> dict:
        return state.bank.explain(_tensors_for(state, body), body.method, body.cls, check=job.check)

    return await state.queue.run(work, request.receive, "explain")


def _job_out(state: AppState, job: Job) -> dict:
    progress: ExplainProgress = job.progress
    state_ = "cancelled" if job.state == "queued" and job.cancel_requested else job.state
    return {"id": job.id, "state": state_, "position": state.queue.position(job), **progress.snapshot(),
            "error": None if job.error is None else str(job.error)}


@router.post("/jobs/explain", response_model=JobOut, status_code=202, tags=["explain"],
             responses={400: {}, 404: {}, 503: {}})
def start_explain_job(body: ExplainIn, state: AppState = Depends(app_state)) -> dict:
    """Start explaining: poll GET /api/jobs/{id} for each model's map as it is ready and an estimate of
    the time left; DELETE it to cancel. A job nobody polls for a while is dropped."""
    header = state.bank.describe(body.method, body.cls)
    if body.upload_id is not None and state.uploads.get(body.upload_id) is None:
        raise RequestError(404, "upload not found (expired or never sent); upload the image again")
    progress = ExplainProgress(header, [m.name for m in state.bank.members], state.timings)

    def work(job: Job) -> dict:
        progress.start()
        return state.bank.explain(_tensors_for(state, body), body.method, body.cls, check=job.check,
                                  on_map=progress.add)

    job = state.queue.submit(work, "explain", polled=True)
    job.progress = progress
    state.jobs.put(job.id, job)
    return _job_out(state, job)


def _job(state: AppState, job_id: str) -> Job:
    job = state.jobs.get(job_id)
    if job is None:
        raise RequestError(404, "no such job (finished long ago or never started); start it again")
    job.seen()
    return job


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["explain"], responses={404: {}})
def job_status(job_id: str, state: AppState = Depends(app_state)) -> dict:
    """A job's state, the maps done so far and the estimated time left."""
    return _job_out(state, _job(state, job_id))


@router.delete("/jobs/{job_id}", response_model=JobOut, tags=["explain"], responses={404: {}})
def cancel_job(job_id: str, state: AppState = Depends(app_state)) -> dict:
    """Cancel a job: dropped if it waits, stopped at its next forward pass if it runs."""
    job = _job(state, job_id)
    job.cancel()
    return _job_out(state, job)
