"""Dataset snapshots: the immutable label sets every labels.saved points at."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from flywheel_labeling.api.deps import Cursor, LabelingDep, Limit, ProjectId, Reader
from flywheel_labeling.api.schemas import SnapshotOut, SnapshotPage

router = APIRouter(prefix="/v1/projects/{project}/snapshots", tags=["snapshots"])

SnapshotId = Annotated[str, Path(pattern=r"^snap-[0-9a-f]{1,64}$", description="Snapshot id.")]


@router.get("")
async def list_snapshots(
    project: ProjectId,
    labeling: LabelingDep,
    _: Reader,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> SnapshotPage:
    """Snapshots, newest first."""
    records, next_cursor = await labeling.snapshots(project, cursor, limit)
    return SnapshotPage(items=records, next_cursor=next_cursor)


@router.get("/{snapshot_id}")
async def get_snapshot(
    project: ProjectId, snapshot_id: SnapshotId, labeling: LabelingDep, _: Reader
) -> SnapshotOut:
    """A snapshot's manifest: every label in it, with counts per class and split."""
    record, manifest = await labeling.snapshot(project, snapshot_id)
    return SnapshotOut.of(record, manifest)
