"""The labeling service's errors: all ``FlywheelError``s, so one handler renders them.

Errors about one input carry ``details["field"]``: the request field (``class_name``,
``items.3.image_base64``) that was refused, so a client can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flywheel_runtime.errors import (
    AuthenticationError,
    ConflictError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
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

    def at(self, field: str) -> FieldError:
        """The same error, naming ``field`` (a batch prefixes ``items.N.``)."""
        self.details["field"] = field
        return self


class UnknownClassError(FieldError):
    code = "unknown_class"


class InvalidImageError(FieldError):
    """Not an image, a truncated or corrupt one, or a format we do not decode."""

    code = "invalid_image"


class ImageTooLargeError(FieldError, PayloadTooLargeError):
    code = "image_too_large"
    http_status = 413


class UnsupportedContentTypeError(FieldError, UnsupportedMediaTypeError):
    code = "unsupported_media_type"
    http_status = 415


class ImageSourceRefusedError(FieldError):
    """An image reference we will not follow: another bucket, a host not allow-listed, a
    private address, a redirect elsewhere."""

    code = "image_source_refused"


class ImageNotFoundError(FieldError):
    """An image reference that points at nothing."""

    code = "image_not_found"


class TaskTypeNotSupportedError(FieldError):
    code = "task_type_not_supported"


class InvalidCursorError(FieldError):
    code = "invalid_cursor"


class ImageFetchFailedError(FlywheelError):
    """The host of an image URL did not deliver it (unreachable, timed out, 5xx)."""

    code = "image_fetch_failed"
    http_status = 502

    def __init__(
        self, message: str, *, field: str | None = None, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=_with_field(field, details))

    def at(self, field: str) -> ImageFetchFailedError:
        self.details["field"] = field
        return self


class ProjectNotFoundError(NotFoundError):
    code = "project_not_found"

    def __init__(self, project_id: str) -> None:
        super().__init__(f"project {project_id!r} not found", details={"project_id": project_id})


class SnapshotNotFoundError(NotFoundError):
    code = "snapshot_not_found"


class ProjectExistsError(ConflictError):
    code = "project_exists"


class InvalidLabelsRequestedError(FieldError):
    """A labels.requested the contract let through that the queue cannot hold (a score that
    is no finite number, text the database cannot store): never handled, so dead-lettered."""

    code = "invalid_labels_requested"


class LabelRequestNotFoundError(NotFoundError):
    code = "label_request_not_found"

    def __init__(self, project_id: str, input_sha256: str) -> None:
        super().__init__(
            f"no label request for image {input_sha256} in project {project_id!r}",
            details={"project_id": project_id, "input_sha256": input_sha256},
        )


class LabelRequestClosedError(ConflictError):
    """The request was answered by a label already; there is nothing left to dismiss."""

    code = "label_request_closed"


class RequestedImageMissingError(NotFoundError):
    """The image a label request points at is not in the data bucket (any more)."""

    code = "image_not_found"


class WebhookSecretError(AuthenticationError):
    """The Label Studio webhook came without the shared secret, or with a wrong one."""

    code = "invalid_webhook_secret"


class WebhookDisabledError(PermissionDeniedError):
    code = "webhook_disabled"


ItemError = FieldError | ImageFetchFailedError
"""Errors that refuse one item of a batch while the others go on."""
