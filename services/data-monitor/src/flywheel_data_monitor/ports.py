"""What the use cases need from the outside world, and the records that cross those ports.

``Store`` is the service's PostgreSQL schema: reads outside any lock, and ``transaction()``
for a unit of work in which a project's row is locked, the event claimed and the outgoing
events queued in the outbox, all committed together. ``SnapshotReader`` reads what labeling
wrote to S3. ``DriftStore`` keeps the drift features of recent inferences and the drift
reports; ``ReferenceStore`` and ``ReportArtifacts`` are the references and plots in S3.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from flywheel_contracts import Event
from flywheel_contracts.datasets import SnapshotSegment
from flywheel_contracts.events import DriftAction, RetrainPolicy, TaskType, ThresholdReason
from flywheel_data_monitor.drift import DriftReport, Features
from flywheel_data_monitor.policy import Evaluation, PendingWindow
from flywheel_data_monitor.quality import Check, ReferenceSource

Trigger = Literal["labels.saved", "project.configured", "timer", "drift"]
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


# --- drift --------------------------------------------------------------------------------------


class DriftSample(BaseModel):
    """The drift features of one inference (from its inference.logged)."""

    model_config = ConfigDict(frozen=True)

    request_id: uuid.UUID
    project_id: str
    model_line: str
    model_version: str
    served_at: datetime
    embedding: list[float] | None = None
    brightness: float | None = None
    contrast: float | None = None
    width: int | None = None
    height: int | None = None
    predicted_class: str | None = None
    confidence: float | None = None
    input_sha256: str
    input_key: str | None = None


class DriftLine(BaseModel):
    """Where drift checking of one model line stands."""

    model_line: str
    project_id: str
    last_checked_at: datetime | None = None
    last_report_id: uuid.UUID | None = None
    last_action: DriftAction | None = None
    last_action_at: datetime | None = None
    last_action_version: str | None = None
    """Champion the last action was about: a new champion starts a fresh cooldown."""


class StoredDriftReport(BaseModel):
    """A drift report as kept: its tests, what followed, and where its plots are."""

    model_config = ConfigDict(frozen=True)

    report: DriftReport
    drifted: bool
    action: DriftAction | None = None
    """What followed (None: no drift, or drift inside the cooldown)."""
    note: str | None = None
    """Why nothing followed a drifted window (cooldown), for the operator."""
    plots: dict[str, str] = Field(default_factory=dict)
    """Test feature → data-bucket key of its PNG."""
    event_id: uuid.UUID | None = None
    """The drift.detected it was announced by."""
    created_at: datetime


class DriftTransaction(Transaction, Protocol):
    """A unit of work that may fire a retrain and record drift in one commit."""

    async def lock_drift_line(self, model_line: str, project_id: str) -> DriftLine:
        """The line's drift state, locked until commit; created when missing."""
        ...

    async def save_drift_line(self, line: DriftLine) -> None: ...

    async def add_drift_report(self, stored: StoredDriftReport) -> None: ...


class DriftStore(Protocol):
    """Drift features of recent inferences and the reports made of them."""

    def drift_transaction(self) -> AbstractAsyncContextManager[DriftTransaction]: ...

    async def add_drift_samples(self, samples: list[DriftSample]) -> int:
        """Keep samples (a request already kept is skipped); how many were new."""
        ...

    async def drift_lines_due(
        self, now: datetime, *, interval_s: float, every_samples: int
    ) -> list[tuple[str, str]]:
        """(model line, project) pairs with new samples since their last check, whose last
        check is ``interval_s`` old or who received ``every_samples`` since."""
        ...

    async def drift_window(
        self, model_line: str, start: datetime, end: datetime, limit: int
    ) -> list[DriftSample]:
        """The newest ``limit`` samples served in [start, end), oldest first."""
        ...

    async def prune_drift_samples(self, before: datetime) -> int: ...

    async def drift_reports(self, project_id: str, limit: int) -> list[StoredDriftReport]:
        """Newest first."""
        ...

    async def drift_report(self, report_id: uuid.UUID) -> StoredDriftReport | None: ...


class ReferenceStore(Protocol):
    """What a model version's training data looks like to drift (computed once per version)."""

    async def load(self, model_line: str, version: str) -> Features | None:
        """None when the version has no reference (yet)."""
        ...


class ReportArtifacts(Protocol):
    """The plots of drift reports."""

    async def put_plot(self, report_id: uuid.UUID, feature: str, png: bytes) -> str:
        """Store a test's PNG; its key."""
        ...

    async def get_plot(self, key: str) -> bytes: ...
