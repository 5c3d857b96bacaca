import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from minio import Minio
from minio.deleteobjects import DeleteObject
from mlflow import MlflowClient
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_contracts import Event, ModelTrainedV1, ThresholdReachedV1, TrainingFailedV1
from flywheel_contracts.datasets import (
    ManifestEntry,
    Split,
)
from flywheel_runtime.app import ServiceRuntime
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_runtime.topology import Topology
from flywheel_testing.datasets import write_mnist_snapshot
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for
from flywheel_trainer_dispatch.adapters.local import run_processes
from flywheel_trainer_dispatch.main import create_app
from flywheel_trainer_dispatch.outcomes import LOST_WHILE_DOWN
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 1000
PROJECT = "digits"
EXCLUDED = 40
"""TRAIN labels of the snapshot that a trigger marks as quarantined."""
TRAINING_S = 120
"""Deadline for a training run (imports, S3, an epoch, ONNX export, MLflow) on a busy CPU."""


# --- an MNIST snapshot in S3, as labeling leaves it ---------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    bucket: str
    snapshot_id: str
    entries: list[ManifestEntry]

    def label_ids(self, split: Split, n: int) -> list[uuid.UUID]:
        return [e.label_id for e in self.entries if e.split is split][:n]

    @property
    def trainable(self) -> int:
        return sum(e.split is not Split.TEST for e in self.entries)


@pytest.fixture(scope="module")
async def snapshot(s3_server: S3Server) -> AsyncIterator[Snapshot]:
    bucket = f"flywheel-test-{uuid.uuid4().hex[:16]}"
    storage = ObjectStorage(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    await storage.ensure_buckets(bucket)
    written = await write_mnist_snapshot(storage, bucket, project_id=PROJECT, count=IMAGES)
    storage.close()
    yield Snapshot(bucket, written.snapshot_id, written.entries)
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True))
    assert not list(client.remove_objects(bucket, doomed))
    client.remove_bucket(bucket)


# --- the world around the dispatcher ------------------------------------------------------------


@dataclass
class Probe:
    """A queue on the test topology collecting what the dispatcher emits."""

    rabbit_url: str
    topology: Topology
    name: str = field(default_factory=lambda: f"probe-{uuid.uuid4().hex[:8]}")
    events: list[Event[Any]] = field(default_factory=list)
    _connection: aio_pika.abc.AbstractRobustConnection | None = None
    _queue: aio_pika.abc.AbstractQueue | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.rabbit_url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.topology.events_exchange.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._queue = await channel.declare_queue(self.topology.namespace + self.name)
        for event_type in (ModelTrainedV1, TrainingFailedV1):
            await self._queue.bind(exchange, routing_key=event_type.routing_key())

    async def stop(self) -> None:
        if self._queue is not None:
            await self._queue.delete(if_unused=False, if_empty=False)
        if self._connection is not None:
            await self._connection.close()

    async def collect(self) -> list[Event[Any]]:
        assert self._queue is not None
        while (message := await self._queue.get(no_ack=True, fail=False)) is not None:
            body = json.loads(message.body)
            kind = ModelTrainedV1 if body["type"] == ModelTrainedV1.TYPE else TrainingFailedV1
            self.events.append(kind.model_validate(body))
        return self.events

    def of(self, event_type: type[Event[Any]], run_id: uuid.UUID | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, event_type) and run_id in (None, e.payload.training_run_id)
        ]

    async def wait(
        self, event_type: type[Event[Any]], run_id: uuid.UUID, within: float = TRAINING_S
    ) -> Any:
        async def arrived() -> bool:
            await self.collect()
            return bool(self.of(event_type, run_id))

        await wait_for(arrived, timeout=within, interval=0.2, message=f"{event_type.TYPE}")
        [event] = self.of(event_type, run_id)
        return event


