"""Pydantic bodies of the HTTP API, so the OpenAPI page documents answers and errors alike."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PatchResult(BaseModel):
    index: int = Field(description="Position of the image in the request's `images` field.")
    name: str = Field(description="File name the client sent.")
    label: str = Field(description="Most probable class.")
    confidence: float = Field(description="Probability of `label` (calibrated when the model card says so).")
    probabilities: dict[str, float] = Field(description="Probability of every class in the model card.")
    abstained: bool | None = Field(None, description="True when `confidence` is under the abstention threshold.")
    ood_score: float | None = Field(None, description="Distance of the patch from the training tissue.")
    ood: bool | None = Field(None, description="True when `ood_score` exceeds the model's threshold.")


class ClassifyResponse(BaseModel):
    model: str = Field(description="Model name from the card.")
    results: list[PatchResult]


class ErrorBody(BaseModel):
    error: str = Field(description="Short error kind, e.g. 'bad_image'.")
    detail: str = Field(description="What was wrong, naming the file where there is one.")
    index: int | None = Field(None, description="Index of the offending image, when one image caused it.")


class SlideResult(BaseModel):
    summary: dict = Field(description="Tiles, tissue area, class fractions, timings, model name and sha256.")
    geojson: dict = Field(description="QuPath-importable FeatureCollection, one feature per tissue tile.")
