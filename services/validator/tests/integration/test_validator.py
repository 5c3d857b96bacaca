import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from minio import Minio
from minio.deleteobjects import DeleteObject
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_contracts import ModelTrainedV1, ModelValidatedV1
from flywheel_contracts.datasets import (
    ManifestEntry,
    SnapshotSegment,
    Split,
    image_key,
    snapshot_id_for,
    split_for,
)
from flywheel_contracts.events import ValidationVerdict
from flywheel_contracts.topology import queue_name
from flywheel_runtime.app import ServiceRuntime
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.drift_reference import (
    DEFAULT_PREFIX,
    STATISTICS,
    decode_reference,
    reference_key,
)
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_runtime.topology import Topology
from flywheel_testing.mlflow_server import MlflowServer
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.rabbit import delete_names, queue_depth
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for
from flywheel_validator.gates import Gates
from flywheel_validator.main import create_app
from flywheel_validator.settings import SERVICE, ValidatorSettings
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.model import EMBEDDING_SIZE
from flywheel_vision.train import TrainConfig, TrainResult, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 1500
PROJECT = "digits"
# Labels of the poisoned snapshot's TRAIN and VALIDATION images: every class renamed to another.
POISON = {str(d): str((d + 3) % 10) for d in range(10)}
# Two epochs on ~1 200 images (~0.9 accuracy): enough to tell a model from a poisoned one.
GATES = Gates(
    accuracy_tolerance=0.02,
    macro_f1_tolerance=0.02,
    min_accuracy=0.7,
    min_macro_f1=0.7,
    min_class_recall=0.25,
    max_latency_p95_ms=250.0,
    max_model_bytes=10_000_000,
    min_test_images=100,
)


# --- a real snapshot and real trained versions, once per module --------------------------------


@dataclass(frozen=True)
class Data:
    bucket: str
    snapshot_id: str
    poisoned_snapshot_id: str
    test_images: int
    held_out_images: int
    """TEST and VALIDATION: what the drift reference describes."""


@dataclass(frozen=True)
class Trained:
    good: TrainResult
    poisoned: TrainResult


@pytest.fixture(scope="module")
async def data(s3_server: S3Server) -> AsyncIterator[Data]:
    """~1 500 MNIST digits as PNGs, in a clean snapshot and a poisoned one with the same TEST."""
    bucket = f"flywheel-test-{uuid.uuid4().hex[:16]}"
    storage = ObjectStorage(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    await storage.ensure_buckets(bucket)
    images, labels = load_mnist("train", IMAGES)
    pngs: dict[str, bytes] = {}
    clean: list[ManifestEntry] = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        png = to_png(image)
        sha = hashlib.sha256(png).hexdigest()
        pngs[sha] = png
        clean.append(
            ManifestEntry(
                label_id=uuid.UUID(int=index + 1),
                image_sha256=sha,
                image_key=image_key(sha),
                class_name=str(int(label)),
                split=split_for(sha),
            )
        )
    poisoned = [
        e if e.split is Split.TEST else e.model_copy(update={"class_name": POISON[e.class_name]})
        for e in clean
    ]
    gate = asyncio.Semaphore(8)

    async def upload(sha: str, png: bytes) -> None:
        async with gate:
            await storage.put(bucket, image_key(sha), png, content_type="image/png")

    await asyncio.gather(*(upload(sha, png) for sha, png in pngs.items()))
    snapshots = SnapshotStore(storage, bucket=bucket)
    ids = []
    for entries in (clean, poisoned):
        snapshot_id = snapshot_id_for(None, entries, [])
        ids.append(snapshot_id)
        await snapshots.write_segment(
            SnapshotSegment(
                snapshot_id=snapshot_id,
                project_id=PROJECT,
                parent_snapshot_id=None,
                batch_id=uuid.uuid4(),
                created_at=datetime.now(UTC),
                upserts=entries,
            )
        )
    storage.close()
    test_images = sum(e.split is Split.TEST for e in clean)
    held_out = sum(e.split in (Split.TEST, Split.VALIDATION) for e in clean)
    yield Data(bucket, ids[0], ids[1], test_images, held_out)
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True))
    assert not list(client.remove_objects(bucket, doomed))
    client.remove_bucket(bucket)


