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

from flywheel_runtime.auth import Principal, get_reader, role_or_anonymous
from flywheel_trainer_dispatch.service import TrainerDispatch

OPERATOR_ROLE = "operator"
get_operator = role_or_anonymous(OPERATOR_ROLE)
"""Whoever may act: the ``operator`` role (everyone while auth is off)."""


async def get_dispatch(request: Request) -> TrainerDispatch:
    """The use cases ``create_app`` put on the app's state."""
    return cast(TrainerDispatch, request.app.state.dispatch)


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
