"""The trainer dispatch's errors: all ``FlywheelError``s, so one middleware and one handler map
them."""

from __future__ import annotations

from flywheel_runtime.errors import ConflictError, FlywheelError, NotFoundError


class RunNotFoundError(NotFoundError):
    """No training run has this id."""

    code = "run_not_found"


class RunFinishedError(ConflictError):
    """The run has already ended; it cannot be cancelled any more."""

    code = "run_finished"


class LaunchError(FlywheelError):
    """The backend could not start a run at all (missing program, unwritable runs folder)."""

    code = "launch_failed"
