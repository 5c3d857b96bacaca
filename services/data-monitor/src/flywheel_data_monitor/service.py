"""The data monitor's use cases: plain async methods over the ports.

Every change to a project happens in one transaction that claims the event, locks the project's
row and queues the outgoing events in the outbox. Replicas and redeliveries therefore serialize
on that row and on the claim, which is what makes ``threshold.reached`` fire exactly once per
retrain however many consumers and timers look at the project.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import structlog

from flywheel_contracts import Event, InferenceLoggedV1, LabelsSavedV1, ProjectConfiguredV1
from flywheel_contracts.datasets import SnapshotSegment
from flywheel_contracts.events import (
    DataQualityFailedPayload,
    DataQualityFailedV1,
    DriftAction,
    DriftDetectedPayload,
    DriftDetectedV1,
    DriftTestSummary,
    LabelRequestItem,
    LabelsRequestedPayload,
    LabelsRequestedV1,
    RetrainPolicy,
    ThresholdReachedPayload,
    ThresholdReachedV1,
    ThresholdReason,
)
from flywheel_data_monitor.drift import (
    STATISTICS,
    DriftReport,
    Features,
    LabelCandidate,
    choose_action,
    most_drifted,
)
from flywheel_data_monitor.drift import Evaluation as DriftEvaluation
from flywheel_data_monitor.drift import evaluate as evaluate_drift
from flywheel_data_monitor.errors import ProjectNotFoundError
from flywheel_data_monitor.plots import plot_test
from flywheel_data_monitor.policy import Evaluation, evaluate
from flywheel_data_monitor.ports import (
    Decision,
    DriftLine,
    DriftSample,
    DriftStore,
    DriftTransaction,
    ProjectState,
    QualityReport,
    ReferenceStore,
    ReportArtifacts,
    SnapshotReader,
    Store,
    StoredDriftReport,
    Transaction,
    Trigger,
)
from flywheel_data_monitor.quality import ReferenceMix, check_batch, reference_mix
from flywheel_data_monitor.settings import DriftSettings
from flywheel_runtime.errors import NotFoundError

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
        if not evaluation.fire or evaluation.reason is None:
            return None
        return await self._fire(
            tx,
            state,
            now,
            reason=evaluation.reason,
            threshold=evaluation.effective_threshold,
            evaluation=evaluation,
            trigger=trigger,
            cause=cause,
        )

    async def fire_for_drift(
        self,
        tx: Transaction,
        project_id: str,
        now: datetime,
        *,
        min_fresh_labels: int,
        cause: Event[Any],
    ) -> Decision | None:
        """Fire a retrain with reason ``drift`` (the caller saw drift worth retraining for),
        on the labels not trained on yet; None when there is no snapshot or too few of them."""
        state = await tx.lock_project(project_id)
        if state.pending_labels < min_fresh_labels:
            return None
        evaluation = evaluate(
            self.policy_of(state),
            state.window,
            last_fired_at=state.last_fired_at,
            now=now,
            policy_revision=state.config_revision,
        )
        decision = await self._fire(
            tx,
            state,
            now,
            reason=ThresholdReason.DRIFT,
            threshold=min_fresh_labels,
            evaluation=evaluation,
            trigger="drift",
            cause=cause,
        )
        await tx.save_project(state)
        return decision

    async def _fire(
        self,
        tx: Transaction,
        state: ProjectState,
        now: datetime,
        *,
        reason: ThresholdReason,
        threshold: int,
        evaluation: Evaluation,
        trigger: Trigger,
        cause: Event[Any] | None,
    ) -> Decision | None:
        """Store the decision, queue threshold.reached and reset the pending window."""
        if state.head_snapshot_id is None:
            return None
        excluded = await tx.quarantined_label_ids(state.project_id)
        model_line = state.model_line or state.project_id
        payload = ThresholdReachedPayload(
            project_id=state.project_id,
            model_line=model_line,
            snapshot_id=state.head_snapshot_id,
            reason=reason,
            decision_id=uuid.uuid4(),
            labels_since_last=state.pending_labels,
            threshold=threshold,
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
            reason=reason,
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
            reason=reason.value,
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


# --- drift --------------------------------------------------------------------------------------


def drift_sample(event: InferenceLoggedV1) -> DriftSample | None:
    """The drift features an inference log carries; None when it carries none (a failed
    request, or a model without an embedding and a BFF that computes no statistics)."""
    payload = event.payload
    if payload.status != "ok" or (payload.embedding is None and payload.image_stats is None):
        return None
    stats = payload.image_stats
    return DriftSample(
        request_id=payload.request_id,
        project_id=payload.project_id,
        model_line=payload.model_line,
        model_version=payload.model_version,
        served_at=_aware(payload.served_at),
        embedding=payload.embedding,
        brightness=None if stats is None else stats.brightness,
        contrast=None if stats is None else stats.contrast,
        width=None if stats is None else stats.width,
        height=None if stats is None else stats.height,
        predicted_class=payload.predicted_class,
        confidence=payload.confidence,
        input_sha256=payload.input_sha256,
        input_key=payload.input_key,
    )


def window_features(samples: Sequence[DriftSample]) -> Features:
    """The samples as drift compares them; a sample without an embedding gets a row of NaN
    (the embedding test leaves it out), and a statistic is compared only when every sample
    has it."""
    embeddings = [sample.embedding for sample in samples]
    width = max((len(e) for e in embeddings if e is not None), default=0)
    statistics = {
        name: np.array([getattr(sample, name) for sample in samples], dtype=float)
        for name in STATISTICS
        if all(getattr(sample, name) is not None for sample in samples)
    }
    return Features(
        embeddings=(
            np.array(
                [e if e is not None and len(e) == width else [np.nan] * width for e in embeddings],
                dtype=float,
            )
            if width
            else None
        ),
        statistics=statistics,
        predicted=[sample.predicted_class or "" for sample in samples],
        confidences=[sample.confidence for sample in samples],
        inputs=[(sample.input_sha256, sample.input_key) for sample in samples],
    )


class DriftMonitor:
    """Keeps the drift features of inference logs and checks each model line's recent window
    against its champion's training reference, on a schedule and on volume."""

    def __init__(
        self,
        store: DriftStore,
        references: ReferenceStore,
        artifacts: ReportArtifacts,
        monitor: DataMonitor,
        settings: DriftSettings,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._references = references
        self._artifacts = artifacts
        self._monitor = monitor
        self._settings = settings
        self._clock = clock

    async def inference_logged(self, event: InferenceLoggedV1) -> None:
        """Keep the log's drift features (idempotent by request id)."""
        if not self._settings.enabled:
            return
        sample = drift_sample(event)
        if sample is not None:
            await self._store.add_drift_samples([sample])

    async def tick(self) -> list[StoredDriftReport]:
        """Check every model line that is due; drop features past their retention."""
        if not self._settings.enabled:
            return []
        now = self._clock()
        due = await self._store.drift_lines_due(
            now,
            interval_s=self._settings.check_interval_s,
            every_samples=self._settings.check_every_samples,
        )
        reports = [await self.check(model_line, project_id) for model_line, project_id in due]
        await self._store.prune_drift_samples(now - timedelta(seconds=self._settings.retention_s))
        return [report for report in reports if report is not None]

    async def check(self, model_line: str, project_id: str) -> StoredDriftReport | None:
        """Compare the line's window with its champion's reference; store the report and
        announce drift. None when there is nothing to compare (no reference for the version)."""
        now = self._clock()
        start = now - timedelta(seconds=self._settings.window_s)
        samples = await self._store.drift_window(
            model_line, start, now, self._settings.window_samples
        )
        # The version that served most of the window is the champion being judged (during a
        # canary the challenger's share is the smaller one, and the validator judged it).
        versions = Counter(sample.model_version for sample in samples)
        version = versions.most_common(1)[0][0] if versions else None
        reference = None if version is None else await self._references.load(model_line, version)
        if version is None or reference is None:
            log.info("drift not checked", model_line=model_line, version=version)
            async with self._store.drift_transaction() as tx:
                line = await tx.lock_drift_line(model_line, project_id)
                line.last_checked_at = now
                await tx.save_drift_line(line)
            return None
        served = [s for s in samples if s.model_version == version]

        def judge() -> tuple[DriftEvaluation, dict[str, bytes], list[LabelCandidate]]:
            # Classifiers, statistics and plots take a while: off the loop, so the service's
            # consumers and API keep answering meanwhile.
            window = window_features(served)
            evaluation = evaluate_drift(
                reference,
                window,
                self._settings.thresholds,
                project_id=project_id,
                model_line=model_line,
                model_version=version,
                window_start=start,
                window_end=now,
            )
            pngs = {
                test.feature: plot_test(test, reference, window, evaluation.scores)
                for test in evaluation.report.tests
            }
            candidates = most_drifted(
                window, evaluation.scores, self._settings.max_label_requests, above=evaluation.cut
            )
            return evaluation, pngs, candidates

        evaluation, pngs, candidates = await asyncio.to_thread(judge)
        report = evaluation.report
        plots = {
            feature: await self._artifacts.put_plot(report.report_id, feature, png)
            for feature, png in pngs.items()
        }
        async with self._store.drift_transaction() as tx:
            line = await tx.lock_drift_line(model_line, project_id)
            stored = await self._act(tx, line, evaluation.report, candidates, now)
            stored = stored.model_copy(update={"plots": plots})
            await tx.add_drift_report(stored)
            line.last_checked_at = now
            line.last_report_id = report.report_id
            await tx.save_drift_line(line)
        log.info(
            "drift checked",
            model_line=model_line,
            version=version,
            samples=report.samples,
            drifted=stored.drifted,
            action=stored.action,
        )
        return stored

    async def _act(
        self,
        tx: DriftTransaction,
        line: DriftLine,
        report: DriftReport,
        candidates: list[LabelCandidate],
        now: datetime,
    ) -> StoredDriftReport:
        if not report.drifted:
            return StoredDriftReport(report=report, drifted=False, created_at=now)
        cooling = (
            line.last_action_at is not None
            and line.last_action_version == report.model_version
            and now - _aware(line.last_action_at) < timedelta(seconds=self._settings.cooldown_s)
        )
        if cooling:
            return StoredDriftReport(
                report=report,
                drifted=True,
                note=f"drift already acted on ({line.last_action}) for version "
                f"{report.model_version} at {line.last_action_at}: in cooldown",
                created_at=now,
            )
        project = await tx.lock_project(report.project_id)
        action = choose_action(
            fresh_labels=project.pending_labels if project.head_snapshot_id else 0,
            min_fresh_labels=self._settings.min_fresh_labels,
            candidates=len(candidates),
            request_pending=False,
        )
        detected = DriftDetectedV1(
            payload=DriftDetectedPayload(
                project_id=report.project_id,
                model_line=report.model_line,
                model_version=report.model_version,
                report_id=report.report_id,
                window_start=report.window_start,
                window_end=report.window_end,
                samples=report.samples,
                tests=[
                    DriftTestSummary(
                        kind=test.kind,
                        feature=test.feature,
                        drifted=test.drifted,
                        p_value=test.p_value,
                        effect=test.effect,
                        threshold=test.threshold,
                    )
                    for test in report.tests
                    if test.judged
                ],
                action=action,
                reasons=report.reasons(),
            )
        )
        await tx.emit(detected)
        if action is DriftAction.RETRAIN:
            await self._monitor.fire_for_drift(
                tx,
                report.project_id,
                now,
                min_fresh_labels=self._settings.min_fresh_labels,
                cause=detected,
            )
        elif action is DriftAction.LABELS_REQUESTED:
            await tx.emit(
                detected.caused(
                    LabelsRequestedV1,
                    LabelsRequestedPayload(
                        project_id=report.project_id,
                        model_line=report.model_line,
                        request_id=uuid.uuid4(),
                        reason="drift",
                        report_id=report.report_id,
                        items=[
                            LabelRequestItem(
                                input_sha256=c.input_sha256,
                                image_key=c.image_key,
                                score=round(c.score, 6),
                                predicted_class=c.predicted_class or None,
                                confidence=c.confidence,
                            )
                            for c in candidates
                        ],
                    ),
                )
            )
        line.last_action = action
        line.last_action_at = now
        line.last_action_version = report.model_version
        return StoredDriftReport(
            report=report,
            drifted=True,
            action=action,
            event_id=detected.event_id,
            created_at=now,
        )

    # --- read API ---------------------------------------------------------------------------

    async def reports(self, project_id: str, limit: int) -> list[StoredDriftReport]:
        return await self._store.drift_reports(project_id, limit)

    async def report(self, report_id: uuid.UUID) -> StoredDriftReport:
        stored = await self._store.drift_report(report_id)
        if stored is None:
            raise NotFoundError("no such drift report", details={"report_id": str(report_id)})
        return stored

    async def plot(self, report_id: uuid.UUID, feature: str) -> bytes:
        stored = await self.report(report_id)
        key = stored.plots.get(feature)
        if key is None:
            raise NotFoundError(
                "the report has no plot of that test",
                details={"report_id": str(report_id), "feature": feature},
            )
        return await self._artifacts.get_plot(key)
