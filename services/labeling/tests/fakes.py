"""In-memory fakes of the labeling ports, for unit and component tests."""

import asyncio
import copy
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from flywheel_contracts import Event
from flywheel_contracts.datasets import SnapshotManifest, SnapshotSegment, apply_segment
from flywheel_labeling.images import CheckedImage
from flywheel_labeling.ports import (
    AnnotationRef,
    Label,
    LabelStats,
    NewRequestedImage,
    Project,
    QueuePosition,
    RequestedImage,
    RequestStatus,
    SnapshotRecord,
    Superseded,
)
from flywheel_runtime.errors import DependencyUnavailableError, NotFoundError


@dataclass
class State:
    projects: dict[str, Project] = field(default_factory=dict)
    labels: dict[uuid.UUID, Label] = field(default_factory=dict)
    history: list[Superseded] = field(default_factory=list)
    refs: dict[tuple[str, int], AnnotationRef] = field(default_factory=dict)
    snapshots: list[SnapshotRecord] = field(default_factory=list)
    outbox: list[Event[Any]] = field(default_factory=list)
    positions: int = 0
    claimed: set[uuid.UUID] = field(default_factory=set)
    requests: dict[int, RequestedImage] = field(default_factory=dict)
    """The needs-label queue's entries by entry id."""
    entries: int = 0


class FakeTransaction:
    def __init__(self, state: State) -> None:
        self.state = state

    async def insert_project(self, project: Project) -> bool:
        if project.project_id in self.state.projects:
            return False
        self.state.projects[project.project_id] = project
        return True

    async def lock_project(self, project_id: str) -> Project | None:
        return self.state.projects.get(project_id)

    async def save_project(self, project: Project) -> None:
        current = self.state.projects[project.project_id]
        self.state.projects[project.project_id] = project.model_copy(
            update={
                "head_snapshot_id": current.head_snapshot_id,
                "head_sequence": current.head_sequence,
                "label_count": current.label_count,
                "class_counts": current.class_counts,
            }
        )

    async def move_head(
        self, project_id: str, snapshot_id: str, sequence: int, class_counts: dict[str, int]
    ) -> None:
        self.state.projects[project_id] = self.state.projects[project_id].model_copy(
            update={
                "head_snapshot_id": snapshot_id,
                "head_sequence": sequence,
                "label_count": sum(class_counts.values()),
                "class_counts": class_counts,
            }
        )

    async def labels_by_image(self, project_id: str, shas: set[str]) -> dict[str, Label]:
        return {
            label.image_sha256: label
            for label in self.state.labels.values()
            if label.project_id == project_id and label.image_sha256 in shas
        }

    async def annotation_refs(
        self, project_id: str, annotation_ids: set[int]
    ) -> dict[int, AnnotationRef]:
        return {
            annotation_id: ref
            for (project, annotation_id), ref in self.state.refs.items()
            if project == project_id and annotation_id in annotation_ids
        }

    async def write_labels(self, labels: list[Label]) -> None:
        for label in labels:
            existing = self.state.labels.get(label.label_id)
            if existing is None:
                self.state.positions += 1
                position = self.state.positions
                if any(
                    other.project_id == label.project_id
                    and other.image_sha256 == label.image_sha256
                    for other in self.state.labels.values()
                ):
                    raise AssertionError("two live labels for one image")
            else:
                position = existing.position or 0
            self.state.labels[label.label_id] = replace(label, position=position)

    async def delete_labels(self, project_id: str, label_ids: list[uuid.UUID]) -> None:
        for label_id in label_ids:
            assert self.state.labels.pop(label_id).project_id == project_id

    async def add_history(self, superseded: list[Superseded]) -> None:
        self.state.history += superseded

    async def save_annotation_refs(self, refs: list[AnnotationRef]) -> None:
        for ref in refs:
            self.state.refs[(ref.project_id, ref.annotation_id)] = ref

    async def add_snapshot(self, snapshot: SnapshotRecord) -> None:
        self.state.snapshots.append(snapshot)

    async def emit(self, event: Event[Any]) -> None:
        self.state.outbox.append(event)

    async def claim(self, event_id: uuid.UUID) -> bool:
        if event_id in self.state.claimed:
            return False
        self.state.claimed.add(event_id)
        return True

    async def dismissed_images(self, project_id: str, shas: set[str]) -> set[str]:
        return {
            entry.input_sha256
            for entry in self.state.requests.values()
            if entry.project_id == project_id
            and entry.input_sha256 in shas
            and entry.status == "dismissed"
        }

    def _open(self, project_id: str, sha: str) -> RequestedImage | None:
        return next(
            (
                entry
                for entry in self.state.requests.values()
                if (entry.project_id, entry.input_sha256, entry.status) == (project_id, sha, "open")
            ),
            None,
        )

    async def open_requests(self, images: list[NewRequestedImage]) -> None:
        for image in images:
            current = self._open(image.project_id, image.input_sha256)
            if current is None:
                self.state.entries += 1
                self.state.requests[self.state.entries] = RequestedImage(
                    entry_id=self.state.entries,
                    project_id=image.project_id,
                    input_sha256=image.input_sha256,
                    image_key=image.image_key,
                    score=image.score,
                    predicted_class=image.predicted_class,
                    confidence=image.confidence,
                    status="open",
                    request_id=image.request_id,
                    report_id=image.report_id,
                    reason=image.reason,
                    requested_at=image.requested_at,
                    created_at=image.now,
                    updated_at=image.now,
                )
                continue
            merged = replace(current, score=max(current.score, image.score), updated_at=image.now)
            if image.requested_at >= current.requested_at:
                merged = replace(
                    merged,
                    image_key=image.image_key,
                    predicted_class=image.predicted_class,
                    confidence=image.confidence,
                    request_id=image.request_id,
                    report_id=image.report_id,
                    reason=image.reason,
                    requested_at=image.requested_at,
                )
            self.state.requests[current.entry_id] = merged

    async def mark_requests_labeled(
        self, project_id: str, labels: dict[str, uuid.UUID], now: datetime
    ) -> None:
        for sha, label_id in labels.items():
            entry = self._open(project_id, sha)
            if entry is not None:
                self.state.requests[entry.entry_id] = replace(
                    entry, status="labeled", labeled_label_id=label_id, updated_at=now
                )

    async def lock_open_request(self, project_id: str, sha: str) -> RequestedImage | None:
        return self._open(project_id, sha)

    async def set_request_status(
        self, entry_id: int, status: RequestStatus, now: datetime
    ) -> RequestedImage:
        entry = replace(self.state.requests[entry_id], status=status, updated_at=now)
        self.state.requests[entry_id] = entry
        return entry


