import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_contracts import (
    DataQualityFailedV1,
    Event,
    LabelsSavedV1,
    ProjectConfiguredV1,
    ThresholdReachedV1,
)
from flywheel_contracts.datasets import ManifestEntry, SnapshotSegment, snapshot_id_for, split_for
from flywheel_contracts.events import ThresholdReason
from flywheel_contracts.topology import queue_name
from flywheel_data_monitor.main import create_app
from flywheel_data_monitor.settings import SERVICE, DataMonitorSettings
from flywheel_runtime.app import ServiceRuntime
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_runtime.topology import Topology
from flywheel_testing.events import EventProbe
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.rabbit import delete_names, drain, queue_depth
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration

CLASSES = [str(d) for d in range(10)]


# --- the world around the monitor ---------------------------------------------------------------


class Labeling:
    """Plays the labeling service: writes each batch's segment to S3, then publishes the event."""

    def __init__(
        self, snapshots: SnapshotStore, broker: RabbitBroker, topology: Topology, project: str
    ) -> None:
        self.snapshots = snapshots
        self.broker = broker
        self.topology = topology
        self.project = project
        self.sequence = 0
        self.parent: str | None = None

    async def batch(
        self,
        n: int,
        *,
        classes: list[str] = CLASSES,
        labeler: str = "alice",
        prefilled: int = 0,
        corrected: int = 0,
    ) -> LabelsSavedV1:
        upserts = [_entry(classes[i % len(classes)], labeler) for i in range(n)]
        snapshot_id = snapshot_id_for(self.parent, upserts, [])
        batch_id = uuid.uuid4()
        self.sequence += 1
        await self.snapshots.write_segment(
            SnapshotSegment(
                snapshot_id=snapshot_id,
                project_id=self.project,
                parent_snapshot_id=self.parent,
                batch_id=batch_id,
                created_at=datetime.now().astimezone(),
                upserts=upserts,
            )
        )
        event = LabelsSavedV1.model_validate(
            {
                "payload": {
                    "project_id": self.project,
                    "batch_id": batch_id,
                    "snapshot_id": snapshot_id,
                    "parent_snapshot_id": self.parent,
                    "snapshot_sequence": self.sequence,
                    "label_ids": [e.label_id for e in upserts],
                    "prefilled_count": prefilled,
                    "corrected_count": corrected,
                }
            }
        )
        self.parent = snapshot_id
        return event

    def configured(self, revision: int = 1, **policy: Any) -> ProjectConfiguredV1:
        return ProjectConfiguredV1.model_validate(
            {
                "payload": {
                    "project_id": self.project,
                    "model_line": f"{self.project}-classifier",
                    "task_type": "classification",
                    "class_names": CLASSES,
                    "policy": policy,
                    "revision": revision,
                }
            }
        )

    async def publish(self, *events: Event[Any]) -> None:
        await asyncio.gather(*(publish_event(self.broker, self.topology, e) for e in events))


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


