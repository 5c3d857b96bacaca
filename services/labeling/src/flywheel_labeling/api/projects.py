"""Projects: created and configured by admins, read by anyone signed in."""

from __future__ import annotations

from fastapi import APIRouter, status

from flywheel_labeling.api.deps import Admin, ProjectId, ProjectsDep, Reader
from flywheel_labeling.api.schemas import ProjectOut
from flywheel_labeling.ports import NewProject, ProjectChanges
from flywheel_runtime.http import error_responses

router = APIRouter(prefix="/v1/projects", tags=["projects"])


@router.post("", status_code=status.HTTP_201_CREATED, responses=error_responses(409))
async def create_project(spec: NewProject, projects: ProjectsDep, _: Admin) -> ProjectOut:
    """Create a project; emits project.configured."""
    return await projects.create(spec)


@router.get("")
async def list_projects(projects: ProjectsDep, _: Reader) -> list[ProjectOut]:
    return await projects.list_projects()


@router.get("/{project}")
async def get_project(project: ProjectId, projects: ProjectsDep, _: Reader) -> ProjectOut:
    return await projects.get(project)


@router.put("/{project}")
async def update_project(
    project: ProjectId, changes: ProjectChanges, projects: ProjectsDep, _: Admin
) -> ProjectOut:
    """Rename, add classes or change the retrain policy; emits project.configured on change."""
    return await projects.update(project, changes)