class FakeStore:
    """The Store port in memory: transactions are serialized and apply only when they succeed."""

    def __init__(self) -> None:
        self.state = State()
        self.down = False
        self.fail_next_commit: Exception | None = None
        self.commits = 0
        self._lock = asyncio.Lock()

    def _check(self) -> None:
        if self.down:
            raise DependencyUnavailableError("database unavailable")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        self._check()
        async with self._lock:
            tx = FakeTransaction(copy.deepcopy(self.state))
            yield tx
            if self.fail_next_commit is not None:
                error, self.fail_next_commit = self.fail_next_commit, None
                raise error
            self.state = tx.state
            self.commits += 1

    async def project(self, project_id: str) -> Project | None:
        self._check()
        return self.state.projects.get(project_id)

    async def projects(self) -> list[Project]:
        self._check()
        return sorted(self.state.projects.values(), key=lambda p: p.project_id)

    async def annotation_refs(
        self, project_id: str, annotation_ids: set[int]
    ) -> dict[int, AnnotationRef]:
        return await FakeTransaction(self.state).annotation_refs(project_id, annotation_ids)

    async def labels_page(self, project_id: str, after: int | None, limit: int) -> list[Label]:
        labels = sorted(
            (
                label
                for label in self.state.labels.values()
                if label.project_id == project_id
                and (after is None or (label.position or 0) > after)
            ),
            key=lambda label: label.position or 0,
        )
        return labels[:limit]

    async def label_stats(self, project_id: str) -> LabelStats:
        labels = [label for label in self.state.labels.values() if label.project_id == project_id]
        return LabelStats(
            total=len(labels),
            by_class=dict(Counter(label.content.class_name for label in labels)),
            by_split=dict(Counter(label.split.value for label in labels)),
            by_source=dict(Counter(label.content.source for label in labels)),
            prefilled=sum(label.content.prefilled for label in labels),
            corrected=sum(label.content.corrected for label in labels),
            by_labeler=dict(Counter(label.labeler for label in labels if label.labeler)),
            snapshots=len([s for s in self.state.snapshots if s.project_id == project_id]),
        )

    async def snapshots_page(
        self, project_id: str, before: int | None, limit: int
    ) -> list[SnapshotRecord]:
        records = [
            s
            for s in self.state.snapshots
            if s.project_id == project_id and (before is None or s.sequence < before)
        ]
        return sorted(records, key=lambda s: -s.sequence)[:limit]

    async def snapshot(self, project_id: str, snapshot_id: str) -> SnapshotRecord | None:
        return next(
            (
                s
                for s in self.state.snapshots
                if s.project_id == project_id and s.snapshot_id == snapshot_id
            ),
            None,
        )

    async def requests_page(
        self, project_id: str, status: RequestStatus, after: QueuePosition | None, limit: int
    ) -> list[RequestedImage]:
        self._check()
        entries = sorted(
            (
                entry
                for entry in self.state.requests.values()
                if (entry.project_id, entry.status) == (project_id, status) and _after(entry, after)
            ),
            key=_queue_order,
        )
        return entries[:limit]

    async def requested_image(self, project_id: str, sha: str) -> RequestedImage | None:
        self._check()
        entries = [
            entry
            for entry in self.state.requests.values()
            if (entry.project_id, entry.input_sha256) == (project_id, sha)
        ]
        return max(
            entries, key=lambda e: (e.status == "open", e.updated_at, e.entry_id), default=None
        )


