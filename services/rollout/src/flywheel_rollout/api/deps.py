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

from flywheel_contracts.events import SLUG
from flywheel_rollout.service import Rollout
from flywheel_runtime.auth import Principal, get_reader, role_or_anonymous

OPERATOR_ROLE = "operator"
get_operator = role_or_anonymous(OPERATOR_ROLE)
"""Whoever may act: the ``operator`` role (everyone while auth is off)."""


async def get_rollout(request: Request) -> Rollout:
    """The use cases ``create_app`` put on the app's state."""
    return cast(Rollout, request.app.state.rollout)


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
