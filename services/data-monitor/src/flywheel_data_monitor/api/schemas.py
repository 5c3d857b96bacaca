"""Response bodies of the read API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from flywheel_contracts.events import RetrainPolicy
from flywheel_data_monitor.policy import Evaluation
from flywheel_data_monitor.ports import Decision, ProjectState, QualityReport, StoredDriftReport


class PendingOut(BaseModel):
    """Labels counted since the last retrain's snapshot."""

    labels: int
    prefilled: int
    corrected: int
    oldest_at: datetime | None


class ProjectStateOut(BaseModel):
    """Where a project stands towards its next retrain."""

    project_id: str
    configured: bool
    """Whether a project.configured arrived; if not, the service's default policy applies."""
    config_revision: int
    model_line: str
    class_names: list[str]
    policy: RetrainPolicy
    head_snapshot_id: str | None
    head_sequence: int | None
    trained_snapshot_id: str | None
    """Snapshot of the last retrain; labels in it (late batches too) never count again."""
    trained_sequence: int | None
    last_fired_at: datetime | None
    pending: PendingOut
    quarantined_labels: int
    last_evaluation: Evaluation | None

    @classmethod
    def build(cls, state: ProjectState, policy: RetrainPolicy, quarantined: int) -> ProjectStateOut:
        return cls(
            project_id=state.project_id,
            configured=state.config_revision > 0,
            config_revision=state.config_revision,
            model_line=state.model_line or state.project_id,
            class_names=state.class_names,
            policy=policy,
            head_snapshot_id=state.head_snapshot_id,
            head_sequence=state.head_sequence,
            trained_snapshot_id=state.trained_snapshot_id,
            trained_sequence=state.trained_sequence,
            last_fired_at=state.last_fired_at,
            pending=PendingOut(
                labels=state.pending_labels,
                prefilled=state.pending_prefilled,
                corrected=state.pending_corrected,
                oldest_at=state.oldest_pending_at,
            ),
            quarantined_labels=quarantined,
            last_evaluation=state.last_evaluation,
        )


class DecisionsOut(BaseModel):
    decisions: list[Decision]


class QualityReportsOut(BaseModel):
    reports: list[QualityReport]


class DriftReportsOut(BaseModel):
    reports: list[StoredDriftReport]
