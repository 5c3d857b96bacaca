"""``SnapshotReader`` on the S3 snapshot store that labeling writes."""

from __future__ import annotations

from flywheel_contracts.datasets import SnapshotSegment
from flywheel_data_monitor.errors import SegmentUnavailableError
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.errors import DependencyUnavailableError, NotFoundError


class S3SnapshotReader:
    """Reads segments and resolved snapshots; S3 trouble becomes a retryable error."""

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    async def read_segment(self, project_id: str, snapshot_id: str) -> SnapshotSegment:
        try:
            return await self._store.read_segment(project_id, snapshot_id)
        except (DependencyUnavailableError, NotFoundError) as error:
            # Missing is retried too: labeling writes the segment before it emits the event,
            # so a missing one is a lagging replica or an outage, never a batch to skip.
            raise SegmentUnavailableError(
                "snapshot segment unavailable",
                details={"project_id": project_id, "snapshot_id": snapshot_id},
            ) from error

    async def class_counts(self, project_id: str, snapshot_id: str) -> dict[str, int]:
        try:
            manifest = await self._store.resolve(project_id, snapshot_id)
        except (DependencyUnavailableError, NotFoundError) as error:
            raise SegmentUnavailableError(
                "snapshot unavailable",
                details={"project_id": project_id, "snapshot_id": snapshot_id},
            ) from error
        return manifest.class_counts()
