"""The workspaces' errors: all ``FlywheelError``s, so one handler renders them.

An engineer only ever learns about their own environments: another engineer's answers
``environment_not_found`` exactly like one that never existed.
"""

from __future__ import annotations

from flywheel_runtime.errors import ConflictError, FlywheelError, InvalidInputError, NotFoundError


class WorkspaceNotFoundError(NotFoundError):
    """No environment of the caller has this id."""

    code = "environment_not_found"


class QuotaExceededError(ConflictError):
    """The request would take its engineer over a quota; ``details["limit"]`` names it."""

    code = "quota_exceeded"


class WorkspaceStateError(ConflictError):
    """The environment is not in a state that allows this (extending a stopped one, say)."""

    code = "environment_state"


class ExtensionRefusedError(ConflictError):
    """No time can be added: the cap on extensions or on the lifetime is reached."""

    code = "extension_refused"


class UnsatisfiableRequestError(InvalidInputError):
    """The platform has no GPUs of that kind and mode, or fewer than asked for in all, so the
    request could never start; ``details["field"]`` names the field at fault."""

    code = "unsatisfiable_request"


class EnvironmentSetupError(FlywheelError):
    """The backend could not set an environment up (its folder, venv or IDE would not start);
    the environment fails with this message."""

    code = "environment_setup_failed"
