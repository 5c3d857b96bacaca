"""What the use cases need from the outside world, and the records that cross those ports.

``Store`` is the service's PostgreSQL schema: plain reads, and ``transaction()`` for one unit
of work in which the project row is locked, labels and their history written, the snapshot
recorded, the needs-label queue updated and the outgoing events queued in the outbox, all
committed together.
``ImageStore`` and ``SnapshotStorage`` are the data bucket; ``ImageFetcher`` reads task images
from the web hosts Label Studio points at.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from flywheel_contracts import Event
from flywheel_contracts.datasets import ManifestEntry, SnapshotManifest, SnapshotSegment, Split
from flywheel_contracts.events import SLUG, RetrainPolicy, TaskType
from flywheel_labeling.images import CheckedImage


def _storable(value: str) -> str:
    # PostgreSQL text and JSONB cannot hold NUL: refused as input, not left to fail the insert.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_storable)]
"""A string the database can store."""
ClassName = Annotated[Text, StringConstraints(min_length=1, max_length=200)]
Source = Literal["human", "pseudo"]
Status = Literal["created", "updated", "unchanged", "ignored", "deleted", "rejected"]
"""What a request did to one label: ``unchanged`` for identical content (a replay),
``ignored`` for a Label Studio delivery older than the one already applied."""


# --- projects -----------------------------------------------------------------------------------


class Project(BaseModel):
    """A labeling project: its configuration and the head of its snapshot chain."""

    model_config = ConfigDict(frozen=True)

    project_id: str = Field(pattern=SLUG)
    name: str
    task_type: TaskType
    class_names: list[str]
    model_line: str = Field(pattern=SLUG)
    policy: RetrainPolicy
    revision: int = Field(ge=1)
    """+1 per configuration change; carried by project.configured."""
    head_snapshot_id: str | None = None
    head_sequence: int = 0
    """Sequence of the head snapshot; 0 before the first."""
    label_count: int = 0
    """Live labels in the head snapshot."""
    class_counts: dict[str, int] = Field(default_factory=dict)
    """Live labels per class in the head snapshot."""
    created_at: datetime
    updated_at: datetime


class NewProject(BaseModel):
    """A project as an admin creates it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    project_id: str = Field(pattern=SLUG, description="Slug: lowercase letters, digits, dashes.")
    name: Text = Field(min_length=1, max_length=200)
    task_type: TaskType = TaskType.CLASSIFICATION
    class_names: list[ClassName] = Field(min_length=1)
    model_line: str | None = Field(default=None, pattern=SLUG)
    """Registered model the project's retrains produce; ``<project>-classifier`` when unset."""
    policy: RetrainPolicy = Field(default_factory=RetrainPolicy)

    @field_validator("class_names")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        return _unique_names(names)


