"""The data monitor's use cases: plain async methods over the ports.

Every change to a project happens in one transaction that claims the event, locks the project's
row and queues the outgoing events in the outbox. Replicas and redeliveries therefore serialize
on that row and on the claim, which is what makes ``threshold.reached`` fire exactly once per
retrain however many consumers and timers look at the project.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from flywheel_contracts import Event, LabelsSavedV1, ProjectConfiguredV1
from flywheel_contracts.datasets import SnapshotSegment
from flywheel_contracts.events import (
    DataQualityFailedPayload,
    DataQualityFailedV1,
    RetrainPolicy,
    ThresholdReachedPayload,
    ThresholdReachedV1,
)
from flywheel_data_monitor.errors import ProjectNotFoundError
from flywheel_data_monitor.policy import evaluate
from flywheel_data_monitor.ports import (
    Decision,
    ProjectState,
    QualityReport,
    SnapshotReader,
    Store,
    Transaction,
    Trigger,
)
from flywheel_data_monitor.quality import ReferenceMix, check_batch, reference_mix

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class DataMonitor:
    """Counts labels per project, checks their quality and decides when a retrain is due."""

    def __init__(
        self,
        store: Store,
        snapshots: SnapshotReader,
        *,
        default_policy: RetrainPolicy,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._snapshots = snapshots
        self._default_policy = default_policy
        self._clock = clock

    # --- events ---------------------------------------------------------------------------

    async def labels_saved(self, event: LabelsSavedV1) -> None:
        """Reacts to labels.saved: checks the batch, then counts or quarantines it.

        Emits data.quality_failed for a quarantined batch and threshold.reached when the
        policy says the project should retrain now.
        """
        saved = event.payload
        # Read before the transaction: S3 trouble raises a retryable error and the batch is
        # redelivered, never counted unchecked, and no row lock waits on S3.
        segment = await self._snapshots.read_segment(saved.project_id, saved.snapshot_id)
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                log.info("labels.saved already handled", batch_id=str(saved.batch_id))
                return
            state = await tx.lock_project(saved.project_id)
            # Checked under the lock, so a copy racing on another replica sees the first's report.
            if await tx.batch_seen(saved.project_id, saved.batch_id):
                log.info("batch already handled under another event", batch_id=str(saved.batch_id))
                return
            now = self._clock()
            await self._check_and_count(tx, state, event, segment, now)
            await self._decide(tx, state, now, trigger="labels.saved", cause=event)
            await tx.save_project(state)

    async def project_configured(self, event: ProjectConfiguredV1) -> None:
        """Reacts to project.configured: keeps the newest policy; may emit threshold.reached."""
        config = event.payload
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                return
            state = await tx.lock_project(config.project_id)
            if config.revision <= state.config_revision:
                log.info(
                    "older project configuration ignored",
                    project_id=config.project_id,
                    revision=config.revision,
                    current=state.config_revision,
                )
                return
            state.config_revision = config.revision
            state.model_line = config.model_line
            state.task_type = config.task_type
            state.class_names = list(config.class_names)
            state.policy = config.policy
            # A lower count may already be reached: decide now rather than at the next tick.
            await self._decide(tx, state, self._clock(), trigger="project.configured", cause=event)
            await tx.save_project(state)

    async def tick(self) -> int:
        """Timer: re-evaluates projects with pending labels; emits threshold.reached when due.

        Catches what only time can trigger: a cooldown that ended with the count reached, and
        max-wait. Returns how many retrains fired.
        """
        fired = 0
        for project_id in await self._store.projects_with_pending():
            async with self._store.transaction() as tx:
                # A project locked by a handler is skipped: that handler decides it anyway.
                state = await tx.try_lock_project(project_id)
                if state is None or state.pending_labels == 0:
                    continue
                decision = await self._decide(tx, state, self._clock(), trigger="timer")
                await tx.save_project(state)
                fired += decision is not None
        return fired

    # --- read API -------------------------------------------------------------------------

    async def project(self, project_id: str) -> ProjectState:
        """A project's state; ``ProjectNotFoundError`` when the monitor never heard of it."""
        state = await self._store.project(project_id)
        if state is None:
            raise ProjectNotFoundError(
                f"project {project_id!r} is unknown", details={"project_id": project_id}
            )
        return state

    def policy_of(self, state: ProjectState) -> RetrainPolicy:
        """The policy in force: the project's own, else the service default."""
        return state.policy or self._default_policy

    async def quarantined_count(self, project_id: str) -> int:
        return await self._store.quarantined_count(project_id)

    async def decisions(self, project_id: str, limit: int) -> list[Decision]:
        await self.project(project_id)
        return await self._store.decisions(project_id, limit)

    async def reports(self, project_id: str, limit: int) -> list[QualityReport]:
        await self.project(project_id)
        return await self._store.reports(project_id, limit)

    # --- steps ----------------------------------------------------------------------------

    async def _check_and_count(
        self,
        tx: Transaction,
        state: ProjectState,
        event: LabelsSavedV1,
        segment: SnapshotSegment,
        now: datetime,
    ) -> None:
        saved = event.payload
        reference = await self._reference(state)
        quality = check_batch(segment.upserts, reference, self.policy_of(state).quality)
        counted = quality.passed and _newer_than_trained(saved.snapshot_sequence, state)
        report = QualityReport(
            report_id=uuid.uuid4(),
            project_id=saved.project_id,
            batch_id=saved.batch_id,
            event_id=event.event_id,
            snapshot_id=saved.snapshot_id,
            snapshot_sequence=saved.snapshot_sequence,
            created_at=now,
            label_count=len(saved.label_ids),
            passed=quality.passed,
            quarantined=not quality.passed,
            counted=counted,
            reference_source=reference.source,
            checks=quality.checks,
            reasons=quality.reasons,
        )
        await tx.add_report(report)
        _advance_head(state, saved.snapshot_id, saved.snapshot_sequence)
        if not quality.passed:
            label_ids = sorted(set(saved.label_ids) | {e.label_id for e in segment.upserts})
            await tx.quarantine(saved.project_id, label_ids, report)
            await tx.emit(
                event.caused(
                    DataQualityFailedV1,
                    DataQualityFailedPayload(
                        project_id=saved.project_id,
                        batch_id=saved.batch_id,
                        snapshot_id=saved.snapshot_id,
                        report_id=report.report_id,
                        reasons=quality.reasons,
                        quarantined_label_ids=label_ids,
                    ),
                )
            )
            log.warning(
                "batch quarantined",
                project_id=saved.project_id,
                batch_id=str(saved.batch_id),
                reasons=quality.reasons,
            )
            return
        for entry in segment.upserts:
            if entry.revision == 1:
                state.class_counts[entry.class_name] = (
                    state.class_counts.get(entry.class_name, 0) + 1
                )
        if counted and saved.label_ids:
            state.pending_labels += len(saved.label_ids)
            state.pending_prefilled += saved.prefilled_count
            state.pending_corrected += saved.corrected_count
            saved_at = min(_aware(event.occurred_at), now)
            if state.oldest_pending_at is None or saved_at < state.oldest_pending_at:
                state.oldest_pending_at = saved_at
            state.last_batch_event_id = event.event_id
            state.last_batch_correlation_id = event.correlation_id

    async def _reference(self, state: ProjectState) -> ReferenceMix:
        if state.trained_snapshot_id is not None and state.trained_class_counts is None:
            # Resolved once per retrain and kept on the row, so later batches skip S3.
            state.trained_class_counts = await self._snapshots.class_counts(
                state.project_id, state.trained_snapshot_id
            )
        return reference_mix(
            trained_snapshot_id=state.trained_snapshot_id,
            trained_counts=state.trained_class_counts,
            cumulative_counts=state.class_counts,
            class_names=state.class_names,
        )

    async def _decide(
        self,
        tx: Transaction,
        state: ProjectState,
        now: datetime,
        *,
        trigger: Trigger,
        cause: Event[Any] | None = None,
    ) -> Decision | None:
        """Evaluate the policy; on fire store the decision, queue threshold.reached, reset."""
        evaluation = evaluate(
            self.policy_of(state),
            state.window,
            last_fired_at=state.last_fired_at,
            now=now,
            policy_revision=state.config_revision,
        )
        state.last_evaluation = evaluation
        if not evaluation.fire or evaluation.reason is None or state.head_snapshot_id is None:
            return None
        excluded = await tx.quarantined_label_ids(state.project_id)
        model_line = state.model_line or state.project_id
        payload = ThresholdReachedPayload(
            project_id=state.project_id,
            model_line=model_line,
            snapshot_id=state.head_snapshot_id,
            reason=evaluation.reason,
            decision_id=uuid.uuid4(),
            labels_since_last=evaluation.pending_labels,
            threshold=evaluation.effective_threshold,
            excluded_label_ids=excluded,
        )
        if cause is not None:
            event = cause.caused(ThresholdReachedV1, payload)
        else:
            # The timer has no event of its own: keep the chain of the last counted batch.
            event = ThresholdReachedV1.model_validate(
                {
                    "correlation_id": state.last_batch_correlation_id or uuid.uuid4(),
                    "causation_id": state.last_batch_event_id,
                    "payload": payload,
                }
            )
        decision = Decision(
            decision_id=payload.decision_id,
            project_id=state.project_id,
            model_line=model_line,
            snapshot_id=state.head_snapshot_id,
            reason=evaluation.reason,
            decided_at=now,
            trigger=trigger,
            caused_by=event.causation_id,
            threshold_event_id=event.event_id,
            excluded_label_count=len(excluded),
            evaluation=evaluation,
        )
        await tx.add_decision(decision)
        await tx.emit(event)
        state.trained_snapshot_id = state.head_snapshot_id
        state.trained_sequence = state.head_sequence
        state.trained_class_counts = None
        state.last_fired_at = now
        state.pending_labels = state.pending_prefilled = state.pending_corrected = 0
        state.oldest_pending_at = None
        log.info(
            "threshold reached",
            project_id=state.project_id,
            snapshot_id=state.head_snapshot_id,
            reason=evaluation.reason.value,
            decision_id=str(decision.decision_id),
            trigger=trigger,
        )
        return decision


def _newer_than_trained(sequence: int | None, state: ProjectState) -> bool:
    """Whether a batch's labels are missing from the last retrain's snapshot.

    Snapshots are cumulative, so a batch that arrives late, behind the trained snapshot, was
    already trained on and must not count towards the next retrain.
    """
    if sequence is None or state.trained_sequence is None:
        return True
    return sequence > state.trained_sequence


def _advance_head(state: ProjectState, snapshot_id: str, sequence: int | None) -> None:
    """Make the batch's snapshot the head when it is the newest seen."""
    if state.head_snapshot_id is None:
        newer = True
    elif sequence is None:
        # Without a sequence, arrival order is all there is, and only among unsequenced heads.
        newer = state.head_sequence is None
    else:
        newer = state.head_sequence is None or sequence > state.head_sequence
    if newer:
        state.head_snapshot_id = snapshot_id
        state.head_sequence = sequence


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
