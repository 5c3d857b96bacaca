"""The world around the monitor for integration tests: real RabbitMQ, PostgreSQL and S3."""

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
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for

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

    async def get_path(self, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

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
