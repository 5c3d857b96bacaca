import hashlib
import uuid
from datetime import UTC, datetime

import pytest

from flywheel_contracts.datasets import (
    ManifestEntry,
    SnapshotSegment,
    image_key,
    manifest_key,
    snapshot_id_for,
    split_for,
)
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.errors import NotFoundError
from flywheel_runtime.storage import ObjectStorage

pytestmark = pytest.mark.integration


def _entry(i: int, class_name: str) -> ManifestEntry:
    sha = hashlib.sha256(f"img-{i}".encode()).hexdigest()
    return ManifestEntry(
        label_id=uuid.UUID(int=i),
        image_sha256=sha,
        image_key=image_key(sha),
        class_name=class_name,
        split=split_for(sha),
    )


async def _chain(store: SnapshotStore, length: int) -> list[str]:
    parent: str | None = None
    ids = []
    for i in range(length):
        upserts = [_entry(i, str(i % 10))]
        deletes = [uuid.UUID(int=i - 2)] if i >= 2 and i % 5 == 0 else []
        snapshot_id = snapshot_id_for(parent, upserts, deletes)
        await store.write_segment(
            SnapshotSegment(
                snapshot_id=snapshot_id,
                project_id="digits",
                parent_snapshot_id=parent,
                batch_id=uuid.uuid4(),
                created_at=datetime.now(UTC),
                upserts=upserts,
                deletes=deletes,
            )
        )
        ids.append(snapshot_id)
        parent = snapshot_id
    return ids


async def test_every_snapshot_resolves_to_its_own_labels_forever(
    storage: ObjectStorage, unique_bucket: str
) -> None:
    store = SnapshotStore(storage, bucket=unique_bucket, checkpoint_every=4)
    ids = await _chain(store, 12)

    latest = await store.resolve("digits", ids[-1])
    early = await store.resolve("digits", ids[2])
    fresh = SnapshotStore(storage, bucket=unique_bucket, checkpoint_every=4)

    deleted = {uuid.UUID(int=3), uuid.UUID(int=8)}
    assert {e.label_id for e in latest.entries} == {uuid.UUID(int=i) for i in range(12)} - deleted
    assert {e.label_id for e in early.entries} == {uuid.UUID(int=i) for i in range(3)}
    assert await fresh.resolve("digits", ids[2]) == early
    assert await fresh.resolve("digits", ids[-1]) == latest
    assert await storage.exists(unique_bucket, manifest_key("digits", ids[-1]))
    assert latest.class_counts()["1"] == 2


async def test_unknown_snapshot_is_not_found(storage: ObjectStorage, unique_bucket: str) -> None:
    store = SnapshotStore(storage, bucket=unique_bucket)

    with pytest.raises(NotFoundError, match="snap-missing"):
        await store.resolve("digits", "snap-missing")