@dataclass
class World:
    rabbit_url: str
    topology: Topology
    platform: PlatformSettings
    schema: str
    bucket: str
    labeling: Labeling
    probe: EventProbe
    stack: AsyncExitStack
    apps: list[FastAPI] = field(default_factory=list)

    def settings(self, **overrides: Any) -> DataMonitorSettings:
        return DataMonitorSettings(
            platform=overrides.pop("platform", self.platform),
            namespace=self.topology.namespace,
            db_schema=self.schema,
            data_bucket=self.bucket,
            tick_interval_s=overrides.pop("tick_interval_s", 0.2),
            **overrides,
        )

    async def start(self, n: int = 1, **overrides: Any) -> list[FastAPI]:
        """Start ``n`` monitor instances sharing one schema and one queue per subscription."""
        started = []
        for _ in range(n):
            # One after the other: concurrent first migrations of one schema would race.
            app = create_app(self.settings(**overrides))
            await self.stack.enter_async_context(app.router.lifespan_context(app))
            self.apps.append(app)
            started.append(app)
        return started

    @property
    def app(self) -> FastAPI:
        return self.apps[0]

    @property
    def runtime(self) -> ServiceRuntime:
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime

    async def scalar(self, sql: str, **params: Any) -> Any:
        assert self.runtime.db is not None
        async with self.runtime.db.transaction() as session:
            return (await session.execute(text(sql), params)).scalar_one()

    async def reports(self) -> int:
        return int(
            await self.scalar(
                "SELECT count(*) FROM quality_reports WHERE project_id = :p",
                p=self.labeling.project,
            )
        )

    async def wait_reports(self, n: int, within: float = 20) -> None:
        async def done() -> bool:
            return await self.reports() >= n

        await wait_for(done, timeout=within, message=f"{n} batches handled")

    async def wait_outbox_empty(self) -> None:
        async def empty() -> bool:
            return await self.scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

        await wait_for(empty, message="outbox published")

    async def get(self, path: str, app: FastAPI | None = None) -> httpx.Response:
        transport = httpx.ASGITransport(app=app or self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(f"/v1/projects/{self.labeling.project}{path}")

    def queue(self, event_type: type[Event[Any]]) -> str:
        return self.topology.namespace + queue_name(SERVICE, event_type.routing_key())


def processed(app: FastAPI) -> float:
    """Messages the app's handlers finished with, whatever the outcome (Prometheus counter)."""
    registry = app.state.runtime.telemetry.registry
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "faststream_received_processed_messages_total"
    )


@pytest.fixture
async def world(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    storage: ObjectStorage,
    unique_bucket: str,
    topology: Topology,
) -> AsyncIterator[World]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        delivery_limit=topology.delivery_limit,
    )
    publisher = create_broker(rabbit_url, app_id="labeling")
    await publisher.connect()
    project = f"p-{uuid.uuid4().hex[:10]}"
    labeling = Labeling(SnapshotStore(storage, bucket=unique_bucket), publisher, topology, project)
    probe = EventProbe(rabbit_url, topology, ThresholdReachedV1, DataQualityFailedV1)
    await probe.start()
    async with AsyncExitStack() as stack:
        built = World(
            rabbit_url=rabbit_url,
            topology=topology,
            platform=platform,
            schema=f"dm_{uuid.uuid4().hex[:10]}",
            bucket=unique_bucket,
            labeling=labeling,
            probe=probe,
            stack=stack,
        )
        try:
            yield built
        finally:
            await stack.aclose()
            queues = {q for app in built.apps for q in app.state.runtime.topology.queue_names}
            await delete_names(rabbit_url, sorted(queues), [])
            await probe.stop()
            await publisher.stop()


# --- exactly once -------------------------------------------------------------------------------


async def test_two_instances_fire_exactly_one_threshold_for_many_batches(world: World) -> None:
    first, second = await world.start(2)
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000))

    async def configured() -> bool:
        state = await world.get("/state")
        return state.status_code == 200 and state.json()["config_revision"] == 1

    await wait_for(configured, message="project configured")
    batches = [await labeling.batch(40) for _ in range(30)]
    # Labeling re-emitting a batch under a new event id must not count it twice either.
    copies = [LabelsSavedV1(payload=b.payload, correlation_id=b.correlation_id) for b in batches]
    await labeling.publish(*batches, *copies)

    async def all_handled() -> bool:
        return processed(first) + processed(second) >= 1 + 60

    await wait_for(all_handled, timeout=30, message="every batch and copy handled")
    await world.wait_outbox_empty()
    await world.probe.collect()

    [fired] = world.probe.of(ThresholdReachedV1)
    assert fired.payload.reason is ThresholdReason.COUNT
    assert fired.payload.labels_since_last == 1000
    assert fired.payload.threshold == 1000
    assert fired.payload.model_line == f"{labeling.project}-classifier"
    assert fired.payload.excluded_label_ids == []
    assert processed(first) >= 1
    assert processed(second) >= 1
    assert await world.reports() == 30
    state = (await world.get("/state", app=second)).json()
    assert state["head_sequence"] == 30
    # Batches handled after the fire but already inside its snapshot were trained on: not counted.
    assert state["pending"]["labels"] == 40 * (30 - state["trained_sequence"])
    counted = await world.scalar(
        "SELECT sum(label_count) FROM quality_reports WHERE counted AND project_id = :p",
        p=labeling.project,
    )
    assert counted == 1000 + state["pending"]["labels"]
    assert state["trained_snapshot_id"] == fired.payload.snapshot_id
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["decision_id"] == str(fired.payload.decision_id)
    assert decision["evaluation"]["pending_labels"] == 1000
    by_id = {b.event_id: b for b in [*batches, *copies]}
    assert fired.causation_id in by_id
    assert fired.correlation_id == by_id[fired.causation_id].correlation_id


