"""One error hierarchy for every service.

Each error carries a stable ``code``, the HTTP status it maps to and whether retrying the same
work may succeed. The broker middleware reads ``retryable`` to choose nack-requeue or reject to
the dead-letter queue; the FastAPI handler renders ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class FlywheelError(Exception):
    """Base of every error a Flywheel service raises on purpose."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_body(self) -> dict[str, Any]:
        """The JSON body an HTTP client sees."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class InvalidInputError(FlywheelError):
    """The caller sent something we will never accept; retrying cannot help."""

    code = "invalid_input"
    http_status = 422


class NotFoundError(FlywheelError):
    code = "not_found"
    http_status = 404


class ConflictError(FlywheelError):
    code = "conflict"
    http_status = 409


class PayloadTooLargeError(InvalidInputError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaTypeError(InvalidInputError):
    code = "unsupported_media_type"
    http_status = 415


class AuthenticationError(FlywheelError):
    code = "unauthenticated"
    http_status = 401


class PermissionDeniedError(FlywheelError):
    code = "forbidden"
    http_status = 403


class DependencyUnavailableError(FlywheelError):
    """A server we depend on (database, broker, S3, MLflow, Triton) did not answer; try later."""

    code = "dependency_unavailable"
    http_status = 503
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int = 5,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s


class DependencyRefusedError(FlywheelError):
    """A server we depend on refused our credentials or permissions.

    That is our configuration's fault (wrong keys, missing grants), not the caller's nor a
    passing outage: the service cannot do this work (503), and retrying the same request
    cannot help until an operator fixes the configuration, so an event meeting it is
    dead-lettered instead of redelivered until its limit.
    """

    code = "dependency_refused"
    http_status = 503
    retryable = False


class RetryableError(FlywheelError):
    """Transient failure while handling an event: redeliver, bounded by the delivery limit."""

    code = "retryable"
    http_status = 503
    retryable = True


class PermanentError(FlywheelError):
    """The event can never be handled; it belongs in the dead-letter queue."""

    code = "permanent"
    http_status = 422
