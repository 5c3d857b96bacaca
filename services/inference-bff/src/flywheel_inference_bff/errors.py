"""The BFF's errors: all ``FlywheelError``s, so one handler renders them.

Errors about one input carry ``details["field"]``: the request field (``image``,
``images.3.image_b64``, ``tasks.0.data.image``) that was refused, so a client can point at it.
Serving trouble is a 503 (504 for a timeout) with ``Retry-After``; a client mistake is never a
500. ``InferenceUnreachableError`` tells "Triton is not there" from every failure Triton
answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flywheel_runtime.errors import (
    ConflictError,
    DependencyUnavailableError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)


def _with_field(field: str | None, details: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(details or {})
    if field is not None:
        merged["field"] = field
    return merged


class FieldError(InvalidInputError):
    """An input that will never be accepted, naming the field it came in."""

    def __init__(
        self, message: str, *, field: str | None = None, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=_with_field(field, details))

    @property
    def field(self) -> str | None:
        value = self.details.get("field")
        return value if isinstance(value, str) else None


class InvalidImageError(FieldError):
    """Not an image, a truncated or corrupt one, or an encoding we do not read."""

    code = "invalid_image"


class ImageTooLargeError(FieldError, PayloadTooLargeError):
    code = "image_too_large"
    http_status = 413


class UnsupportedContentTypeError(FieldError, UnsupportedMediaTypeError):
    code = "unsupported_media_type"
    http_status = 415


class ImageSourceRefusedError(FieldError):
    """An image reference the BFF will not follow: another bucket, an http URL, a local path."""

    code = "image_source_refused"


class ImageNotFoundError(FieldError):
    """An ``s3_key`` that points at nothing in the data bucket."""

    code = "image_not_found"


class ModelLineNotFoundError(NotFoundError):
    """A model line with no routing weights and no champion in the registry."""

    code = "model_line_not_found"

    def __init__(self, model_line: str) -> None:
        super().__init__(
            f"model line {model_line!r} has no serving version",
            details={"model_line": model_line},
        )


class InferenceUnavailableError(DependencyUnavailableError):
    """Triton did not answer, or answered with its own failure."""

    code = "inference_unavailable"


class InferenceUnreachableError(InferenceUnavailableError):
    """Triton could not be reached at all (connection refused, reset or dropped): no model saw
    the request. The client sees the same 503; the inference log marks it
    ``serving_unavailable``, so a canary does not blame the version for it."""


class ModelNotReadyError(DependencyUnavailableError):
    """Triton answers but the chosen version is not loaded (or still loading)."""

    code = "model_not_ready"


class InferenceTimeoutError(DependencyUnavailableError):
    """Triton did not answer within ``inference_timeout_s``."""

    code = "inference_timeout"
    http_status = 504


class ModelUnusableError(FlywheelError):
    """The served model does not fit its registered files (output width, dtype): a deployment
    fault, not the client's."""

    code = "model_unusable"
    http_status = 502


class JobNotFoundError(NotFoundError):
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"batch job {job_id} not found", details={"job_id": job_id})


class JobNotFinishedError(ConflictError):
    """Results of a job that has not succeeded (yet)."""

    code = "job_not_finished"
