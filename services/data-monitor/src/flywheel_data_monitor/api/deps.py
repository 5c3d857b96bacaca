"""FastAPI dependencies of the read API, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel_contracts.events import SLUG
from flywheel_data_monitor.service import DataMonitor
from flywheel_runtime.auth import Principal, TokenVerifier, declares_auth, get_current_principal


def get_monitor(request: Request) -> DataMonitor:
    """The monitor ``create_app`` put on the app's state."""
    return cast(DataMonitor, request.app.state.monitor)


MonitorDep = Annotated[DataMonitor, Depends(get_monitor)]


_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT")
ANONYMOUS = Principal(subject="anonymous", username="anonymous")


@declares_auth()
async def get_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Whoever may read: any authenticated caller once the app factory puts a
    ``TokenVerifier`` on ``app.state.token_verifier``; everyone while it does not (local runs).
    """
    if not isinstance(getattr(request.app.state, "token_verifier", None), TokenVerifier):
        return ANONYMOUS
    return await get_current_principal(request, credentials)


ProjectId = Annotated[str, Path(pattern=SLUG, description="Project id (slug).")]
Limit = Annotated[int, Query(ge=1, le=500, description="Newest first, at most this many.")]
