"""Request and response bodies of the labeling API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from flywheel_contracts.datasets import ManifestEntry, SnapshotManifest
from flywheel_labeling.images import decode_base64
from flywheel_labeling.ports import (
    Label,
    LabelFields,
    Project,
    RequestedImage,
    RequestStatus,
    SnapshotRecord,
    Status,
)
from flywheel_labeling.service import ItemResult, ProjectStats, SaveResult


def _base64(value: Any) -> Any:
    return decode_base64(value) if isinstance(value, str) else value


Base64Image = Annotated[
    bytes,
    BeforeValidator(_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


class LabelForm(LabelFields):
    """The form fields of a multipart label (the image travels as the ``image`` file)."""

    # The form model sees every part, the image file included; that one is read on its own.
    model_config = ConfigDict(frozen=True, extra="ignore")


class BatchItem(LabelFields):
    """One label of a batch: its fields and exactly one of ``image_base64`` / ``image_uri``."""

    image_base64: Base64Image | None = None
    """The image bytes, base64-encoded (standard alphabet, padded)."""
    image_uri: str | None = Field(default=None, pattern=r"^s3://", max_length=1024)
    """``s3://<data bucket>/<key>`` of an image already uploaded."""

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        if (self.image_base64 is None) == (self.image_uri is None):
            raise ValueError("give exactly one of image_base64 and image_uri")
        return self

    def fields(self) -> LabelFields:
        return LabelFields.model_validate(self.model_dump(include=set(LabelFields.model_fields)))


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(min_length=1)


class ItemErrorOut(BaseModel):
    code: str
    message: str
    field: str | None


class ItemOut(BaseModel):
    index: int
    status: Status
    label_id: uuid.UUID | None = None
    revision: int | None = None
    image_sha256: str | None = None
    error: ItemErrorOut | None = None

    @classmethod
    def of(cls, item: ItemResult) -> ItemOut:
        error = None
        if item.error is not None:
            field = item.error.details.get("field")
            error = ItemErrorOut(
                code=item.error.code,
                message=item.error.message,
                field=field if isinstance(field, str) else None,
            )
        return cls(
            index=item.index,
            status=item.status,
            label_id=item.label_id,
            revision=item.revision,
            image_sha256=item.image_sha256,
            error=error,
        )


class SavedOut(BaseModel):
    """What a request did, and the snapshot that holds it (None when nothing changed)."""

    items: list[ItemOut]
    snapshot_id: str | None
    snapshot_sequence: int | None
    batch_id: uuid.UUID | None

    @classmethod
    def of(cls, result: SaveResult) -> SavedOut:
        return cls(
            items=[ItemOut.of(i) for i in result.items],
            snapshot_id=result.snapshot_id,
            snapshot_sequence=result.snapshot_sequence,
            batch_id=result.batch_id,
        )


class LabelSavedOut(ItemOut):
    """The one label of a multipart post."""

    snapshot_id: str | None
    snapshot_sequence: int | None
    batch_id: uuid.UUID | None


class WebhookOut(SavedOut):
    action: str
    handled: bool
    """False for actions the service does not act on (acknowledged and ignored)."""


class LabelOut(BaseModel):
    label_id: uuid.UUID
    image_sha256: str
    image_key: str
    split: str
    class_name: str
    source: str
    labeler: str | None
    prediction_id: str | None
    model_version: str | None
    predicted_class: str | None
    confidence: float | None
    corrected: bool
    revision: int
    external_id: str | None
    snapshot_id: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, label: Label) -> LabelOut:
        content = label.content
        return cls(
            label_id=label.label_id,
            image_sha256=label.image_sha256,
            image_key=label.image_key,
            split=label.split.value,
            class_name=content.class_name,
            source=content.source,
            labeler=label.labeler,
            prediction_id=content.prediction_id,
            model_version=content.model_version,
            predicted_class=content.predicted_class,
            confidence=content.confidence,
            corrected=content.corrected,
            revision=label.revision,
            external_id=label.external_id,
            snapshot_id=label.snapshot_id,
            created_at=label.created_at,
            updated_at=label.updated_at,
        )