@pytest.fixture(scope="module")
async def trained(data: Data, s3_server: S3Server, mlflow_server: MlflowServer) -> Trained:
    """A version trained on the clean snapshot and one on the poisoned snapshot, for real."""
    platform = PlatformSettings(
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        mlflow_uri=mlflow_server.tracking_uri,
    )

    def config(snapshot_id: str, name: str) -> TrainConfig:
        return TrainConfig(
            project_id=PROJECT,
            snapshot_id=snapshot_id,
            model_name=f"{name}-{uuid.uuid4().hex[:8]}",
            data_bucket=data.bucket,
            base_alias=None,
            epochs=2,
            batch_size=32,
            lr=3e-3,
            seed=3,
        )

    results = []
    for snapshot_id, name in ((data.snapshot_id, "clean"), (data.poisoned_snapshot_id, "poisoned")):
        # train() is blocking and runs its own event loop for the S3 reads.
        result = await asyncio.to_thread(train, config(snapshot_id, name), platform=platform)
        assert result is not None
        results.append(result)
    return Trained(*results)


# --- the world around the validator -------------------------------------------------------------


@dataclass
class Probe:
    """A queue on the test topology collecting every model.validated."""

    rabbit_url: str
    topology: Topology
    events: list[ModelValidatedV1] = field(default_factory=list)
    _connection: aio_pika.abc.AbstractRobustConnection | None = None
    _queue: aio_pika.abc.AbstractQueue | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.rabbit_url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.topology.events_exchange.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self._queue.bind(exchange, routing_key=ModelValidatedV1.routing_key())

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def collect(self) -> list[ModelValidatedV1]:
        assert self._queue is not None
        while (message := await self._queue.get(no_ack=True, fail=False)) is not None:
            self.events.append(ModelValidatedV1.model_validate(json.loads(message.body)))
        return self.events

    async def wait(self, n: int = 1, within: float = 30) -> list[ModelValidatedV1]:
        async def enough() -> bool:
            return len(await self.collect()) >= n

        await wait_for(enough, timeout=within, message=f"{n} model.validated")
        return self.events


@dataclass
class World:
    rabbit_url: str
    topology: Topology
    platform: PlatformSettings
    mlflow_uri: str
    data: Data
    schema: str
    publisher: RabbitBroker
    probe: Probe
    stack: AsyncExitStack
    apps: list[FastAPI] = field(default_factory=list)

    async def start(self, **platform: Any) -> FastAPI:
        settings = ValidatorSettings(
            platform=self.platform.model_copy(update=platform),
            namespace=self.topology.namespace,
            db_schema=self.schema,
            data_bucket=self.data.bucket,
            default_gates=GATES,
            latency_images=30,
        )
        app = create_app(settings)
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        self.apps.append(app)
        return app

    @property
    def runtime(self) -> ServiceRuntime:
        runtime: ServiceRuntime = self.apps[0].state.runtime
        return runtime

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def register(self, name: str, source: TrainResult) -> str:
        """A new version of ``name`` from the files of an already trained version."""
        client = self.mlflow()
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        version = client.create_model_version(name, source.artifact_uri, run_id=source.run_id)
        return str(version.version)

    def challenger(self, name: str) -> str | None:
        try:
            return str(self.mlflow().get_model_version_by_alias(name, "challenger").version)
        except MlflowException:
            return None

    def event(self, name: str, version: str, snapshot_id: str) -> ModelTrainedV1:
        return ModelTrainedV1.model_validate(
            {
                "payload": {
                    "project_id": PROJECT,
                    "model_line": name,
                    "snapshot_id": snapshot_id,
                    "training_run_id": uuid.uuid4(),
                    "mlflow_run_id": uuid.uuid4().hex,
                    "registered_model": name,
                    "model_version": version,
                    "backend": "local",
                }
            }
        )

    async def publish(self, *events: ModelTrainedV1) -> None:
        for event in events:
            await publish_event(self.publisher, self.topology, event)

    async def scalar(self, sql: str, **params: Any) -> Any:
        assert self.runtime.db is not None
        async with self.runtime.db.transaction() as session:
            return (await session.execute(text(sql), params)).scalar_one()

    async def wait_outbox_empty(self) -> None:
        async def empty() -> bool:
            return await self.scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

        await wait_for(empty, message="outbox published")

    async def get(self, path: str, **params: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.apps[0])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, params=params)

    @property
    def queue(self) -> str:
        return self.topology.namespace + queue_name(SERVICE, ModelTrainedV1.routing_key())


