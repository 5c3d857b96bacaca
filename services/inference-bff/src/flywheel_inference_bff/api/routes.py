"""``/predict`` and ``/predict/batch``: thin fronts on the ``Predictor`` and ``BatchJobs``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from flywheel_inference_bff.api.deps import (
    JobsDep,
    Predicter,
    PredictorDep,
    SettingsDep,
    media_type,
    require_json,
)
from flywheel_inference_bff.api.schemas import (
    SERVING_ERRORS,
    BatchIn,
    BatchItemOut,
    BatchOut,
    ImageIn,
    JobOut,
    PredictForm,
    PredictIn,
    PredictionOut,
)
from flywheel_inference_bff.errors import (
    FieldError,
    ImageTooLargeError,
    UnsupportedContentTypeError,
)
from flywheel_inference_bff.inputs import (
    ImageBytes,
    ImageRef,
    StoredImage,
    decode_base64,
    stored_key,
)
from flywheel_inference_bff.jobs import JobRequest
from flywheel_inference_bff.service import PredictOptions
from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.http import error_responses

router = APIRouter(tags=["predict"])

M = TypeVar("M", bound=BaseModel)

JobId = Annotated[uuid.UUID, Path(description="Batch job id.")]

_IMAGE_TYPES = ("image/", "application/octet-stream")
_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PredictIn.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "model_line": {"type": "string"},
                        "top_k": {"type": "integer"},
                        "routing_key": {"type": "string"},
                    },
                }
            },
        },
    }
}


@router.post("/predict", openapi_extra=_PREDICT_BODY, responses=SERVING_ERRORS)
async def predict(
    request: Request, predictor: PredictorDep, settings: SettingsDep, _: Predicter
) -> PredictionOut:
    """One image (multipart ``image``, ``image_b64`` or ``s3_key``) → its top-k classes.

    Logs inference.logged (fire-and-forget) with ``request_id`` = ``prediction_id``.
    """
    kind = media_type(request)
    if kind == "multipart/form-data":
        image, options = await _multipart(request, settings)
    elif kind == "application/json":
        body = _parse(PredictIn, await request.body())
        image = _image_ref(body, "", settings)
        options = _options(body.model_line, body.top_k, body.routing_key, settings)
    else:
        raise UnsupportedContentTypeError(
            "send the image as multipart/form-data (field 'image') or as JSON "
            "(image_b64 or s3_key)",
            field="content-type",
            details={"received": kind or None},
        )
    return PredictionOut.of(await predictor.predict(image, options))


@router.post(
    "/predict/batch",
    dependencies=[Depends(require_json)],
    responses={
        202: {"model": JobOut, "description": "A batch job over a snapshot, queued."},
        **SERVING_ERRORS,
    },
)
async def predict_batch(
    batch: BatchIn,
    predictor: PredictorDep,
    jobs: JobsDep,
    settings: SettingsDep,
    principal: Predicter,
    response: Response,
) -> BatchOut | JobOut:
    """``images``: answered inline, one Triton call per chunk. ``snapshot_id``: a batch job
    writing pseudo labels to S3, answered 202 at once; follow ``status_url``."""
    if batch.snapshot_id is not None:
        job = await jobs.create(
            JobRequest(
                snapshot_id=batch.snapshot_id,
                project_id=batch.project_id,
                model_line=batch.model_line,
                model_version=batch.model_version,
                **({"splits": batch.splits} if batch.splits else {}),
            ),
            requested_by=principal.username,
        )
        response.status_code = status.HTTP_202_ACCEPTED
        response.headers["Location"] = f"/predict/batch/{job.job_id}"
        return JobOut.of(job)
    images = batch.images or []
    if len(images) > settings.max_batch_images:
        raise FieldError(
            f"a batch holds at most {settings.max_batch_images} images, not {len(images)}; "
            "send a snapshot_id for more",
            field="images",
        )
    refs = [_image_ref(image, f"images.{i}.", settings) for i, image in enumerate(images)]
    options = _options(batch.model_line, batch.top_k, batch.routing_key, settings)
    outcomes = await predictor.predict_many(refs, options)
    items = [BatchItemOut.of(i, outcome) for i, outcome in enumerate(outcomes)]
    return BatchOut(items=items, errors=sum(item.error is not None for item in items))


@router.get("/predict/batch/{job_id}")
async def get_batch_job(job_id: JobId, jobs: JobsDep, _: Predicter) -> JobOut:
    """State, progress (done/total, errors) and where the results are."""
    return JobOut.of(await jobs.get(job_id))


@router.get(
    "/predict/batch/{job_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}, **error_responses(409)},
)
async def get_batch_results(job_id: JobId, jobs: JobsDep, _: Predicter) -> StreamingResponse:
    """The pseudo labels of a succeeded job as JSON lines; each line's ``label`` is a
    ``labels:batch`` item labeling accepts (``source`` pseudo)."""
    parts: AsyncIterator[bytes] = await jobs.results(job_id)
    return StreamingResponse(parts, media_type="application/x-ndjson")


# --- parsing ------------------------------------------------------------------------------------


def _parse(model: type[M], raw: bytes | dict[str, Any]) -> M:
    """A body model, or the same 422 FastAPI gives for a declared body."""
    try:
        if isinstance(raw, bytes):
            return model.model_validate_json(raw)
        return model.model_validate(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [dict(e) | {"loc": ("body", *e["loc"])} for e in error.errors()]
        ) from error


async def _multipart(request: Request, settings: BffSettings) -> tuple[ImageRef, PredictOptions]:
    form = await request.form(max_files=1, max_fields=20)
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise FieldError("send the image as the multipart file 'image'", field="image")
    declared = (image.content_type or "application/octet-stream").lower()
    if not declared.startswith(_IMAGE_TYPES):
        raise UnsupportedContentTypeError(
            f"the image part is {declared}; send an image", field="image"
        )
    data = await image.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"image is more than the limit of {settings.max_image_bytes} bytes",
            field="image",
            details={"limit_bytes": settings.max_image_bytes},
        )
    fields = _parse(PredictForm, {k: v for k, v in form.items() if k != "image"})
    return ImageBytes(data, "image"), _options(
        fields.model_line, fields.top_k, fields.routing_key, settings
    )


def _image_ref(image: ImageIn, prefix: str, settings: BffSettings) -> ImageRef:
    if image.s3_key is not None:
        field = f"{prefix}s3_key"
        return StoredImage(stored_key(image.s3_key, settings.data_bucket, field), field)
    field = f"{prefix}image_b64"
    encoded = image.image_b64 or ""
    # Refused before decoding: base64 is 4 characters for every 3 bytes.
    if len(encoded) * 3 // 4 > settings.max_image_bytes + 2:
        raise ImageTooLargeError(
            f"image is more than the limit of {settings.max_image_bytes} bytes",
            field=field,
            details={"limit_bytes": settings.max_image_bytes},
        )
    return ImageBytes(decode_base64(encoded, field), field)


def _options(
    model_line: str | None, top_k: int | None, routing_key: str | None, settings: BffSettings
) -> PredictOptions:
    return PredictOptions(
        model_line=model_line or settings.default_model_line,
        top_k=top_k or settings.default_top_k,
        routing_key=routing_key,
    )
