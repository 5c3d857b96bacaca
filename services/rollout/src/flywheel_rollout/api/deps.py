"""FastAPI dependencies of the operator API, as ``Annotated`` aliases.

Authentication plugs in here and nowhere else: with ``auth`` set in the settings, ``create_app``
puts a ``TokenVerifier`` on ``app.state.token_verifier`` and every route checks bearer tokens
(reading: any valid token; actions: the ``operator`` role). Without it the routes are open, for
local runs, and the caller is recorded as ``anonymous``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, cast

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel_contracts.events import SLUG
from flywheel_rollout.service import Rollout
from flywheel_runtime.auth import (
    Principal,
    TokenVerifier,
    declares_auth,
    get_current_principal,
    require_roles,
)

OPERATOR_ROLE = "operator"
ANONYMOUS = Principal(subject="anonymous", username="anonymous")

_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT")
_operator = require_roles(OPERATOR_ROLE)


async def get_rollout(request: Request) -> Rollout:
    """The use cases ``create_app`` put on the app's state."""
    return cast(Rollout, request.app.state.rollout)


def _auth_enabled(request: Request) -> bool:
    return isinstance(getattr(request.app.state, "token_verifier", None), TokenVerifier)


@declares_auth()
async def get_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Whoever may read: any authenticated caller (everyone while auth is off)."""
    if not _auth_enabled(request):
        return ANONYMOUS
    return await get_current_principal(request, credentials)


@declares_auth(OPERATOR_ROLE)
async def get_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Whoever may act on canaries and lines: the ``operator`` role (everyone while auth is
    off)."""
    if not _auth_enabled(request):
        return ANONYMOUS
    return await _operator(await get_current_principal(request, credentials))


RolloutDep = Annotated[Rollout, Depends(get_rollout)]
Reader = Annotated[Principal, Depends(get_reader)]
Operator = Annotated[Principal, Depends(get_operator)]
ModelLine = Annotated[str, Path(pattern=SLUG, description="Model line.")]
RolloutId = Annotated[uuid.UUID, Path(description="Canary (rollout) id.")]
Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many, newest kept.")]
LineFilter = Annotated[
    str | None, Query(pattern=SLUG, description="Only this model line's canaries.")
]
CorrelationId = Annotated[
    uuid.UUID | None,
    Query(description="Only entries of this chain (labels → trigger → … → verdict)."),
]
