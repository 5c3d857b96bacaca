"""Reading and writing dataset snapshots in S3.

Segments are written once under content-addressed keys. Resolving a snapshot walks its chain
back to the nearest full manifest (a checkpoint written every few segments) and replays the
segments forward; resolved manifests are cached, since a snapshot never changes.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

from flywheel_contracts.datasets import (
    ManifestEntry,
    SnapshotManifest,
    SnapshotSegment,
    apply_segment,
    manifest_key,
    segment_key,
)
from flywheel_runtime.errors import NotFoundError
from flywheel_runtime.storage import DATA_BUCKET, ObjectStorage

JSON = "application/json"


class SnapshotStore:
    """Snapshots of every project, in the data bucket."""

    def __init__(
        self,
        storage: ObjectStorage,
        *,
        bucket: str = DATA_BUCKET,
        checkpoint_every: int = 20,
        cache_size: int = 32,
    ) -> None:
        self._storage = storage
        self._bucket = bucket
        self._checkpoint_every = checkpoint_every
        self._cache: OrderedDict[tuple[str, str], SnapshotManifest] = OrderedDict()
        self._cache_size = cache_size

    async def write_segment(self, segment: SnapshotSegment) -> None:
        """Store a segment (idempotent: the key is its content address)."""
        await self._storage.put(
            self._bucket,
            segment_key(segment.project_id, segment.snapshot_id),
            segment.model_dump_json().encode(),
            content_type=JSON,
        )

    async def read_segment(self, project_id: str, snapshot_id: str) -> SnapshotSegment:
        try:
            raw = await self._storage.get(self._bucket, segment_key(project_id, snapshot_id))
        except NotFoundError as error:
            raise NotFoundError(
                f"snapshot {snapshot_id!r} not found in project {project_id!r}",
                details={"snapshot_id": snapshot_id},
            ) from error
        return SnapshotSegment.model_validate_json(raw)

    async def resolve(self, project_id: str, snapshot_id: str) -> SnapshotManifest:
        """Every live label of a snapshot."""
        cached = self._cache.get((project_id, snapshot_id))
        if cached is not None:
            self._cache.move_to_end((project_id, snapshot_id))
            return cached
        chain: list[SnapshotSegment] = []
        base: dict[uuid.UUID, ManifestEntry] = {}
        current: str | None = snapshot_id
        while current is not None:
            if current != snapshot_id and (project_id, current) in self._cache:
                base = {e.label_id: e for e in self._cache[(project_id, current)].entries}
                break
            checkpoint = await self._read_manifest(project_id, current)
            if checkpoint is not None:
                base = {e.label_id: e for e in checkpoint.entries}
                break
            segment = await self.read_segment(project_id, current)
            chain.append(segment)
            current = segment.parent_snapshot_id
        entries = base
        for segment in reversed(chain):
            entries = apply_segment(entries, segment)
        manifest = SnapshotManifest(
            snapshot_id=snapshot_id,
            project_id=project_id,
            entries=sorted(entries.values(), key=lambda e: str(e.label_id)),
        )
        if len(chain) >= self._checkpoint_every:
            await self._write_manifest(manifest)
        self._remember(manifest)
        return manifest

    async def _read_manifest(self, project_id: str, snapshot_id: str) -> SnapshotManifest | None:
        key = manifest_key(project_id, snapshot_id)
        if not await self._storage.exists(self._bucket, key):
            return None
        return SnapshotManifest.model_validate_json(await self._storage.get(self._bucket, key))

    async def _write_manifest(self, manifest: SnapshotManifest) -> None:
        await self._storage.put(
            self._bucket,
            manifest_key(manifest.project_id, manifest.snapshot_id),
            manifest.model_dump_json().encode(),
            content_type=JSON,
        )

    def _remember(self, manifest: SnapshotManifest) -> None:
        self._cache[(manifest.project_id, manifest.snapshot_id)] = manifest
        self._cache.move_to_end((manifest.project_id, manifest.snapshot_id))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
