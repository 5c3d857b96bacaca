import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from pydantic import SecretStr

from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.topology import dead_letter_queue_name, queue_name
from flywheel_inference_bff.logworker.layout import decode
from flywheel_inference_bff.logworker.main import create_app
from flywheel_inference_bff.logworker.reader import read_inference_logs
from flywheel_inference_bff.logworker.settings import SERVICE, LogWorkerSettings
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_runtime.topology import Topology
from flywheel_testing.net import free_port
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.rabbit import delete_names, drain, queue_depth
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 1, 1, 10, tzinfo=UTC)
"""First of the two hours the tests' events are served in."""


def event(model_line: str, served_at: datetime) -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": InferenceLoggedV1.EXAMPLE
            | {"model_line": model_line, "request_id": uuid.uuid4(), "served_at": served_at}
        }
    )


def spread(n: int, lines: list[str]) -> list[InferenceLoggedV1]:
    """``n`` events round-robin over ``lines`` and over two hours."""
    return [
        event(lines[i % len(lines)], HOUR + timedelta(minutes=(i * 7) % 120, seconds=i % 60))
        for i in range(n)
    ]


@dataclass
class Running:
    app: FastAPI
    lifespan: Any

    def metric(self, name: str) -> float:
        registry = self.app.state.runtime.telemetry.registry
        return float(registry.get_sample_value(f"flywheel_logworker_{name}") or 0.0)

    async def stop(self) -> None:
        if self.lifespan is not None:
            lifespan, self.lifespan = self.lifespan, None
            await lifespan.__aexit__(None, None, None)


@dataclass
class World:
    rabbit_url: str
    topology: Topology
    s3: S3Server
    bucket: str
    publisher: RabbitBroker
    reader: ObjectStorage
    running: list[Running] = field(default_factory=list)

    @property
    def queue(self) -> str:
        return self.topology.namespace + queue_name(SERVICE, InferenceLoggedV1.routing_key())

    def platform(self, s3_endpoint: str | None = None) -> PlatformSettings:
        return PlatformSettings(
            rabbit_url=SecretStr(self.rabbit_url),
            s3_endpoint=s3_endpoint or self.s3.endpoint,
            s3_access_key=SecretStr(self.s3.access_key),
            s3_secret_key=SecretStr(self.s3.secret_key),
            delivery_limit=self.topology.delivery_limit,
            log_json=False,
        )

    async def start(self, s3_endpoint: str | None = None, **overrides: Any) -> Running:
        settings = LogWorkerSettings(
            platform=self.platform(s3_endpoint),
            namespace=self.topology.namespace,
            logs_bucket=self.bucket,
            **{"batch_size": 100, "max_wait_s": 0.3, "retry_initial_s": 0.05} | overrides,
        )
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        running = Running(app, lifespan)
        self.running.append(running)
        return running

    async def publish(self, events: list[InferenceLoggedV1]) -> None:
        await asyncio.gather(*(publish_event(self.publisher, self.topology, e) for e in events))

    async def rows(self, lines: list[str]) -> pa.Table:
        tables = [
            await read_inference_logs(
                self.reader,
                self.bucket,
                model_line=line,
                since=HOUR,
                until=HOUR + timedelta(hours=2),
            )
            for line in lines
        ]
        return pa.concat_tables(tables)

    async def wait_rows(self, lines: list[str], n: int, timeout: float = 30) -> pa.Table:  # noqa: ASYNC109
        async def enough() -> pa.Table | None:
            table = await self.rows(lines)
            return table if table.num_rows >= n else None

        table = await wait_for(enough, timeout=timeout, message=f"{n} rows readable")
        assert table.num_rows == n
        return table

    async def stored_event_ids(self) -> list[str]:
        """Event ids of every stored file, without the reader's deduplication."""
        keys = await self.reader.list_keys(self.bucket, "inference/")
        blobs = await asyncio.gather(*(self.reader.get(self.bucket, k) for k in keys))
        return [i for blob in blobs for i in decode(blob).column("event_id").to_pylist()]

    async def depth(self) -> int:
        return await queue_depth(self.rabbit_url, self.queue)

    async def wait_depth(self, n: int) -> None:
        async def reached() -> bool:
            return await self.depth() == n

        await wait_for(reached, timeout=15, message=f"queue depth {n}")