@dataclass
class World:
    rabbit_url: str
    topology: Topology
    platform: PlatformSettings
    snapshot: Snapshot
    runs_dir: Path
    mlflow: MlflowClient
    publisher: Any
    probe: Probe
    schema: str = field(default_factory=lambda: f"td_{uuid.uuid4().hex[:10]}")
    instance_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    stacks: dict[int, AsyncExitStack] = field(default_factory=dict)
    apps: list[FastAPI] = field(default_factory=list)

    def settings(self, **overrides: Any) -> TrainerDispatchSettings:
        values: dict[str, Any] = {
            "platform": self.platform,
            "namespace": self.topology.namespace,
            "db_schema": self.schema,
            "data_bucket": self.snapshot.bucket,
            "runs_dir": self.runs_dir,
            "instance_id": self.instance_id,
            "epochs": 1,
            "poll_interval_s": 0.2,
            "kill_grace_s": 1.0,
            "timeout_s": 300,
        }
        return TrainerDispatchSettings(**(values | overrides))

    async def start(self, **overrides: Any) -> FastAPI:
        app = create_app(self.settings(**overrides))
        stack = AsyncExitStack()
        await stack.enter_async_context(app.router.lifespan_context(app))
        self.stacks[id(app)] = stack
        self.apps.append(app)
        return app

    async def stop(self, app: FastAPI) -> None:
        await self.stacks.pop(id(app)).aclose()

    async def stop_all(self) -> None:
        for app in list(self.apps):
            if id(app) in self.stacks:
                await self.stop(app)

    @property
    def app(self) -> FastAPI:
        return next(app for app in reversed(self.apps) if id(app) in self.stacks)

    def trigger(self, line: str, **payload: Any) -> ThresholdReachedV1:
        return ThresholdReachedV1.model_validate(
            {
                "payload": {
                    "project_id": PROJECT,
                    "model_line": line,
                    "snapshot_id": self.snapshot.snapshot_id,
                    "reason": "count",
                    "decision_id": uuid.uuid4(),
                    "labels_since_last": IMAGES,
                    "threshold": IMAGES,
                }
                | payload
            }
        )

    async def publish(self, *events: ThresholdReachedV1) -> None:
        for event in events:
            await publish_event(self.publisher, self.topology, event)

    async def get(self, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    async def run(self, run_id: uuid.UUID) -> dict[str, Any]:
        response = await self.get(f"/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def run_of(self, event: ThresholdReachedV1) -> dict[str, Any]:
        async def recorded() -> list[dict[str, Any]]:
            runs = (await self.get("/v1/runs")).json()["runs"]
            return [r for r in runs if r["trigger_event_id"] == str(event.event_id)]

        [run] = await wait_for(recorded, message="run recorded")
        return run

    async def wait_state(
        self, run_id: uuid.UUID, state: str, *, log_shows: str | None = None
    ) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            run = await self.run(run_id)
            if run["state"] != state:
                return None
            if log_shows is not None:
                log = (await self.get(f"/v1/runs/{run_id}/log")).text
                if log_shows not in log:
                    return None
            return run

        return await wait_for(
            reached, timeout=TRAINING_S, interval=0.1, message=f"run {state} ({log_shows})"
        )

    async def pid(self, run_id: uuid.UUID) -> int:
        runtime: ServiceRuntime = self.app.state.runtime
        assert runtime.db is not None
        async with runtime.db.transaction() as session:
            handle = (
                await session.execute(
                    text("SELECT handle FROM training_runs WHERE run_id = :r"), {"r": run_id}
                )
            ).scalar_one()
        return int(handle["details"]["pid"])

    def mlflow_runs(self, model: str, run_id: uuid.UUID) -> list[Any]:
        experiment = self.mlflow.get_experiment_by_name(model)
        assert experiment is not None
        return list(
            self.mlflow.search_runs(
                [experiment.experiment_id], filter_string=f"tags.training_run_id = '{run_id}'"
            )
        )


@pytest.fixture
async def world(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    mlflow_tracking_uri: str,
    topology: Topology,
    snapshot: Snapshot,
    tmp_path: Path,
) -> AsyncIterator[World]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        mlflow_uri=mlflow_tracking_uri,
        delivery_limit=topology.delivery_limit,
    )
    publisher = create_broker(rabbit_url, app_id="data-monitor")
    await publisher.connect()
    probe = Probe(rabbit_url, topology)
    await probe.start()
    built = World(
        rabbit_url=rabbit_url,
        topology=topology,
        platform=platform,
        snapshot=snapshot,
        runs_dir=tmp_path / "runs",
        mlflow=MlflowClient(mlflow_tracking_uri),
        publisher=publisher,
        probe=probe,
    )
    try:
        yield built
    finally:
        await built.stop_all()
        # No training may outlive its test, whatever the test left behind.
        if built.runs_dir.exists():
            for run in built.runs_dir.iterdir():
                for process in run_processes(run.name):
                    os.kill(process.pid, signal.SIGKILL)
        queues = {q for app in built.apps for q in app.state.runtime.topology.queue_names}
        await delete_names(rabbit_url, sorted(queues), [])
        await probe.stop()
        await publisher.stop()


def _line() -> str:
    return f"digits-{uuid.uuid4().hex[:8]}"


# --- tests --------------------------------------------------------------------------------------


async def test_threshold_reached_trains_under_torchrun_and_a_trigger_for_a_busy_line_waits(
    world: World,
) -> None:
    await world.start(nproc_per_node=2, threads_per_process=1)
    line = _line()
    excluded = world.snapshot.label_ids(Split.TRAIN, EXCLUDED)
    first = world.trigger(line, excluded_label_ids=excluded)
    second = world.trigger(line, reason="drift")

    await world.publish(first, first)
    first_run = uuid.UUID((await world.run_of(first))["run_id"])
    await world.wait_state(first_run, "running")
    await world.publish(second)
    second_run = uuid.UUID((await world.run_of(second))["run_id"])
    waiting = await world.run(second_run)
    trained = await world.probe.wait(ModelTrainedV1, first_run)
    trained_next = await world.probe.wait(ModelTrainedV1, second_run)

    assert waiting["state"] == "queued"
    assert waiting["priority"] == "drift"
    runs = (await world.get(f"/v1/runs?model_line={line}")).json()["runs"]
    assert sorted(r["run_id"] for r in runs) == sorted([str(first_run), str(second_run)])
    done, done_next = await world.run(first_run), await world.run(second_run)
    assert done["state"] == done_next["state"] == "succeeded"
    assert done_next["started_at"] >= done["finished_at"]
    assert "--nproc_per_node=2" in done["command"]
    assert "torch.distributed.run" in done["command"]
    assert done["excluded_label_count"] == EXCLUDED
    assert done["log_tail"]
    log = (await world.get(f"/v1/runs/{first_run}/log")).text
    assert '"rank": 1' in log
    assert "epoch done" in log

    assert trained.correlation_id == first.correlation_id
    assert trained.causation_id == first.event_id
    assert (trained.payload.registered_model, trained.payload.model_version) == (line, "1")
    assert trained.payload.backend == "local"
    assert trained.payload.base_model_version is None
    assert trained.payload.snapshot_id == world.snapshot.snapshot_id
    assert trained.payload.metrics["val_accuracy"] > 0.3
    assert "train_loss" in trained.payload.metrics
    assert trained_next.correlation_id == second.correlation_id
    assert trained_next.payload.model_version == "2"
    assert world.probe.of(TrainingFailedV1) == []

    # One MLflow run and one version per training run, though two ranks ran each.
    [mlflow_run] = world.mlflow_runs(line, first_run)
    assert mlflow_run.info.run_id == trained.payload.mlflow_run_id
    assert mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["world_size"] == "2"
    assert params["excluded_labels"] == str(EXCLUDED)
    assert int(params["train_images"]) + int(params["validation_images"]) == (
        world.snapshot.trainable - EXCLUDED
    )
    assert len(world.mlflow_runs(line, second_run)) == 1
    versions = world.mlflow.search_model_versions(f"name = '{line}'")
    assert sorted((v.version, v.tags["training_run_id"]) for v in versions) == [
        ("1", str(first_run)),
        ("2", str(second_run)),
    ]


async def test_a_killed_run_fails_and_frees_the_line_and_a_restart_reattaches_the_next(
    world: World,
) -> None:
    first_app = await world.start(epochs=2)
    line = _line()
    first, second = world.trigger(line), world.trigger(line)
    await world.publish(first)
    first_run = uuid.UUID((await world.run_of(first))["run_id"])
    await world.wait_state(first_run, "running", log_shows="snapshot loaded")
    await world.publish(second)
    second_run = uuid.UUID((await world.run_of(second))["run_id"])
    assert (await world.run(second_run))["state"] == "queued"

    os.killpg(await world.pid(first_run), signal.SIGKILL)
    failed = await world.probe.wait(TrainingFailedV1, first_run, within=30)
    running = await world.wait_state(second_run, "running")
    pid = await world.pid(second_run)
    await world.stop(first_app)
    restarted_at = datetime.now(UTC)
    await world.start(epochs=2)

    async def watched_again() -> bool:
        run = await world.run(second_run)
        return (
            run["state"] == "running" and datetime.fromisoformat(run["heartbeat_at"]) > restarted_at
        )

    await wait_for(watched_again, timeout=30, message="run re-attached by the new instance")
    trained = await world.probe.wait(ModelTrainedV1, second_run)

    assert failed.payload.reason == "training was killed by SIGKILL"
    assert failed.payload.retryable
    assert failed.correlation_id == first.correlation_id
    killed = await world.run(first_run)
    assert killed["state"] == "failed"
    assert killed["exit_code"] == -signal.SIGKILL
    assert killed["failure_reason"] == failed.payload.reason
    assert "snapshot loaded" in killed["log_tail"]
    assert running["started_at"] >= killed["finished_at"]
    assert await world.pid(second_run) == pid  # watched again, not started again
    assert trained.payload.model_version == "1"
    assert trained.correlation_id == second.correlation_id
    assert len(world.mlflow_runs(line, second_run)) == 1
    assert [v.version for v in world.mlflow.search_model_versions(f"name = '{line}'")] == ["1"]


async def test_timeouts_and_runs_lost_while_down_fail_and_free_their_slot(world: World) -> None:
    app = await world.start(timeout_s=2)
    slow, lost, after = world.trigger(_line()), world.trigger(_line()), world.trigger(_line())

    await world.publish(slow)
    slow_run = uuid.UUID((await world.run_of(slow))["run_id"])
    timed_out = await world.probe.wait(TrainingFailedV1, slow_run, within=30)
    await world.stop(app)
    app = await world.start()
    await world.publish(lost)
    lost_run = uuid.UUID((await world.run_of(lost))["run_id"])
    await world.wait_state(lost_run, "running")
    pid = await world.pid(lost_run)
    await world.stop(app)
    os.killpg(pid, signal.SIGKILL)
    await world.start()
    await world.publish(after)
    after_run = uuid.UUID((await world.run_of(after))["run_id"])
    gone = await world.probe.wait(TrainingFailedV1, lost_run, within=30)
    await world.wait_state(after_run, "running")

    assert timed_out.payload.reason == "timed out after 2s; its processes were killed"
    assert not timed_out.payload.retryable
    assert (await world.run(slow_run))["state"] == "failed"
    assert gone.payload.reason.startswith(LOST_WHILE_DOWN)
    assert gone.payload.retryable
    assert gone.correlation_id == lost.correlation_id
    assert (await world.run(lost_run))["state"] == "failed"
    for run_id in (slow_run, lost_run):
        assert run_processes(str(run_id)) == []
