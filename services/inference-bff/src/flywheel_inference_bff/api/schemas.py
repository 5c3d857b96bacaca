"""Request and response bodies of the BFF's API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flywheel_contracts.datasets import Split
from flywheel_contracts.events import SLUG
from flywheel_inference_bff.ports import BatchJob, JobError, JobState
from flywheel_inference_bff.service import ItemFailure, Outcome, Prediction
from flywheel_runtime.http import error_responses

SERVING_ERRORS = error_responses(404, 502, 504)
"""What a route that runs a model may answer besides the errors every route of its kind gives:
a model line with no serving version (404), a served model that does not fit its files (502),
Triton answering too late (504)."""

ModelLine = Field(default=None, pattern=SLUG, description="Model line; the default one if unset.")
TopK = Field(default=None, ge=1, le=1000, description="Classes to return, best first.")
RoutingKey = Field(
    default=None,
    min_length=1,
    max_length=200,
    description="Sticky routing: the same key gets the same version while the weights hold.",
)


class PredictOptionsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_line: str | None = ModelLine
    top_k: int | None = TopK
    routing_key: str | None = RoutingKey


class ImageIn(BaseModel):
    """Exactly one of ``image_b64`` and ``s3_key``."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = Field(
        default=None, description="The image bytes, base64 (standard alphabet, padded)."
    )
    s3_key: str | None = Field(
        default=None,
        max_length=1100,
        description="Key of an image in the data bucket, or s3://<data bucket>/<key>.",
    )

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        if (self.image_b64 is None) == (self.s3_key is None):
            raise ValueError("give exactly one of image_b64 and s3_key")
        return self


class PredictIn(ImageIn, PredictOptionsIn):
    """A JSON prediction request (multipart sends the file as ``image`` and these as fields)."""


class PredictForm(PredictOptionsIn):
    """The form fields of a multipart prediction request."""


class BatchIn(PredictOptionsIn):
    """Either ``images`` (answered inline) or ``snapshot_id`` (a batch job, answered 202)."""

    images: list[ImageIn] | None = Field(default=None, min_length=1)
    snapshot_id: str | None = Field(default=None, min_length=1, max_length=200)
    project_id: str | None = Field(
        default=None, pattern=SLUG, description="Project of the snapshot; the line's if unset."
    )
    splits: list[Split] | None = Field(
        default=None, min_length=1, description="Splits of the snapshot to label; all if unset."
    )
    model_version: str | None = Field(
        default=None,
        max_length=64,
        description="Version a job pins; the one serving the champion traffic if unset.",
    )

    @field_validator("snapshot_id", "model_version")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        # A job row keeps them, and PostgreSQL text cannot hold NUL: refused, not a 500.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @model_validator(mode="after")
    def _images_or_snapshot(self) -> Self:
        if (self.images is None) == (self.snapshot_id is None):
            raise ValueError("give exactly one of images and snapshot_id")
        if self.images is not None and (
            self.project_id or self.splits or self.model_version is not None
        ):
            raise ValueError("project_id, splits and model_version go with snapshot_id only")
        return self


class ClassScoreOut(BaseModel):
    class_name: str
    score: float


class PredictionOut(BaseModel):
    prediction_id: uuid.UUID
    """Send it back with the human label (``prediction_id``) so corrections are counted."""
    model_line: str
    registered_model: str
    model_version: str
    predicted_class: str
    confidence: float
    top_k: list[ClassScoreOut]
    input_sha256: str
    latency_ms: float
    cached: bool

    @classmethod
    def of(cls, prediction: Prediction) -> PredictionOut:
        return cls(
            prediction_id=prediction.prediction_id,
            model_line=prediction.model_line,
            registered_model=prediction.registered_model,
            model_version=prediction.model_version,
            predicted_class=prediction.predicted_class,
            confidence=prediction.confidence,
            top_k=[
                ClassScoreOut(class_name=c.class_name, score=c.score) for c in prediction.classes
            ],
            input_sha256=prediction.input_sha256,
            latency_ms=round(prediction.latency_ms, 3),
            cached=prediction.cached,
        )


class ItemErrorOut(BaseModel):
    code: str
    message: str
    field: str | None


class BatchItemOut(BaseModel):
    index: int
    prediction: PredictionOut | None = None
    error: ItemErrorOut | None = None

    @classmethod
    def of(cls, index: int, outcome: Outcome) -> BatchItemOut:
        if isinstance(outcome, ItemFailure):
            return cls(
                index=index,
                error=ItemErrorOut(
                    code=outcome.error.code,
                    message=outcome.error.message,
                    field=outcome.error.field,
                ),
            )
        return cls(index=index, prediction=PredictionOut.of(outcome))


class BatchOut(BaseModel):
    items: list[BatchItemOut]
    errors: int


class JobOut(BaseModel):
    """A batch job: its state, progress and where its results are."""

    job_id: uuid.UUID
    state: JobState
    project_id: str
    snapshot_id: str
    splits: list[Split]
    model_line: str
    registered_model: str
    model_version: str
    total: int | None
    done: int
    errors: int
    error_samples: list[JobError]
    failure: str | None
    results_location: str
    """``s3://<bucket>/<prefix>``: the JSONL parts, ``part-000000.jsonl`` on."""
    results_parts: int
    status_url: str
    results_url: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, job: BatchJob) -> JobOut:
        return cls(
            job_id=job.job_id,
            state=job.state,
            project_id=job.project_id,
            snapshot_id=job.snapshot_id,
            splits=job.splits,
            model_line=job.model_line,
            registered_model=job.registered_model,
            model_version=job.model_version,
            total=job.total,
            done=job.done,
            errors=job.errors,
            error_samples=job.error_samples,
            failure=job.failure,
            results_location=f"s3://{job.results_bucket}/{job.results_prefix}",
            results_parts=job.parts,
            status_url=f"/predict/batch/{job.job_id}",
            results_url=f"/predict/batch/{job.job_id}/results",
            created_at=job.created_at,
            updated_at=job.updated_at,
            finished_at=job.finished_at,
        )