@pytest.fixture
async def world(
    rabbit_url: str, s3_server: S3Server, unique_bucket: str, topology: Topology
) -> AsyncIterator[World]:
    publisher = create_broker(rabbit_url, app_id="inference-bff")
    await publisher.connect()
    reader = ObjectStorage(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, retries=1
    )
    built = World(rabbit_url, topology, s3_server, unique_bucket, publisher, reader)
    try:
        yield built
    finally:
        for running in built.running:
            await running.stop()
        queues = {built.queue, dead_letter_queue_name(built.queue)}
        await delete_names(rabbit_url, sorted(queues), [])
        await publisher.stop()
        reader.close()


def lines() -> list[str]:
    suffix = uuid.uuid4().hex[:8]
    return [f"alpha-{suffix}", f"beta-{suffix}"]


# --- the happy path -----------------------------------------------------------------------------


async def test_every_event_lands_once_in_its_line_and_hour_partition(world: World) -> None:
    running = await world.start(batch_size=100, max_wait_s=0.3)
    models = lines()
    events = spread(500, models)

    await world.publish(events)

    table = await world.wait_rows(models, 500)
    assert sorted(table.column("event_id").to_pylist()) == sorted(str(e.event_id) for e in events)
    stored = await world.stored_event_ids()
    assert len(stored) == len(set(stored)) == 500
    keys = await world.reader.list_keys(world.bucket, "inference/")
    assert {key.rsplit("/", 1)[0] for key in keys} == {
        f"inference/model_line={line}/date=2026-01-01/hour={hour}"
        for line in models
        for hour in ("10", "11")
    }
    await world.wait_depth(0)
    assert running.metric("pending_messages") == 0
    assert running.metric("rows_written_total") == 500
    transport = httpx.ASGITransport(app=running.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"broker": "ok", "s3": "ok", "worker": "ok"}
    assert "flywheel_logworker_rows_written_total 500.0" in metrics.text


async def test_malformed_messages_go_to_the_dead_letter_queue_while_good_ones_are_written(
    world: World,
) -> None:
    running = await world.start(batch_size=10, max_wait_s=0.3)
    models = lines()
    good = spread(20, models)
    exchange = world.topology.inference_exchange
    routing_key = InferenceLoggedV1.routing_key()

    await world.publish(good[:10])
    await world.publisher.publish(b"\x00 not json", exchange=exchange, routing_key=routing_key)
    await world.publisher.publish(
        {"type": "inference.logged", "payload": {"model_line": "x"}},
        exchange=exchange,
        routing_key=routing_key,
    )
    await world.publish(good[10:])

    await world.wait_rows(models, 20)
    dlq = dead_letter_queue_name(world.queue)

    async def dead_lettered() -> bool:
        return await queue_depth(world.rabbit_url, dlq) == 2

    await wait_for(dead_lettered, timeout=15, message="2 messages dead-lettered")
    bodies = sorted(m.body for m in await drain(world.rabbit_url, dlq))
    assert bodies[0] == b"\x00 not json"
    assert b'"model_line":"x"' in bodies[1].replace(b" ", b"")
    assert running.metric("messages_rejected_total") == 2
    await world.wait_depth(0)


# --- S3 going away ------------------------------------------------------------------------------


