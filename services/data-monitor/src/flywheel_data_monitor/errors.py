"""The data monitor's errors: all ``FlywheelError``s, so one middleware and one handler map them."""

from __future__ import annotations

from flywheel_runtime.errors import NotFoundError, PermanentError, RetryableError


class SegmentUnavailableError(RetryableError):
    """A batch's snapshot segment could not be read; redeliver rather than count it unchecked."""

    code = "segment_unavailable"


class SegmentMismatchError(PermanentError):
    """The segment under the event's snapshot id belongs to another batch: the event is wrong."""

    code = "segment_mismatch"


class ProjectNotFoundError(NotFoundError):
    """The monitor has never heard of the project (no labels, no configuration)."""

    code = "project_not_found"
