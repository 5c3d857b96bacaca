import asyncio
import copy
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker, TestRabbitBroker

from flywheel_contracts import (
    DataQualityFailedV1,
    Event,
    InferenceLoggedV1,
    LabelsSavedV1,
    ProjectConfiguredV1,
    ThresholdReachedV1,
)
from flywheel_contracts.datasets import ManifestEntry, SnapshotSegment, split_for
from flywheel_contracts.events import RetrainPolicy, ThresholdReason
from flywheel_data_monitor.api import router
from flywheel_data_monitor.errors import SegmentUnavailableError
from flywheel_data_monitor.handlers import register
from flywheel_data_monitor.ports import Decision, DriftSample, ProjectState, QualityReport
from flywheel_data_monitor.service import DataMonitor, DriftMonitor
from flywheel_data_monitor.settings import DriftSettings
from flywheel_runtime.http import install_error_handlers
from flywheel_runtime.messaging import create_broker, is_retryable
from flywheel_runtime.topology import Topology

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CLASSES = [str(d) for d in range(10)]


# --- fakes of the ports -------------------------------------------------------------------------


@dataclass
class FakeStore:
    """The Store port in memory: transactions are serialized and apply only when they succeed."""

    projects: dict[str, ProjectState] = field(default_factory=dict)
    claimed: set[uuid.UUID] = field(default_factory=set)
    reports_: list[QualityReport] = field(default_factory=list)
    quarantined: dict[str, dict[uuid.UUID, uuid.UUID]] = field(default_factory=dict)
    """Quarantined label id → report id, per project."""
    decisions_: list[Decision] = field(default_factory=list)
    outbox: list[Event[Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator["FakeTransaction"]:
        async with self.lock:
            tx = FakeTransaction(copy.deepcopy(self))
            yield tx
            self.projects = tx.view.projects
            self.claimed = tx.view.claimed
            self.reports_ = tx.view.reports_
            self.quarantined = tx.view.quarantined
            self.decisions_ = tx.view.decisions_
            self.outbox = tx.view.outbox

    def __deepcopy__(self, memo: dict[int, Any]) -> "FakeStore":
        return FakeStore(
            projects={k: v.model_copy(deep=True) for k, v in self.projects.items()},
            claimed=set(self.claimed),
            reports_=list(self.reports_),
            quarantined={k: dict(v) for k, v in self.quarantined.items()},
            decisions_=list(self.decisions_),
            outbox=list(self.outbox),
        )

    async def project(self, project_id: str) -> ProjectState | None:
        return self.projects.get(project_id)

    async def projects_with_pending(self) -> list[str]:
        return sorted(p for p, s in self.projects.items() if s.pending_labels > 0)

    async def quarantined_count(self, project_id: str) -> int:
        return len(self.quarantined.get(project_id, {}))

    async def decisions(self, project_id: str, limit: int) -> list[Decision]:
        mine = [d for d in self.decisions_ if d.project_id == project_id]
        return list(reversed(mine))[:limit]

    async def reports(self, project_id: str, limit: int) -> list[QualityReport]:
        mine = [r for r in self.reports_ if r.project_id == project_id]
        return list(reversed(mine))[:limit]

    def events(self, event_type: type[Event[Any]]) -> list[Any]:
        return [e for e in self.outbox if isinstance(e, event_type)]


class FakeTransaction:
    def __init__(self, view: FakeStore) -> None:
        self.view = view

    async def claim(self, event_id: uuid.UUID) -> bool:
        if event_id in self.view.claimed:
            return False
        self.view.claimed.add(event_id)
        return True

    async def lock_project(self, project_id: str) -> ProjectState:
        return self.view.projects.setdefault(project_id, ProjectState(project_id=project_id))

    async def try_lock_project(self, project_id: str) -> ProjectState | None:
        return self.view.projects.get(project_id)

    async def save_project(self, state: ProjectState) -> None:
        self.view.projects[state.project_id] = state

    async def batch_seen(self, project_id: str, batch_id: uuid.UUID) -> bool:
        return any(
            r.project_id == project_id and r.batch_id == batch_id for r in self.view.reports_
        )

    async def add_report(self, report: QualityReport) -> None:
        self.view.reports_.append(report)

    async def quarantine(
        self, project_id: str, label_ids: list[uuid.UUID], report: QualityReport
    ) -> None:
        mine = self.view.quarantined.setdefault(project_id, {})
        mine.update(dict.fromkeys(label_ids, report.report_id))

    async def quarantined_label_ids(self, project_id: str) -> list[uuid.UUID]:
        return sorted(self.view.quarantined.get(project_id, {}))

    async def add_decision(self, decision: Decision) -> None:
        self.view.decisions_.append(decision)

    async def emit(self, event: Event[Any]) -> None:
        self.view.outbox.append(event)


@dataclass
class FakeSnapshots:
    """The SnapshotReader port: segments by snapshot id, and a switch to play S3 being down."""

    segments: dict[str, SnapshotSegment] = field(default_factory=dict)
    resolved: list[str] = field(default_factory=list)
    down: bool = False

    async def read_segment(self, project_id: str, snapshot_id: str) -> SnapshotSegment:
        if self.down:
            raise SegmentUnavailableError("snapshot segment unavailable")
        segment = self.segments[snapshot_id]
        assert segment.project_id == project_id
        return segment

    async def class_counts(self, project_id: str, snapshot_id: str) -> dict[str, int]:
        if self.down:
            raise SegmentUnavailableError("snapshot unavailable")
        self.resolved.append(snapshot_id)
        counts: dict[str, int] = {}
        current: str | None = snapshot_id
        while current is not None:
            segment = self.segments[current]
            assert segment.project_id == project_id
            for entry in segment.upserts:
                counts[entry.class_name] = counts.get(entry.class_name, 0) + 1
            current = segment.parent_snapshot_id
        return counts


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --- harness ------------------------------------------------------------------------------------


@dataclass
class Harness:
    store: FakeStore
    snapshots: FakeSnapshots
    clock: Clock
    monitor: DataMonitor
    broker: RabbitBroker
    topology: Topology
    drift: "FakeDriftStore"
    sequence: int = 0
    parent: str | None = None

    def batch(
        self,
        n: int,
        *,
        project: str = "digits",
        classes: list[str] | None = None,
        labeler: str = "alice",
        prefilled: int = 0,
        corrected: int = 0,
        sequence: int | None = None,
    ) -> LabelsSavedV1:
        """A labels.saved whose segment the fake S3 holds, chained onto the previous batch."""
        names = classes or CLASSES
        self.sequence += 1
        upserts = [_entry(names[i % len(names)], labeler) for i in range(n)]
        snapshot_id = f"snap-{uuid.uuid4().hex[:12]}"
        batch_id = uuid.uuid4()
        self.snapshots.segments[snapshot_id] = SnapshotSegment(
            snapshot_id=snapshot_id,
            project_id=project,
            parent_snapshot_id=self.parent,
            batch_id=batch_id,
            created_at=self.clock.now,
            upserts=upserts,
        )
        self.parent = snapshot_id
        return LabelsSavedV1.model_validate(
            {
                "occurred_at": self.clock.now,
                "payload": {
                    "project_id": project,
                    "batch_id": batch_id,
                    "snapshot_id": snapshot_id,
                    "snapshot_sequence": sequence or self.sequence,
                    "label_ids": [e.label_id for e in upserts],
                    "prefilled_count": prefilled,
                    "corrected_count": corrected,
                },
            }
        )

    async def publish(self, event: Event[Any] | dict[str, Any], routing_key: str = "") -> None:
        body = event if isinstance(event, dict) else event.model_dump(mode="json")
        key = routing_key or (event.routing_key() if isinstance(event, Event) else "")
        await self.broker.publish(
            body, exchange=self.topology.exchange_for(LabelsSavedV1), routing_key=key
        )


def _entry(class_name: str, labeler: str) -> ManifestEntry:
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    return ManifestEntry(
        label_id=uuid.uuid4(),
        image_sha256=sha,
        image_key=f"images/{sha[:2]}/{sha}",
        class_name=class_name,
        split=split_for(sha),
        labeler=labeler,
    )


def _configured(
    revision: int = 1,
    project: str = "digits",
    class_names: list[str] | None = None,
    **policy: Any,
) -> ProjectConfiguredV1:
    return ProjectConfiguredV1.model_validate(
        {
            "payload": {
                "project_id": project,
                "model_line": f"{project}-classifier",
                "task_type": "classification",
                "class_names": class_names or CLASSES,
                "policy": {"count": 100, **policy},
                "revision": revision,
            }
        }
    )


class FakeDriftStore:
    """Keeps drift samples by request id; the checks run against PostgreSQL in integration."""

    def __init__(self) -> None:
        self.samples: dict[uuid.UUID, DriftSample] = {}

    async def add_drift_samples(self, samples: list[DriftSample]) -> int:
        new = [s for s in samples if s.request_id not in self.samples]
        self.samples |= {s.request_id: s for s in new}
        return len(new)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    store, snapshots, clock = FakeStore(), FakeSnapshots(), Clock()
    monitor = DataMonitor(store, snapshots, default_policy=RetrainPolicy(count=50), clock=clock)
    drift_store = FakeDriftStore()
    drift = DriftMonitor(drift_store, None, None, monitor, DriftSettings(), clock=clock)  # type: ignore[arg-type]
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id="data-monitor")
    topology = Topology(namespace="component.")
    register(broker, topology, monitor, drift)
    async with TestRabbitBroker(broker) as test_broker:
        yield Harness(store, snapshots, clock, monitor, test_broker, topology, drift_store)


# --- labels.saved -------------------------------------------------------------------------------


async def test_a_batch_below_the_count_is_counted_and_reported(harness: Harness) -> None:
    await harness.publish(_configured(count=100))
    event = harness.batch(40, prefilled=10, corrected=3)

    await harness.publish(event)

    state = harness.store.projects["digits"]
    assert state.pending_labels == 40
    assert (state.pending_prefilled, state.pending_corrected) == (10, 3)
    assert state.head_snapshot_id == event.payload.snapshot_id
    assert state.oldest_pending_at == START
    assert state.last_evaluation is not None
    assert state.last_evaluation.explanation == "waiting: 40/100 labels"
    [report] = harness.store.reports_
    assert report.passed
    assert report.counted
    assert report.reference_source == "configured_classes"
    assert harness.store.outbox == []


async def test_reaching_the_count_emits_one_threshold_reached_caused_by_the_batch(
    harness: Harness,
) -> None:
    await harness.publish(_configured(count=100))
    first, second = harness.batch(60), harness.batch(60)

    await harness.publish(first)
    await harness.publish(second)

    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.correlation_id == second.correlation_id
    assert fired.causation_id == second.event_id
    assert fired.payload.model_line == "digits-classifier"
    assert fired.payload.snapshot_id == second.payload.snapshot_id
    assert fired.payload.reason is ThresholdReason.COUNT
    assert (fired.payload.labels_since_last, fired.payload.threshold) == (120, 100)
    [decision] = harness.store.decisions_
    assert decision.decision_id == fired.payload.decision_id
    assert decision.trigger == "labels.saved"
    assert decision.evaluation.policy_revision == 1
    state = harness.store.projects["digits"]
    assert state.pending_labels == 0
    assert state.oldest_pending_at is None
    assert state.trained_snapshot_id == second.payload.snapshot_id


async def test_the_count_restarts_from_the_fired_snapshot(harness: Harness) -> None:
    await harness.publish(_configured(count=100))
    for _ in range(5):
        await harness.publish(harness.batch(50))

    fired = harness.store.events(ThresholdReachedV1)
    assert [e.payload.labels_since_last for e in fired] == [100, 100]
    assert harness.store.projects["digits"].pending_labels == 50


async def test_a_redelivered_event_changes_nothing(harness: Harness) -> None:
    await harness.publish(_configured(count=100))
    event = harness.batch(60)

    await harness.publish(event)
    await harness.publish(event)
    await harness.publish(event)

    assert harness.store.projects["digits"].pending_labels == 60
    assert len(harness.store.reports_) == 1


async def test_the_same_batch_under_another_event_id_is_counted_once(harness: Harness) -> None:
    event = harness.batch(30)
    again = LabelsSavedV1(payload=event.payload)

    await harness.publish(event)
    await harness.publish(again)

    assert again.event_id != event.event_id
    assert harness.store.projects["digits"].pending_labels == 30


async def test_head_is_the_highest_sequence_whatever_the_arrival_order(harness: Harness) -> None:
    first, second, third = harness.batch(10), harness.batch(10), harness.batch(10)

    for event in (third, first, second):
        await harness.publish(event)

    state = harness.store.projects["digits"]
    assert state.head_snapshot_id == third.payload.snapshot_id
    assert state.head_sequence == 3
    assert state.pending_labels == 30


async def test_a_batch_arriving_behind_the_trained_snapshot_is_not_counted_again(
    harness: Harness,
) -> None:
    await harness.publish(_configured(count=100))
    early, late = harness.batch(50), harness.batch(50)
    newest = harness.batch(100)

    await harness.publish(early)
    await harness.publish(newest)
    await harness.publish(late)

    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.payload.snapshot_id == newest.payload.snapshot_id
    assert harness.store.projects["digits"].pending_labels == 0
    late_report = next(r for r in harness.store.reports_ if r.batch_id == late.payload.batch_id)
    assert late_report.passed
    assert not late_report.counted


async def test_without_configuration_the_default_policy_and_project_id_apply(
    harness: Harness,
) -> None:
    event = harness.batch(50)

    await harness.publish(event)

    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.payload.model_line == "digits"
    assert fired.payload.threshold == 50
    assert harness.store.decisions_[0].evaluation.policy_revision == 0


# --- quality ------------------------------------------------------------------------------------


async def test_a_quarantined_batch_is_not_counted_and_its_labels_are_excluded_later(
    harness: Harness,
) -> None:
    await harness.publish(_configured(count=100))
    bad = harness.batch(30, classes=["7"], labeler="mallory")

    await harness.publish(bad)
    await harness.publish(harness.batch(100))

    [failed] = harness.store.events(DataQualityFailedV1)
    assert failed.causation_id == bad.event_id
    assert failed.correlation_id == bad.correlation_id
    assert sorted(failed.payload.quarantined_label_ids) == sorted(bad.payload.label_ids)
    assert "labeler 'mallory' gave class '7' to 100% of 30 labels" in failed.payload.reasons[0]
    report = next(r for r in harness.store.reports_ if r.batch_id == bad.payload.batch_id)
    assert failed.payload.report_id == report.report_id
    assert report.quarantined
    assert not report.counted
    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.payload.labels_since_last == 100
    assert sorted(fired.payload.excluded_label_ids) == sorted(bad.payload.label_ids)
    assert harness.store.decisions_[0].excluded_label_count == 30


async def test_after_a_retrain_batches_are_judged_against_the_trained_snapshot(
    harness: Harness,
) -> None:
    await harness.publish(_configured(count=100, class_names=["1", "2", "8", "9"]))
    await harness.publish(harness.batch(100, classes=["1", "2"]))
    trained = harness.store.projects["digits"].trained_snapshot_id

    await harness.publish(harness.batch(60, classes=["1", "2"]))
    await harness.publish(harness.batch(60, classes=["8", "9"]))

    assert harness.snapshots.resolved == [trained]
    latest, middle = harness.store.reports_[-1], harness.store.reports_[-2]
    assert middle.reference_source == "trained_snapshot"
    assert middle.passed
    assert not latest.passed
    assert latest.checks[0].figures["total_variation"] == pytest.approx(1.0)


async def test_s3_down_raises_a_retryable_error_and_records_nothing(harness: Harness) -> None:
    event = harness.batch(30)
    harness.snapshots.down = True

    with pytest.raises(SegmentUnavailableError) as raised:
        await harness.monitor.labels_saved(event)
    await harness.publish(event)

    assert is_retryable(raised.value)
    assert harness.store.claimed == set()
    assert harness.store.projects == {}


async def test_a_malformed_event_never_reaches_the_monitor(harness: Harness) -> None:
    await harness.publish({"type": "labels.saved", "payload": {"project_id": "x"}}, "labels.saved")

    assert harness.store.claimed == set()
    assert harness.store.reports_ == []


# --- project.configured -------------------------------------------------------------------------


async def test_an_older_configuration_is_ignored(harness: Harness) -> None:
    await harness.publish(_configured(revision=2, count=300))
    await harness.publish(_configured(revision=1, count=10))

    state = harness.store.projects["digits"]
    assert state.config_revision == 2
    assert state.policy is not None
    assert state.policy.count == 300


async def test_lowering_the_count_fires_at_once_caused_by_the_configuration(
    harness: Harness,
) -> None:
    await harness.publish(_configured(revision=1, count=100))
    await harness.publish(harness.batch(60))
    lowered = _configured(revision=2, count=50)

    await harness.publish(lowered)

    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.causation_id == lowered.event_id
    assert harness.store.decisions_[0].trigger == "project.configured"
    assert harness.store.decisions_[0].evaluation.policy_revision == 2


# --- timer --------------------------------------------------------------------------------------


async def test_timer_fires_max_wait_with_the_last_batch_as_cause(harness: Harness) -> None:
    await harness.publish(_configured(count=100, max_wait_s=600))
    event = harness.batch(5)
    await harness.publish(event)

    harness.clock.advance(599)
    early = await harness.monitor.tick()
    harness.clock.advance(1)
    fired_now = await harness.monitor.tick()

    assert (early, fired_now) == (0, 1)
    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.payload.reason is ThresholdReason.MAX_WAIT
    assert fired.payload.labels_since_last == 5
    assert fired.causation_id == event.event_id
    assert fired.correlation_id == event.correlation_id
    assert harness.store.decisions_[0].trigger == "timer"
    assert harness.store.decisions_[0].evaluation.oldest_pending_age_s == 600


async def test_cooldown_defers_a_reached_count_until_the_timer_sees_it_end(
    harness: Harness,
) -> None:
    await harness.publish(_configured(count=50, cooldown_s=300))
    await harness.publish(harness.batch(50))
    harness.clock.advance(100)
    await harness.publish(harness.batch(50))
    deferred = harness.store.projects["digits"].last_evaluation

    harness.clock.advance(199)
    still = await harness.monitor.tick()
    harness.clock.advance(1)
    after = await harness.monitor.tick()

    assert deferred is not None
    assert deferred.in_cooldown
    assert deferred.due_reason is ThresholdReason.COUNT
    assert (still, after) == (0, 1)
    assert len(harness.store.events(ThresholdReachedV1)) == 2
    assert harness.store.decisions_[1].trigger == "timer"
    assert await harness.monitor.tick() == 0


async def test_adaptive_policy_fires_early_on_many_corrections(harness: Harness) -> None:
    adaptive = {"enabled": True, "min_prefilled": 20, "min_count": 10}
    await harness.publish(_configured(count=100, adaptive=adaptive))
    await harness.publish(harness.batch(30, prefilled=30, corrected=0))
    await harness.publish(harness.batch(30, prefilled=30, corrected=24))

    [fired] = harness.store.events(ThresholdReachedV1)
    assert fired.payload.reason is ThresholdReason.ADAPTIVE
    assert (fired.payload.labels_since_last, fired.payload.threshold) == (60, 30)
    assert harness.store.decisions_[0].evaluation.correction_rate == pytest.approx(0.4)


# --- read API -----------------------------------------------------------------------------------


async def test_read_api_serves_state_decisions_and_reports(harness: Harness) -> None:
    await harness.publish(_configured(count=100))
    await harness.publish(harness.batch(100))
    await harness.publish(harness.batch(20, classes=["7"], labeler="mallory"))
    await harness.publish(harness.batch(30))
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.monitor = harness.monitor

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        state = await client.get("/v1/projects/digits/state")
        decisions = await client.get("/v1/projects/digits/decisions")
        reports = await client.get("/v1/projects/digits/quality-reports", params={"limit": 2})
        unknown = await client.get("/v1/projects/nope/decisions")
        invalid = await client.get("/v1/projects/Not_A_Slug/state")

    assert state.status_code == 200
    body = state.json()
    assert body["pending"]["labels"] == 30
    assert body["quarantined_labels"] == 20
    assert body["policy"]["count"] == 100
    assert body["last_evaluation"]["explanation"] == "waiting: 30/100 labels"
    [decision] = decisions.json()["decisions"]
    assert decision["reason"] == "count"
    assert decision["evaluation"]["pending_labels"] == 100
    assert [r["quarantined"] for r in reports.json()["reports"]] == [False, True]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "project_not_found"
    assert invalid.status_code == 422


# --- inference.logged (drift features) ------------------------------------------------------------


def _inference(status: str = "ok", **payload: Any) -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": {
                "request_id": uuid.uuid4(),
                "project_id": "digits",
                "model_line": "digits-classifier",
                "registered_model": "digits-classifier",
                "model_version": "3",
                "input_sha256": "a" * 64,
                "predicted_class": "7",
                "confidence": 0.9,
                "latency_ms": 2.0,
                "status": status,
                "served_at": START,
                **payload,
            }
        }
    )


