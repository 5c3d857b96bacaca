"""What the use cases need from the outside world, and the records that cross those ports.

``Store`` is the service's PostgreSQL schema: reads outside any lock, and ``transaction()``
for a unit of work in which a project's row is locked, the event claimed and the outgoing
events queued in the outbox, all committed together. ``SnapshotReader`` reads what labeling
wrote to S3.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from flywheel_contracts import Event
from flywheel_contracts.datasets import SnapshotSegment
from flywheel_contracts.events import RetrainPolicy, TaskType, ThresholdReason
from flywheel_data_monitor.policy import Evaluation, PendingWindow
from flywheel_data_monitor.quality import Check, ReferenceSource

Trigger = Literal["labels.saved", "project.configured", "timer"]
"""What made the monitor look at a project when it decided."""


class ProjectState(BaseModel):
    """Everything the monitor keeps about one project (one row, locked while it changes)."""

    project_id: str
    config_revision: int = 0
    """Revision of the last project.configured applied; 0 before any."""
    model_line: str | None = None
    task_type: TaskType | None = None
    class_names: list[str] = Field(default_factory=list)
    policy: RetrainPolicy | None = None
    """The project's own policy; None until configured (the service default applies)."""
    head_snapshot_id: str | None = None
    """Snapshot of the labels.saved with the highest snapshot_sequence seen."""
    head_sequence: int | None = None
    trained_snapshot_id: str | None = None
    """Snapshot the last threshold.reached asked to train on."""
    trained_sequence: int | None = None
    trained_class_counts: dict[str, int] | None = None
    """Class counts of the trained snapshot, resolved once when first needed."""
    last_fired_at: datetime | None = None
    pending_labels: int = 0
    pending_prefilled: int = 0
    pending_corrected: int = 0
    oldest_pending_at: datetime | None = None
    last_batch_event_id: uuid.UUID | None = None
    """labels.saved that last added to the window: the cause of a timer-fired retrain."""
    last_batch_correlation_id: uuid.UUID | None = None
    class_counts: dict[str, int] = Field(default_factory=dict)
    """New labels per class over every batch that passed the checks."""
    last_evaluation: Evaluation | None = None

    @property
    def window(self) -> PendingWindow:
        return PendingWindow(
            labels=self.pending_labels,
            prefilled=self.pending_prefilled,
            corrected=self.pending_corrected,
            oldest_at=self.oldest_pending_at,
        )


class Decision(BaseModel):
    """A retrain the monitor fired, with every input it was decided on."""

    model_config = ConfigDict(frozen=True)

    decision_id: uuid.UUID
    project_id: str
    model_line: str
    snapshot_id: str
    reason: ThresholdReason
    decided_at: datetime
    trigger: Trigger
    caused_by: uuid.UUID | None
    """event_id of the event the threshold.reached points back to."""
    threshold_event_id: uuid.UUID
    excluded_label_count: int
    """Quarantined labels the retrain must leave out."""
    evaluation: Evaluation


class QualityReport(BaseModel):
    """The checks of one labels.saved batch and what the monitor did with the batch."""

    model_config = ConfigDict(frozen=True)

    report_id: uuid.UUID
    project_id: str
    batch_id: uuid.UUID
    event_id: uuid.UUID
    snapshot_id: str
    snapshot_sequence: int | None
    created_at: datetime
    label_count: int
    passed: bool
    quarantined: bool
    counted: bool
    """Whether its labels joined the pending window (not quarantined, newer than the last
    retrain's snapshot)."""
    reference_source: ReferenceSource
    checks: list[Check]
    reasons: list[str]


class Transaction(Protocol):
    """One unit of work on the monitor's schema; everything in it commits or nothing does."""

    async def claim(self, event_id: uuid.UUID) -> bool:
        """True the first time this event is handled (a redelivery gets False)."""
        ...

    async def lock_project(self, project_id: str) -> ProjectState:
        """The project's state, locked until commit; created empty when missing."""
        ...

    async def try_lock_project(self, project_id: str) -> ProjectState | None:
        """The project's state locked, or None when missing or locked by someone else."""
        ...

    async def save_project(self, state: ProjectState) -> None: ...

    async def batch_seen(self, project_id: str, batch_id: uuid.UUID) -> bool:
        """Whether a report for this batch exists (the batch was handled under another id)."""
        ...

    async def add_report(self, report: QualityReport) -> None: ...

    async def quarantine(
        self, project_id: str, label_ids: list[uuid.UUID], report: QualityReport
    ) -> None:
        """Remember labels that must never enter a retrain."""
        ...

    async def quarantined_label_ids(self, project_id: str) -> list[uuid.UUID]: ...

    async def add_decision(self, decision: Decision) -> None: ...

    async def emit(self, event: Event[Any]) -> None:
        """Queue an event for publishing once the transaction commits (outbox)."""
        ...


class Store(Protocol):
    """The monitor's persistent state."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def project(self, project_id: str) -> ProjectState | None: ...

    async def projects_with_pending(self) -> list[str]:
        """Projects whose pending window is not empty (candidates for the timer)."""
        ...

    async def quarantined_count(self, project_id: str) -> int: ...

    async def decisions(self, project_id: str, limit: int) -> list[Decision]:
        """Newest first."""
        ...

    async def reports(self, project_id: str, limit: int) -> list[QualityReport]:
        """Newest first."""
        ...


class SnapshotReader(Protocol):
    """Dataset snapshots written by labeling."""

    async def read_segment(self, project_id: str, snapshot_id: str) -> SnapshotSegment:
        """What one batch changed; ``SegmentUnavailableError`` when it cannot be read now."""
        ...

    async def class_counts(self, project_id: str, snapshot_id: str) -> dict[str, int]:
        """Live labels per class of a whole snapshot."""
        ...
