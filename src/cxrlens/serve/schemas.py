"""The JSON API's request and response models (they make the schema at /api/openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from cxrlens.serve.engine import DEFAULT_METHOD

RATER_PATTERN = r"^[A-Za-z0-9 _.@-]{1,64}$"


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


class JobOut(BaseModel):
    id: str = Field(description="poll GET /api/jobs/{id}; DELETE it to cancel")
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    position: int = Field(description="jobs that run before this one (0 once it runs)")
    method: str
    description: str
    cls: str
    models_total: int
    models_done: int
    maps: list[HeatMap] = Field(description="the maps of the models done so far, in model order")
    estimate_seconds: float | None = Field(description="time left, once there is something to estimate from")
    error: str | None = None
