"""FastAPI dependencies of the operator API, as ``Annotated`` aliases.

Authentication plugs in here and nowhere else: with ``auth`` set in the settings, ``create_app``
puts a ``TokenVerifier`` on ``app.state.token_verifier`` and every route checks bearer tokens
(reading: any valid token; triggering and cancelling: the ``operator`` role). Without it the
routes are open, for local runs, and the caller is recorded as ``anonymous``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, cast

from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel_runtime.auth import (
    Principal,
    TokenVerifier,
    declares_auth,
    get_current_principal,
    require_roles,
)
from flywheel_trainer_dispatch.service import TrainerDispatch

OPERATOR_ROLE = "operator"
ANONYMOUS = Principal(subject="anonymous", username="anonymous")

_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT")
_operator = require_roles(OPERATOR_ROLE)


async def get_dispatch(request: Request) -> TrainerDispatch:
    """The use cases ``create_app`` put on the app's state."""
    return cast(TrainerDispatch, request.app.state.dispatch)


def _auth_enabled(request: Request) -> bool:
    return isinstance(getattr(request.app.state, "token_verifier", None), TokenVerifier)


@declares_auth()
async def get_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Whoever may read runs: any authenticated caller (everyone while auth is off)."""
    if not _auth_enabled(request):
        return ANONYMOUS
    return await get_current_principal(request, credentials)


@declares_auth(OPERATOR_ROLE)
async def get_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Whoever may trigger and cancel runs: the ``operator`` role (everyone while auth is off)."""
    if not _auth_enabled(request):
        return ANONYMOUS
    return await _operator(await get_current_principal(request, credentials))


DispatchDep = Annotated[TrainerDispatch, Depends(get_dispatch)]
Reader = Annotated[Principal, Depends(get_reader)]
Operator = Annotated[Principal, Depends(get_operator)]
RunId = Annotated[uuid.UUID, Path(description="Training run id.")]
Limit = Annotated[int, Query(ge=1, le=500, description="Newest first, at most this many.")]
IdempotencyKey = Annotated[
    uuid.UUID | None,
    Header(
        alias="Idempotency-Key",
        description="A UUID; sending the same one again returns the run it created.",
    ),
]
