"""MNIST digits written as a labeling tool leaves them: PNGs in the data bucket, one segment."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from flywheel_contracts.datasets import (
    ManifestEntry,
    SnapshotSegment,
    image_key,
    snapshot_id_for,
    split_for,
)
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.storage import ObjectStorage


@dataclass(frozen=True)
class WrittenSnapshot:
    snapshot_id: str
    entries: list[ManifestEntry]
    pngs: dict[str, bytes]
    """Image bytes by sha256."""


async def write_mnist_snapshot(
    storage: ObjectStorage,
    bucket: str,
    *,
    project_id: str,
    count: int,
    relabel: Callable[[ManifestEntry], str] | None = None,
) -> WrittenSnapshot:
    """The first ``count`` MNIST training digits as one snapshot (``relabel`` poisons labels)."""
    from flywheel_vision.data import load_mnist, to_png  # torch only when a test needs MNIST

    images, labels = load_mnist("train", count)
    pngs: dict[str, bytes] = {}
    entries = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        png = to_png(image)
        sha = hashlib.sha256(png).hexdigest()
        pngs[sha] = png
        entry = ManifestEntry(
            label_id=uuid.UUID(int=index + 1),
            image_sha256=sha,
            image_key=image_key(sha),
            class_name=str(int(label)),
            split=split_for(sha),
        )
        if relabel is not None:
            entry = entry.model_copy(update={"class_name": relabel(entry)})
        entries.append(entry)
    gate = asyncio.Semaphore(8)

    async def upload(sha: str, png: bytes) -> None:
        async with gate:
            await storage.put(bucket, image_key(sha), png, content_type="image/png")

    await asyncio.gather(*(upload(sha, png) for sha, png in pngs.items()))
    snapshot_id = snapshot_id_for(None, entries, [])
    await SnapshotStore(storage, bucket=bucket).write_segment(
        SnapshotSegment(
            snapshot_id=snapshot_id,
            project_id=project_id,
            parent_snapshot_id=None,
            batch_id=uuid.uuid4(),
            created_at=datetime.now(UTC),
            upserts=entries,
        )
    )
    return WrittenSnapshot(snapshot_id, entries, pngs)