class ProjectChanges(BaseModel):
    """What an admin may change in a project; unset fields stay as they are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Text | None = Field(default=None, min_length=1, max_length=200)
    class_names: list[ClassName] | None = Field(default=None, min_length=1)
    """The full list: every existing class must still be in it (classes are only added)."""
    policy: RetrainPolicy | None = None

    @field_validator("class_names")
    @classmethod
    def _unique(cls, names: list[str] | None) -> list[str] | None:
        return None if names is None else _unique_names(names)


def _unique_names(names: list[str]) -> list[str]:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class names must be unique; repeated: {', '.join(duplicates)}")
    return names


# --- labels -------------------------------------------------------------------------------------


class LabelFields(BaseModel):
    """What a labeler says about one image, as every channel (multipart, batch, webhook) has it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    class_name: Text = Field(min_length=1, max_length=200)
    source: Source = "human"
    prediction_id: Text | None = Field(default=None, max_length=200)
    """Id of the model prediction shown to the labeler (a pre-fill)."""
    model_version: Text | None = Field(default=None, max_length=200, validate_default=True)
    predicted_class: Text | None = Field(default=None, max_length=200)
    confidence: float | None = Field(default=None, ge=0, le=1, validate_default=True)
    external_id: Text | None = Field(default=None, max_length=200)
    """The labeling tool's own id for this label."""

    @field_validator("model_version", "confidence")
    @classmethod
    def _required_for_pseudo(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("source") == "pseudo":
            raise ValueError("required when source is 'pseudo'")
        return value


@dataclass(frozen=True)
class LabelContent:
    """What makes two labels of one image the same label; equal content means unchanged."""

    class_name: str
    source: Source = "human"
    prediction_id: str | None = None
    model_version: str | None = None
    predicted_class: str | None = None
    confidence: float | None = None

    @classmethod
    def of(cls, fields: LabelFields) -> Self:
        return cls(
            class_name=fields.class_name,
            source=fields.source,
            prediction_id=fields.prediction_id,
            model_version=fields.model_version,
            predicted_class=fields.predicted_class,
            confidence=fields.confidence,
        )

    @property
    def prefilled(self) -> bool:
        """The label answered a model pre-fill."""
        return self.prediction_id is not None or self.predicted_class is not None

    @property
    def corrected(self) -> bool:
        """The labeler changed the model's class."""
        return self.predicted_class is not None and self.predicted_class != self.class_name


@dataclass(frozen=True)
class Label:
    """One live label: the only one of its image in its project."""

    label_id: uuid.UUID
    project_id: str
    image_sha256: str
    image_key: str
    split: Split
    content: LabelContent
    labeler: str | None
    revision: int
    external_id: str | None
    snapshot_id: str
    """Snapshot that introduced this revision."""
    created_at: datetime
    updated_at: datetime
    position: int | None = None
    """Listing order in its project (assigned by the store, stable across revisions)."""

    def entry(self) -> ManifestEntry:
        """This label as a snapshot manifest entry."""
        return ManifestEntry(
            label_id=self.label_id,
            image_sha256=self.image_sha256,
            image_key=self.image_key,
            class_name=self.content.class_name,
            split=self.split,
            source=self.content.source,
            labeler=self.labeler,
            prediction_id=self.content.prediction_id,
            model_version=self.content.model_version,
            predicted_class=self.content.predicted_class,
            confidence=self.content.confidence,
            revision=self.revision,
        )


@dataclass(frozen=True)
class Superseded:
    """A label revision that is no longer live, kept in the history table."""

    label: Label
    reason: Literal["updated", "deleted"]
    snapshot_id: str
    """Snapshot from which on the revision is gone."""
    at: datetime


@dataclass(frozen=True)
class AnnotationRef:
    """The last Label Studio delivery applied for one annotation (idempotency record)."""

    project_id: str
    annotation_id: int
    updated_at: datetime
    label_id: uuid.UUID | None
    image_sha256: str | None
    deleted: bool = False


# --- changes handed to the group committer -----------------------------------------------------


def label_studio_external_id(annotation_id: int) -> str:
    """``external_id`` of a label that a Label Studio annotation gave."""
    return f"label-studio:{annotation_id}"


@dataclass(frozen=True)
class AnnotationVersion:
    """Which Label Studio annotation (and which of its versions) a change comes from."""

    annotation_id: int
    updated_at: datetime

    @property
    def external_id(self) -> str:
        return label_studio_external_id(self.annotation_id)


@dataclass(frozen=True)
class Upsert:
    """Set the label of one (already stored) image."""

    index: int
    image_sha256: str
    image_key: str
    content: LabelContent
    labeler: str | None
    external_id: str | None = None
    annotation: AnnotationVersion | None = None


@dataclass(frozen=True)
class DeleteAnnotation:
    """Remove the label a Label Studio annotation gave, if it is still that annotation's."""

    index: int
    annotation_id: int


Change = Upsert | DeleteAnnotation


@dataclass(frozen=True)
class Outcome:
    """What committing one change did."""

    index: int
    status: Status
    label_id: uuid.UUID | None = None
    revision: int | None = None
    image_sha256: str | None = None


@dataclass(frozen=True)
class CommitResult:
    """One request's outcomes and the snapshot that holds them (None when nothing changed)."""

    outcomes: list[Outcome]
    snapshot_id: str | None = None
    snapshot_sequence: int | None = None
    batch_id: uuid.UUID | None = None


# --- snapshots and stats ------------------------------------------------------------------------


class SnapshotRecord(BaseModel):
    """One committed snapshot of a project (its labels live in S3, in the segment chain)."""

    model_config = ConfigDict(frozen=True)

    snapshot_id: str
    project_id: str
    parent_snapshot_id: str | None
    sequence: int = Field(ge=1)
    label_count: int
    class_counts: dict[str, int]
    batch_id: uuid.UUID
    created_at: datetime
    upserted: int
    deleted: int


class LabelStats(BaseModel):
    """Live labels of a project, counted every way the operators ask about."""

    model_config = ConfigDict(frozen=True)

    total: int
    by_class: dict[str, int]
    by_split: dict[str, int]
    by_source: dict[str, int]
    prefilled: int
    corrected: int
    by_labeler: dict[str, int]
    snapshots: int


# --- the needs-label queue ----------------------------------------------------------------------

RequestStatus = Literal["open", "labeled", "dismissed"]
"""``open`` until a label of the same image is saved (``labeled``) or a labeler dismisses it."""


@dataclass(frozen=True)
class NewRequestedImage:
    """One image of a labels.requested, checked, as the queue receives it."""

    project_id: str
    input_sha256: str
    image_key: str
    score: float
    predicted_class: str | None
    confidence: float | None
    request_id: uuid.UUID
    report_id: uuid.UUID | None
    reason: str
    requested_at: datetime
    """When the request was made (the event's ``occurred_at``): the newest request of an
    image still open gives its entry's request fields, whatever order events arrive in."""
    now: datetime


@dataclass(frozen=True)
class RequestedImage:
    """One entry of the needs-label queue: an image labelers were asked to label.

    A project has at most one ``open`` entry per image: a new request for an image still open
    merges into it (the highest score, the newest request). Closed entries stay as history.
    """

    entry_id: int
    project_id: str
    input_sha256: str
    image_key: str
    """Key of the image in the data bucket."""
    score: float
    predicted_class: str | None
    confidence: float | None
    status: RequestStatus
    request_id: uuid.UUID
    report_id: uuid.UUID | None
    reason: str
    requested_at: datetime
    created_at: datetime
    updated_at: datetime
    labeled_label_id: uuid.UUID | None = None
    """The label that answered it, once ``labeled``."""


@dataclass(frozen=True)
class QueuePosition:
    """Where a page of the queue ends, in its order (score down, then oldest first)."""

    score: float
    created_at: datetime
    entry_id: int


# --- ports --------------------------------------------------------------------------------------


class Transaction(Protocol):
    """One unit of work on the labeling schema; everything in it commits or nothing does."""

    async def insert_project(self, project: Project) -> bool:
        """False when a project with that id exists already."""
        ...

    async def lock_project(self, project_id: str) -> Project | None:
        """The project, its row locked until commit (``SELECT … FOR UPDATE``)."""
        ...

    async def save_project(self, project: Project) -> None: ...

    async def labels_by_image(self, project_id: str, shas: set[str]) -> dict[str, Label]: ...

    async def annotation_refs(
        self, project_id: str, annotation_ids: set[int]
    ) -> dict[int, AnnotationRef]: ...

    async def write_labels(self, labels: list[Label]) -> None:
        """Insert new labels and replace updated ones (by label_id)."""
        ...

    async def delete_labels(self, project_id: str, label_ids: list[uuid.UUID]) -> None: ...

    async def add_history(self, superseded: list[Superseded]) -> None: ...

    async def save_annotation_refs(self, refs: list[AnnotationRef]) -> None: ...

    async def add_snapshot(self, snapshot: SnapshotRecord) -> None: ...

    async def move_head(
        self, project_id: str, snapshot_id: str, sequence: int, class_counts: dict[str, int]
    ) -> None:
        """Make ``snapshot_id`` the project's head, with its live label counts."""
        ...

    async def emit(self, event: Event[Any]) -> None:
        """Queue an event for publishing once the transaction commits (outbox)."""
        ...

    async def claim(self, event_id: uuid.UUID) -> bool:
        """False when this service handled the event already (a redelivery)."""
        ...

    async def dismissed_images(self, project_id: str, shas: set[str]) -> set[str]:
        """The images among ``shas`` a labeler dismissed in this project."""
        ...

    async def open_requests(self, images: list[NewRequestedImage]) -> None:
        """Open an entry per image, or merge into the image's open entry (highest score,
        request fields of the newest request)."""
        ...

    async def mark_requests_labeled(
        self, project_id: str, labels: dict[str, uuid.UUID], now: datetime
    ) -> None:
        """Close the open entries of the images in ``labels`` (sha256 → the label that
        answers it) as ``labeled``."""
        ...

    async def lock_open_request(self, project_id: str, sha: str) -> RequestedImage | None:
        """The image's open entry, its row locked until commit."""
        ...

    async def set_request_status(
        self, entry_id: int, status: RequestStatus, now: datetime
    ) -> RequestedImage:
        """Give an entry a new status; returns it as it is now."""
        ...


class Store(Protocol):
    """The labeling service's persistent state."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def project(self, project_id: str) -> Project | None: ...

    async def projects(self) -> list[Project]: ...

    async def annotation_refs(
        self, project_id: str, annotation_ids: set[int]
    ) -> dict[int, AnnotationRef]: ...

    async def labels_page(self, project_id: str, after: int | None, limit: int) -> list[Label]:
        """Live labels in listing order, after position ``after``."""
        ...

    async def label_stats(self, project_id: str) -> LabelStats: ...

    async def snapshots_page(
        self, project_id: str, before: int | None, limit: int
    ) -> list[SnapshotRecord]:
        """Snapshots newest first, with a sequence below ``before``."""
        ...

    async def snapshot(self, project_id: str, snapshot_id: str) -> SnapshotRecord | None: ...

    async def requests_page(
        self, project_id: str, status: RequestStatus, after: QueuePosition | None, limit: int
    ) -> list[RequestedImage]:
        """Entries of one status, highest score first then oldest, after ``after``."""
        ...

    async def requested_image(self, project_id: str, sha: str) -> RequestedImage | None:
        """The image's open entry, else its most recently updated one."""
        ...


class ImageStore(Protocol):
    """Images in the data bucket, by content."""

    @property
    def bucket(self) -> str: ...

    async def put(self, image: CheckedImage) -> str:
        """Store the image under its content address; returns the key."""
        ...

    async def size(self, key: str) -> int | None:
        """Size of an object in the data bucket; None when there is none."""
        ...

    async def read(self, key: str) -> bytes:
        """Bytes of an object in the data bucket; ``NotFoundError`` when there is none."""
        ...


class ImageFetcher(Protocol):
    """Reads an image from an http(s) URL, within the allow-list and the size limit."""

    async def fetch(self, url: str, *, max_bytes: int, field: str) -> bytes: ...


class SnapshotStorage(Protocol):
    """Snapshot segments in the data bucket (``flywheel_runtime.datasets.SnapshotStore``)."""

    async def write_segment(self, segment: SnapshotSegment) -> None: ...

    async def resolve(self, project_id: str, snapshot_id: str) -> SnapshotManifest: ...
