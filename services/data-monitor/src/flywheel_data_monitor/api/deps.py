"""FastAPI dependencies of the read API, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Path, Query, Request

from flywheel_contracts.events import SLUG
from flywheel_data_monitor.service import DataMonitor, DriftMonitor
from flywheel_runtime.auth import get_reader as get_reader


def get_monitor(request: Request) -> DataMonitor:
    """The monitor ``create_app`` put on the app's state."""
    return cast(DataMonitor, request.app.state.monitor)


MonitorDep = Annotated[DataMonitor, Depends(get_monitor)]


def get_drift(request: Request) -> DriftMonitor:
    """The drift monitor ``create_app`` put on the app's state."""
    return cast(DriftMonitor, request.app.state.drift)


DriftDep = Annotated[DriftMonitor, Depends(get_drift)]


ProjectId = Annotated[str, Path(pattern=SLUG, description="Project id (slug).")]
Limit = Annotated[int, Query(ge=1, le=500, description="Newest first, at most this many.")]