async def test_redelivered_events_change_nothing(world: World) -> None:
    [app] = await world.start()
    labeling = world.labeling
    configured = labeling.configured(count=100)
    await labeling.publish(configured)
    batches = [await labeling.batch(40) for _ in range(3)]

    await labeling.publish(*batches, *batches, configured)
    await labeling.publish(*batches)

    async def all_handled() -> bool:
        return (
            processed(app) >= 11
            and await queue_depth(world.rabbit_url, world.queue(LabelsSavedV1)) == 0
        )

    await wait_for(all_handled, message="every copy handled")
    await world.wait_outbox_empty()
    await world.probe.collect()

    [fired] = world.probe.of(ThresholdReachedV1)
    assert fired.payload.labels_since_last == 120
    assert await world.reports() == 3
    assert await world.scalar("SELECT count(*) FROM decisions") == 1
    state = (await world.get("/state")).json()
    assert state["pending"]["labels"] == 0


# --- timer --------------------------------------------------------------------------------------


async def test_max_wait_fires_through_the_timer_with_few_labels(world: World) -> None:
    await world.start()
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000, max_wait_s=1))
    batch = await labeling.batch(5)
    await labeling.publish(batch)

    [fired] = await world.probe.wait(ThresholdReachedV1)

    assert fired.payload.reason is ThresholdReason.MAX_WAIT
    assert fired.payload.labels_since_last == 5
    assert fired.causation_id == batch.event_id
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["trigger"] == "timer"
    assert decision["evaluation"]["oldest_pending_age_s"] >= 1
    assert datetime.fromisoformat(decision["decided_at"]) >= batch.occurred_at


async def test_cooldown_defers_the_next_retrain_until_the_timer_sees_it_end(
    world: World,
) -> None:
    await world.start()
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=20, cooldown_s=3))
    await labeling.publish(await labeling.batch(20))
    await world.probe.wait(ThresholdReachedV1)

    await labeling.publish(await labeling.batch(20))
    await world.wait_reports(2)
    state = (await world.get("/state")).json()
    [first, second] = await world.probe.wait(ThresholdReachedV1, n=2)

    assert state["pending"]["labels"] == 20
    assert state["last_evaluation"]["in_cooldown"]
    assert state["last_evaluation"]["due_reason"] == "count"
    assert first.payload.snapshot_id != second.payload.snapshot_id
    later, earlier = (await world.get("/decisions")).json()["decisions"]
    assert earlier["trigger"] == "labels.saved"
    assert later["trigger"] == "timer"
    elapsed = datetime.fromisoformat(later["decided_at"]) - datetime.fromisoformat(
        earlier["decided_at"]
    )
    assert elapsed.total_seconds() >= 3


# --- adaptive -----------------------------------------------------------------------------------


async def test_adaptive_policy_fires_early_when_labelers_correct_many_prefills(
    world: World,
) -> None:
    await world.start()
    labeling = world.labeling
    adaptive = {"enabled": True, "min_prefilled": 20, "min_count": 10, "sensitivity": 2.0}
    await labeling.publish(labeling.configured(count=100, adaptive=adaptive))
    await labeling.publish(await labeling.batch(30, prefilled=30, corrected=0))
    await world.wait_reports(1)
    assert world.probe.of(ThresholdReachedV1) == []

    await labeling.publish(await labeling.batch(30, prefilled=30, corrected=24))
    [fired] = await world.probe.wait(ThresholdReachedV1)

    assert fired.payload.reason is ThresholdReason.ADAPTIVE
    assert fired.payload.labels_since_last == 60
    assert fired.payload.threshold == 30
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["evaluation"]["correction_rate"] == pytest.approx(0.4)
    assert decision["evaluation"]["threshold"] == 100


