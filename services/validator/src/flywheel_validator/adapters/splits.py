"""``SplitReader`` on S3: a snapshot's frozen held-out splits, images fetched from the data
bucket."""

from __future__ import annotations

import asyncio
import uuid

from flywheel_contracts.datasets import ManifestEntry, Split
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.errors import InvalidInputError
from flywheel_runtime.storage import ObjectStorage
from flywheel_validator.ports import HeldOutSplit, LabeledImage
from flywheel_vision.preprocess import preprocess


class S3SplitReader:
    """Resolves a snapshot and fetches its TEST (and, when asked, VALIDATION) images; S3
    trouble stays retryable.

    An image's split is fixed by its hash, so no model of the project ever trained on these
    images, whatever snapshot it was trained from.
    """

    def __init__(
        self,
        snapshots: SnapshotStore,
        storage: ObjectStorage,
        *,
        bucket: str,
        concurrency: int = 8,
    ) -> None:
        self._snapshots = snapshots
        self._storage = storage
        self._bucket = bucket
        self._concurrency = concurrency

    async def test_split(
        self,
        project_id: str,
        snapshot_id: str,
        *,
        excluded: frozenset[uuid.UUID] = frozenset(),
        with_validation: bool = False,
    ) -> HeldOutSplit:
        manifest = await self._snapshots.resolve(project_id, snapshot_id)
        # Quarantined labels are suspect: judging a model by them would reward learning them.
        kept = [e for e in manifest.entries if e.label_id not in excluded]
        test, undecodable = await self._fetch([e for e in kept if e.split is Split.TEST])
        validation: list[LabeledImage] = []
        if with_validation:
            validation, _ = await self._fetch([e for e in kept if e.split is Split.VALIDATION])
        return HeldOutSplit(
            snapshot_id=snapshot_id, images=test, undecodable=undecodable, validation=validation
        )

    async def _fetch(self, entries: list[ManifestEntry]) -> tuple[list[LabeledImage], int]:
        """The entries' decodable images, and how many were not decodable."""
        gate = asyncio.Semaphore(self._concurrency)

        async def fetch(entry: ManifestEntry) -> bytes:
            async with gate:
                return await self._storage.get(self._bucket, entry.image_key)

        blobs = await asyncio.gather(*(fetch(e) for e in entries))
        decodable = await asyncio.to_thread(lambda: [_decodable(blob) for blob in blobs])
        images = [
            LabeledImage(class_name=entry.class_name, data=blob)
            for entry, blob, ok in zip(entries, blobs, decodable, strict=True)
            if ok
        ]
        return images, len(entries) - len(images)


def _decodable(blob: bytes) -> bool:
    # Labeling checks uploads, but one broken image must not make every candidate fail.
    try:
        preprocess(blob)
    except InvalidInputError:
        return False
    return True
