"""Read-only routes: thin fronts on ``DataMonitor`` and ``DriftMonitor``; an unknown project
or report answers 404."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import Response

from flywheel_data_monitor.api.deps import DriftDep, Limit, MonitorDep, ProjectId, get_reader
from flywheel_data_monitor.api.schemas import (
    DecisionsOut,
    DriftReportsOut,
    ProjectStateOut,
    QualityReportsOut,
)
from flywheel_data_monitor.ports import StoredDriftReport

router = APIRouter(
    prefix="/v1/projects/{project_id}", tags=["projects"], dependencies=[Depends(get_reader)]
)


@router.get("/state")
async def project_state(project_id: ProjectId, monitor: MonitorDep) -> ProjectStateOut:
    """Pending labels, policy in force, head and trained snapshots, and the latest evaluation."""
    state = await monitor.project(project_id)
    quarantined = await monitor.quarantined_count(project_id)
    return ProjectStateOut.build(state, monitor.policy_of(state), quarantined)


@router.get("/decisions")
async def project_decisions(
    project_id: ProjectId, monitor: MonitorDep, limit: Limit = 50
) -> DecisionsOut:
    """Retrains fired for the project, newest first, each with every input it was decided on."""
    return DecisionsOut(decisions=await monitor.decisions(project_id, limit))


@router.get("/quality-reports")
async def project_quality_reports(
    project_id: ProjectId, monitor: MonitorDep, limit: Limit = 50
) -> QualityReportsOut:
    """Data-quality reports of the project's batches, newest first, with every check's figures."""
    return QualityReportsOut(reports=await monitor.reports(project_id, limit))


drift_router = APIRouter(prefix="/v1", tags=["drift"], dependencies=[Depends(get_reader)])

Feature = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_-]{0,63}$", description="A test's feature.")]


@drift_router.get("/projects/{project_id}/drift-reports")
async def project_drift_reports(
    project_id: ProjectId, drift: DriftDep, limit: Limit = 50
) -> DriftReportsOut:
    """Drift checks of the project's model lines, newest first: every test's numbers and
    p-values, what followed, and the keys of the plots."""
    return DriftReportsOut(reports=await drift.reports(project_id, limit))


@drift_router.get("/drift-reports/{report_id}")
async def drift_report(report_id: uuid.UUID, drift: DriftDep) -> StoredDriftReport:
    """One drift report, whole."""
    return await drift.report(report_id)


@drift_router.get(
    "/drift-reports/{report_id}/plots/{feature}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The test's plot."}},
)
async def drift_plot(report_id: uuid.UUID, feature: Feature, drift: DriftDep) -> Response:
    """The PNG of one test of a report (reference against window)."""
    return Response(await drift.plot(report_id, feature), media_type="image/png")