# --- quality ------------------------------------------------------------------------------------


async def test_a_quarantined_batch_is_not_counted_and_is_excluded_from_the_next_retrain(
    world: World,
) -> None:
    await world.start()
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=100))
    bad = await labeling.batch(30, classes=["7"], labeler="mallory")
    await labeling.publish(bad)

    [failed] = await world.probe.wait(DataQualityFailedV1)
    state = (await world.get("/state")).json()
    await labeling.publish(await labeling.batch(100))
    [fired] = await world.probe.wait(ThresholdReachedV1)

    assert failed.causation_id == bad.event_id
    assert sorted(failed.payload.quarantined_label_ids) == sorted(bad.payload.label_ids)
    assert any("labeler 'mallory' gave class '7'" in r for r in failed.payload.reasons)
    assert state["pending"]["labels"] == 0
    assert state["quarantined_labels"] == 30
    assert fired.payload.labels_since_last == 100
    assert sorted(fired.payload.excluded_label_ids) == sorted(bad.payload.label_ids)
    reports = (await world.get("/quality-reports")).json()["reports"]
    quarantined = next(r for r in reports if r["quarantined"])
    assert quarantined["report_id"] == str(failed.payload.report_id)
    assert {c["name"]: c["passed"] for c in quarantined["checks"]}["labeler_anomaly"] is False


async def test_s3_unreachable_redelivers_the_batch_until_it_can_be_checked(
    world: World, s3_server: S3Server
) -> None:
    host, port = s3_server.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    world.stack.push_async_callback(proxy.stop)
    platform = world.platform.model_copy(
        update={"s3_endpoint": f"127.0.0.1:{proxy.port}", "delivery_limit": 50}
    )
    [app] = await world.start(platform=platform)
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000))
    batch = await labeling.batch(25)
    await proxy.stop()

    await labeling.publish(batch)

    async def redelivered() -> bool:
        return processed(app) >= 3

    await wait_for(redelivered, timeout=30, message="batch redelivered while S3 is away")
    assert await world.reports() == 0
    await proxy.start()
    await world.wait_reports(1, within=30)
    state = (await world.get("/state")).json()
    assert state["pending"]["labels"] == 25
    dlq = world.runtime.topology.dead_letter_queue(world.queue(LabelsSavedV1)).name
    assert await queue_depth(world.rabbit_url, dlq) == 0


# --- dead letters and the API -------------------------------------------------------------------


async def test_a_malformed_labels_saved_goes_to_the_dead_letter_queue(world: World) -> None:
    await world.start()
    broker = world.labeling.broker
    await broker.publish(
        {"type": "labels.saved", "payload": {"project_id": world.labeling.project}},
        exchange=world.topology.exchange_for(LabelsSavedV1),
        routing_key=LabelsSavedV1.routing_key(),
        message_id="malformed-1",
    )
    dlq = world.runtime.topology.dead_letter_queue(world.queue(LabelsSavedV1)).name

    async def dead_lettered() -> bool:
        return await queue_depth(world.rabbit_url, dlq) >= 1

    await wait_for(dead_lettered, message="malformed event dead-lettered")
    [dead] = await drain(world.rabbit_url, dlq)
    assert dead.message_id == "malformed-1"
    assert (await world.get("/state")).status_code == 404


async def test_unknown_project_answers_404(world: World) -> None:
    await world.start()

    responses = [await world.get(p) for p in ("/state", "/decisions", "/quality-reports")]

    assert [r.status_code for r in responses] == [404, 404, 404]
    assert responses[0].json()["error"]["code"] == "project_not_found"
    transport = httpx.ASGITransport(app=world.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ready = await client.get("/readyz")
    assert ready.json()["checks"] == {"broker": "ok", "database": "ok", "s3": "ok"}