def processed(app: FastAPI) -> float:
    """Deliveries the app's handler finished with, whatever the outcome (Prometheus counter)."""
    registry = app.state.runtime.telemetry.registry
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "faststream_received_processed_messages_total"
    )


def _line(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def world(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    mlflow_tracking_uri: str,
    data: Data,
    topology: Topology,
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
    publisher = create_broker(rabbit_url, app_id="trainer-dispatch")
    await publisher.connect()
    probe = Probe(rabbit_url, topology)
    await probe.start()
    async with AsyncExitStack() as stack:
        built = World(
            rabbit_url=rabbit_url,
            topology=topology,
            platform=platform,
            mlflow_uri=mlflow_tracking_uri,
            data=data,
            schema=f"val_{uuid.uuid4().hex[:10]}",
            publisher=publisher,
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


# --- verdicts -----------------------------------------------------------------------------------


async def test_a_real_trained_version_passes_and_becomes_challenger(
    world: World, trained: Trained
) -> None:
    await world.start()
    name, version = trained.good.model_name, trained.good.version
    event = world.event(name, version, world.data.snapshot_id)

    await world.publish(event)
    [validated] = await world.probe.wait()

    payload = validated.payload
    assert payload.verdict is ValidationVerdict.PASSED, payload.reasons
    assert validated.correlation_id == event.correlation_id
    assert validated.causation_id == event.event_id
    assert (payload.registered_model, payload.model_version) == (name, version)
    assert payload.champion_version is None
    assert payload.candidate_metrics["test_images"] == world.data.test_images
    assert payload.candidate_metrics["accuracy"] >= GATES.min_accuracy
    assert payload.candidate_metrics["parity_max_abs_diff"] < GATES.parity_tolerance
    assert payload.candidate_metrics["model_size_bytes"] == trained.good.metrics["model_size_bytes"]
    assert [r.rsplit(": ", 1)[-1] for r in payload.reasons] == ["pass"] * 6
    assert world.challenger(name) == version
    tags = world.mlflow().get_model_version(name, version).tags
    assert tags["validation.verdict"] == "passed"
    assert float(tags["validation.accuracy"]) == pytest.approx(
        payload.candidate_metrics["accuracy"], abs=1e-5
    )
    assert tags["validation.reasons"].splitlines() == payload.reasons
    assert tags["snapshot_id"] == world.data.snapshot_id  # the trainer's tags are kept

    listed = (await world.get("/v1/validations", model_line=name)).json()["validations"]
    [validation] = listed
    one = (await world.get(f"/v1/validations/{validation['validation_id']}")).json()
    assert one["validated_event_id"] == str(validated.event_id)
    assert one["verdict"] == "passed"
    assert one["gates"]["min_accuracy"] == GATES.min_accuracy
    ready = await world.get("/readyz")
    assert ready.json()["checks"] == {"broker": "ok", "database": "ok", "s3": "ok", "mlflow": "ok"}

    # Its drift reference, for data-monitor: one row per held-out (TEST, VALIDATION) image.
    storage = ObjectStorage.from_settings(world.platform)
    try:
        stored = await storage.get(world.data.bucket, reference_key(DEFAULT_PREFIX, name, version))
    finally:
        storage.close()
    reference = decode_reference(stored)
    assert len(reference.predicted) == world.data.held_out_images
    assert set(reference.predicted) <= {str(d) for d in range(10)}
    assert reference.embeddings is not None
    assert reference.embeddings.shape == (world.data.held_out_images, EMBEDDING_SIZE)
    assert set(reference.statistics) == set(STATISTICS)
    assert set(reference.statistics["width"]) == {28.0}


async def test_a_candidate_trained_on_poisoned_labels_fails_against_the_champion(
    world: World, trained: Trained
) -> None:
    await world.start()
    name = _line("digits-poisoned")
    champion = world.register(name, trained.good)
    world.mlflow().set_registered_model_alias(name, "champion", champion)
    candidate = world.register(name, trained.poisoned)
    event = world.event(name, candidate, world.data.poisoned_snapshot_id)

    await world.publish(event)
    [validated] = await world.probe.wait()

    payload = validated.payload
    assert payload.verdict is ValidationVerdict.FAILED
    assert payload.champion_version == champion
    assert payload.champion_metrics["accuracy"] >= GATES.min_accuracy
    assert payload.candidate_metrics["accuracy"] < 0.3
    failed = {r.split(" ", 1)[0] for r in payload.reasons if r.endswith(": fail")}
    assert failed == {"accuracy", "macro-F1", "per-class"}
    accuracy = next(r for r in payload.reasons if r.startswith("accuracy"))
    assert f"< champion {payload.champion_metrics['accuracy']:.3f} - 0.020: fail" in accuracy
    assert any(r.startswith("per-class recall below floor 0.250: class ") for r in payload.reasons)
    assert any(r.startswith("export parity") and r.endswith("pass") for r in payload.reasons)
    assert world.challenger(name) is None
    tags = world.mlflow().get_model_version(name, candidate).tags
    assert tags["validation.verdict"] == "failed"
    assert tags["validation.champion_version"] == champion
    assert accuracy in tags["validation.reasons"]
    champion_tags = world.mlflow().get_model_version(name, champion).tags
    assert not any(key.startswith("validation.") for key in champion_tags)


# --- delivery -----------------------------------------------------------------------------------


async def test_the_same_event_twice_gives_one_validation_and_one_event(
    world: World, trained: Trained
) -> None:
    app = await world.start()
    name = _line("digits-twice")
    version = world.register(name, trained.good)
    event = world.event(name, version, world.data.snapshot_id)

    await world.publish(event, event)

    async def both_handled() -> bool:
        return processed(app) >= 2 and await queue_depth(world.rabbit_url, world.queue) == 0

    await wait_for(both_handled, timeout=30, message="both copies handled")
    await world.wait_outbox_empty()
    events = await world.probe.collect()
    assert [e.causation_id for e in events] == [event.event_id]
    assert await world.scalar("SELECT count(*) FROM validations") == 1
    assert await world.scalar("SELECT count(*) FROM outbox") == 1
    assert world.challenger(name) == version


async def test_mlflow_unreachable_redelivers_the_event_until_it_is_back(
    world: World, trained: Trained
) -> None:
    host, port = world.mlflow_uri.removeprefix("http://").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    world.stack.push_async_callback(proxy.stop)
    # A high limit: while MLflow is away the event must keep coming back, never dead-letter.
    app = await world.start(mlflow_uri=f"http://127.0.0.1:{proxy.port}", delivery_limit=10_000)
    name = _line("digits-outage")
    version = world.register(name, trained.good)
    event = world.event(name, version, world.data.snapshot_id)
    await proxy.stop()

    await world.publish(event)

    async def redelivered() -> bool:
        return processed(app) >= 3

    await wait_for(redelivered, timeout=30, message="event redelivered while MLflow is away")
    assert await world.scalar("SELECT count(*) FROM validations") == 0
    assert world.challenger(name) is None
    await proxy.start()
    [validated] = await world.probe.wait()

    assert validated.causation_id == event.event_id
    assert validated.payload.verdict is ValidationVerdict.PASSED, validated.payload.reasons
    assert processed(app) >= 3
    assert await world.scalar("SELECT count(*) FROM validations") == 1
    assert world.challenger(name) == version
    dlq = world.runtime.topology.dead_letter_queue(world.queue).name
    assert await queue_depth(world.rabbit_url, dlq) == 0