async def test_drift_features_of_an_answered_request_are_kept_once(harness: Harness) -> None:
    stats = {"brightness": 0.2, "contrast": 0.3, "width": 28, "height": 28}
    event = _inference(embedding=[0.5, -1.0], image_stats=stats, input_key="images/aa/" + "a" * 64)

    await harness.broker.publish(
        event.model_dump(mode="json"),
        exchange=harness.topology.exchange_for(InferenceLoggedV1),
        routing_key=event.routing_key(),
    )
    await harness.broker.publish(
        event.model_dump(mode="json"),
        exchange=harness.topology.exchange_for(InferenceLoggedV1),
        routing_key=event.routing_key(),
    )

    [sample] = harness.drift.samples.values()
    assert sample.embedding == [0.5, -1.0]
    assert (sample.brightness, sample.width) == (0.2, 28)
    assert sample.input_key == "images/aa/" + "a" * 64
    assert sample.model_version == "3"


async def test_failed_or_featureless_requests_are_not_kept(harness: Harness) -> None:
    for event in (_inference(status="error", embedding=[1.0]), _inference()):
        await harness.broker.publish(
            event.model_dump(mode="json"),
            exchange=harness.topology.exchange_for(InferenceLoggedV1),
            routing_key=event.routing_key(),
        )

    assert harness.drift.samples == {}
