"""The rollout's errors: all ``FlywheelError``s, so one middleware and one handler map them."""

from __future__ import annotations

from flywheel_runtime.errors import ConflictError, NotFoundError


class CanaryNotFoundError(NotFoundError):
    """No canary has this id, or the line has no canary in progress."""

    code = "canary_not_found"


class CanaryStateError(ConflictError):
    """The action does not apply to the canary in its current state."""

    code = "canary_state_conflict"
