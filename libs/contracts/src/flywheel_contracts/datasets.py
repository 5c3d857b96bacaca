"""Dataset snapshots: immutable, content-addressed sets of labels.

A snapshot is stored as a segment: the labels a batch added or changed and the labels it
removed, over a parent snapshot. Its id is the hash of the parent id and that content, so a
snapshot id resolves to the same labels forever. Every image has a fixed split derived from its
hash, so an image in the test split is never trained on, whatever snapshot it appears in.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SHA256 = r"^[0-9a-f]{64}$"


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


SPLIT_PERCENT = {Split.TRAIN: 80, Split.VALIDATION: 10, Split.TEST: 10}
"""Share of images per split; only ever changed together with a new snapshot format."""


def split_for(image_sha256: str) -> Split:
    """The fixed split of an image: its hash's first 32 bits, bucketed 80/10/10."""
    bucket = int(image_sha256[:8], 16) % 100
    if bucket < SPLIT_PERCENT[Split.TRAIN]:
        return Split.TRAIN
    if bucket < SPLIT_PERCENT[Split.TRAIN] + SPLIT_PERCENT[Split.VALIDATION]:
        return Split.VALIDATION
    return Split.TEST


class ManifestEntry(BaseModel):
    """One live label in a snapshot."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    label_id: uuid.UUID
    image_sha256: str = Field(pattern=SHA256)
    image_key: str
    """Key of the image in the data bucket."""
    class_name: str
    split: Split
    source: Literal["human", "pseudo"] = "human"
    labeler: str | None = None
    prediction_id: str | None = None
    model_version: str | None = None
    predicted_class: str | None = None
    confidence: float | None = None
    revision: int = 1
    """Label revision: 1 when created, +1 per update."""


class SnapshotSegment(BaseModel):
    """What one batch changed, over its parent snapshot."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: Literal["flywheel.snapshot/v1"] = "flywheel.snapshot/v1"
    snapshot_id: str
    project_id: str
    parent_snapshot_id: str | None
    batch_id: uuid.UUID
    created_at: datetime
    upserts: list[ManifestEntry]
    deletes: list[uuid.UUID] = Field(default_factory=list)


class SnapshotManifest(BaseModel):
    """Every live label of a snapshot, resolved through its chain of segments."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: Literal["flywheel.manifest/v1"] = "flywheel.manifest/v1"
    snapshot_id: str
    project_id: str
    entries: list[ManifestEntry]
    """Sorted by label_id."""

    def class_counts(self, split: Split | None = None) -> dict[str, int]:
        return dict(
            sorted(
                Counter(
                    e.class_name for e in self.entries if split is None or e.split is split
                ).items()
            )
        )

    def split_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.split.value for e in self.entries).items()))


def snapshot_id_for(
    parent_snapshot_id: str | None,
    upserts: Iterable[ManifestEntry],
    deletes: Iterable[uuid.UUID],
) -> str:
    """Content address of a segment: the hash of its parent and its changes, order-free."""
    content = {
        "parent": parent_snapshot_id,
        "upserts": sorted(
            (e.model_dump(mode="json") for e in upserts), key=lambda e: str(e["label_id"])
        ),
        "deletes": sorted(str(d) for d in deletes),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return f"snap-{digest[:40]}"


def apply_segment(
    entries: dict[uuid.UUID, ManifestEntry], segment: SnapshotSegment
) -> dict[uuid.UUID, ManifestEntry]:
    """The live labels after ``segment``, given those of its parent (not modified)."""
    result = dict(entries)
    for label_id in segment.deletes:
        result.pop(label_id, None)
    for entry in segment.upserts:
        result[entry.label_id] = entry
    return result


def segment_key(project_id: str, snapshot_id: str) -> str:
    """Key of a segment in the data bucket."""
    return f"snapshots/{project_id}/segments/{snapshot_id}.json"


def manifest_key(project_id: str, snapshot_id: str) -> str:
    """Key of a fully resolved manifest (a checkpoint that shortens resolution)."""
    return f"snapshots/{project_id}/manifests/{snapshot_id}.json"


def image_key(image_sha256: str) -> str:
    """Key of an image in the data bucket: content-addressed, so stored once."""
    return f"images/{image_sha256[:2]}/{image_sha256}"