class LabelPage(BaseModel):
    items: list[LabelOut]
    next_cursor: str | None


class StatsOut(BaseModel):
    project_id: str
    total: int
    by_class: dict[str, int]
    by_split: dict[str, int]
    by_source: dict[str, int]
    prefilled: int
    corrected: int
    labelers: int
    by_labeler: dict[str, int]
    snapshots: int
    head_snapshot_id: str | None
    head_sequence: int

    @classmethod
    def of(cls, stats: ProjectStats) -> StatsOut:
        labels = stats.labels
        return cls(
            project_id=stats.project.project_id,
            total=labels.total,
            by_class=labels.by_class,
            by_split=labels.by_split,
            by_source=labels.by_source,
            prefilled=labels.prefilled,
            corrected=labels.corrected,
            labelers=len(labels.by_labeler),
            by_labeler=labels.by_labeler,
            snapshots=labels.snapshots,
            head_snapshot_id=stats.project.head_snapshot_id,
            head_sequence=stats.project.head_sequence,
        )


class SnapshotPage(BaseModel):
    items: list[SnapshotRecord]
    next_cursor: str | None


class SnapshotOut(SnapshotRecord):
    """A snapshot with every label it holds."""

    split_counts: dict[str, int]
    entries: list[ManifestEntry]

    @classmethod
    def of(cls, record: SnapshotRecord, manifest: SnapshotManifest) -> SnapshotOut:
        return cls(
            **record.model_dump(exclude={"class_counts"}),
            class_counts=manifest.class_counts(),
            split_counts=manifest.split_counts(),
            entries=manifest.entries,
        )


class LabelRequestOut(BaseModel):
    """One image of the needs-label queue, and the two ways to get its bytes."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    project_id: str
    input_sha256: str
    """SHA-256 of the image's bytes: a label saved for the same bytes answers the request."""
    image_key: str
    """Key of the image in the data bucket."""
    image_uri: str
    """``s3://<data bucket>/<image_key>``: what a ``labels:batch`` item takes as
    ``image_uri`` to label this very image."""
    image_url: str
    """Path of this API that returns the image's bytes (with the same bearer token)."""
    score: float
    """How strongly the image stands for the drift; the queue shows the highest first."""
    predicted_class: str | None
    """The serving model's answer: a pre-label to confirm or correct."""
    confidence: float | None
    status: RequestStatus
    reason: str
    request_id: uuid.UUID
    """The newest request that asked for this image."""
    report_id: uuid.UUID | None
    """The drift report behind that request."""
    requested_at: datetime
    created_at: datetime
    """When the image joined the queue."""
    updated_at: datetime
    labeled_label_id: uuid.UUID | None
    """The label that answered the request, once ``labeled``."""

    @classmethod
    def of(cls, entry: RequestedImage, bucket: str) -> LabelRequestOut:
        return cls(
            project_id=entry.project_id,
            input_sha256=entry.input_sha256,
            image_key=entry.image_key,
            image_uri=f"s3://{bucket}/{entry.image_key}",
            image_url=(
                f"/v1/projects/{entry.project_id}/label-requests/{entry.input_sha256}/image"
            ),
            score=entry.score,
            predicted_class=entry.predicted_class,
            confidence=entry.confidence,
            status=entry.status,
            reason=entry.reason,
            request_id=entry.request_id,
            report_id=entry.report_id,
            requested_at=entry.requested_at,
            created_at=entry.created_at,
            updated_at=entry.updated_at,
            labeled_label_id=entry.labeled_label_id,
        )


class LabelRequestPage(BaseModel):
    items: list[LabelRequestOut]
    next_cursor: str | None


ProjectOut = Project
