"""Read-only routes: thin fronts on ``DataMonitor``; an unknown project answers 404."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from flywheel_data_monitor.api.deps import Limit, MonitorDep, ProjectId, get_reader
from flywheel_data_monitor.api.schemas import DecisionsOut, ProjectStateOut, QualityReportsOut

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