def _queue_order(entry: RequestedImage) -> tuple[float, datetime, int]:
    return (-entry.score, entry.created_at, entry.entry_id)


def _after(entry: RequestedImage, position: QueuePosition | None) -> bool:
    if position is None:
        return True
    mark = (-position.score, position.created_at, position.entry_id)
    return _queue_order(entry) > mark


class FakeImages:
    """The data bucket's images in memory."""

    bucket = "flywheel-data"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False

    async def put(self, image: CheckedImage) -> str:
        if self.down:
            raise DependencyUnavailableError("object storage is unavailable")
        key = f"images/{image.sha256[:2]}/{image.sha256}"
        self.objects[key] = image.data
        return key

    async def size(self, key: str) -> int | None:
        data = self.objects.get(key)
        return None if data is None else len(data)

    async def read(self, key: str) -> bytes:
        if key not in self.objects:
            raise NotFoundError("object not found")
        return self.objects[key]


class FakeFetcher:
    """Answers from a dict of URLs; anything else is refused as the real guard would."""

    def __init__(self) -> None:
        self.urls: dict[str, bytes] = {}

    async def fetch(self, url: str, *, max_bytes: int, field: str) -> bytes:
        from flywheel_labeling.errors import ImageNotFoundError

        if url not in self.urls:
            raise ImageNotFoundError(f"no image at {url}", field=field)
        return self.urls[url][: max_bytes + 1]


class FakeSnapshots:
    """Snapshot segments in memory, resolved like ``SnapshotStore``."""

    def __init__(self) -> None:
        self.segments: dict[tuple[str, str], SnapshotSegment] = {}
        self.down = False

    async def write_segment(self, segment: SnapshotSegment) -> None:
        if self.down:
            raise DependencyUnavailableError("object storage is unavailable")
        self.segments[(segment.project_id, segment.snapshot_id)] = segment

    async def resolve(self, project_id: str, snapshot_id: str) -> SnapshotManifest:
        chain = []
        current: str | None = snapshot_id
        while current is not None:
            segment = self.segments[(project_id, current)]
            chain.append(segment)
            current = segment.parent_snapshot_id
        entries: dict[uuid.UUID, Any] = {}
        for segment in reversed(chain):
            entries = apply_segment(entries, segment)
        return SnapshotManifest(
            snapshot_id=snapshot_id,
            project_id=project_id,
            entries=sorted(entries.values(), key=lambda e: str(e.label_id)),
        )