async def test_an_s3_outage_holds_the_batch_unacknowledged_then_writes_it_exactly_once(
    world: World,
) -> None:
    host, port = world.s3.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    try:
        running = await world.start(
            s3_endpoint=f"127.0.0.1:{proxy.port}",
            batch_size=50,
            prefetch=100,
            max_wait_s=0.2,
            retry_initial_s=0.05,
            retry_max_s=0.3,
        )
        await proxy.stop()
        models = lines()
        events = spread(120, models)

        await world.publish(events)

        async def failing(at_least: int) -> bool:
            return running.metric("write_failures_total") >= at_least

        await wait_for(lambda: failing(2), timeout=30, message="writes failing")
        seen = running.metric("write_failures_total")
        await wait_for(lambda: failing(seen + 2), timeout=30, message="writes still failing")
        # Nothing acknowledged: the prefetched 100 are held, the other 20 still wait in the queue.
        assert running.metric("pending_messages") == 100
        assert await world.depth() == 20
        assert running.metric("rows_written_total") == 0
        assert await world.stored_event_ids() == []

        await proxy.start()

        table = await world.wait_rows(models, 120)
        assert len(set(table.column("event_id").to_pylist())) == 120
        stored = await world.stored_event_ids()
        assert len(stored) == len(set(stored)) == 120
        await world.wait_depth(0)
        assert running.metric("pending_messages") == 0
    finally:
        await proxy.stop()


async def test_a_stop_while_s3_is_down_returns_the_batch_to_the_queue_for_the_next_worker(
    world: World,
) -> None:
    host, port = world.s3.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    try:
        first = await world.start(
            s3_endpoint=f"127.0.0.1:{proxy.port}",
            batch_size=100,
            max_wait_s=0.1,
            stop_timeout_s=0.5,
        )
        await proxy.stop()
        models = lines()
        events = spread(30, models)
        await world.publish(events)

        async def failing() -> bool:
            return (
                first.metric("write_failures_total") >= 1 and first.metric("pending_messages") == 30
            )

        await wait_for(failing, timeout=30, message="first worker failing to write")
        await first.stop()

        await world.wait_depth(30)
        assert await world.stored_event_ids() == []

        await proxy.start()
        await world.start(batch_size=100, max_wait_s=0.1)
        await world.wait_rows(models, 30)
        stored = await world.stored_event_ids()
        assert len(stored) == len(set(stored)) == 30
    finally:
        await proxy.stop()


# --- the real process ---------------------------------------------------------------------------


async def test_sigterm_writes_the_partial_batch_before_the_process_exits(
    world: World, tmp_path: Path
) -> None:
    port = free_port()
    env = os.environ | {
        "FLYWHEEL_RABBIT_URL": world.rabbit_url,
        "FLYWHEEL_S3_ENDPOINT": world.s3.endpoint,
        "FLYWHEEL_S3_ACCESS_KEY": world.s3.access_key,
        "FLYWHEEL_S3_SECRET_KEY": world.s3.secret_key,
        "FLYWHEEL_DELIVERY_LIMIT": str(world.topology.delivery_limit),
        "FLYWHEEL_LOGWORKER_NAMESPACE": world.topology.namespace,
        "FLYWHEEL_LOGWORKER_LOGS_BUCKET": world.bucket,
        "FLYWHEEL_LOGWORKER_HTTP_PORT": str(port),
        # Neither rule fires during the test: only the stop can write the batch.
        "FLYWHEEL_LOGWORKER_BATCH_SIZE": "1000",
        "FLYWHEEL_LOGWORKER_MAX_WAIT_S": "600",
    }
    output = tmp_path / "worker.out"
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flywheel_inference_bff.logworker",
            env=env,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:

            async def ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError(output.read_text())
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=30, message="worker ready")
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            models = lines()
            await world.publish(spread(7, models))

            async def holding() -> bool:
                text = (await client.get("/metrics")).text
                return "flywheel_logworker_pending_messages 7.0" in text

            await wait_for(holding, timeout=15, message="7 messages held")

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=30)

        # uvicorn finishes its shutdown, then re-raises the signal it caught.
        assert code in (0, -signal.SIGTERM), output.read_text()
        assert "Application shutdown complete" in output.read_text()
        assert (await world.rows(models)).num_rows == 7
        await world.wait_depth(0)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
