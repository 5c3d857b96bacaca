"""FastAPI dependencies of the API, as ``Annotated`` aliases.

Authentication plugs in here and nowhere else: with ``auth`` set in the settings, ``create_app``
puts a ``TokenVerifier`` on ``app.state.token_verifier`` and every route checks bearer tokens:
an engineer's environments need the ``engineer`` role, and each engineer reaches only their own
(the token's subject owns what it creates); the operator routes need the ``operator`` role.
Without it the routes are open, for local runs, and every caller is ``anonymous``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, cast

from fastapi import Depends, Header, Path, Query, Request

from flywheel_runtime.auth import Principal, role_or_anonymous
from flywheel_workspaces.ports import WorkspaceState
from flywheel_workspaces.service import Engineer, Workspaces

ENGINEER_ROLE = "engineer"
OPERATOR_ROLE = "operator"
get_engineer = role_or_anonymous(ENGINEER_ROLE)
"""An engineer asking about their own environments (everyone while auth is off)."""
get_operator = role_or_anonymous(OPERATOR_ROLE)
"""An operator, who sees every environment and the usage report (everyone while auth is off)."""


async def get_workspaces(request: Request) -> Workspaces:
    """The use cases ``create_app`` put on the app's state."""
    return cast(Workspaces, request.app.state.workspaces)


def engineer(principal: Principal) -> Engineer:
    return Engineer(subject=principal.subject, name=principal.username)


WorkspacesDep = Annotated[Workspaces, Depends(get_workspaces)]
EngineerDep = Annotated[Principal, Depends(get_engineer)]
OperatorDep = Annotated[Principal, Depends(get_operator)]
WorkspaceId = Annotated[uuid.UUID, Path(description="Environment id.")]
States = Annotated[
    list[WorkspaceState] | None,
    Query(description="Only environments in any of these states; default: all but deleted."),
]
Owner = Annotated[
    str | None,
    Query(min_length=1, max_length=255, description="Only this engineer's (token subject)."),
]
Since = Annotated[
    datetime | None,
    Query(description="Start of the window, with a time zone; default: 30 days before until."),
]
Until = Annotated[datetime | None, Query(description="End of the window; default: now.")]
IdempotencyKey = Annotated[
    uuid.UUID | None,
    Header(
        alias="Idempotency-Key",
        description="A UUID; sending the same one again returns the environment it created.",
    ),
]
