"""Every consuming service, built by its own create_app and running in process on the real
servers, under one test namespace; and a way to put any message straight into one queue.

Only the lifespan matters here (no HTTP calls): the services declare their queues and
dead-letter queues and consume. MLflow and Triton are not started (their URLs lead nowhere): a
poison event never gets that far, and a good one for the validator fails fast without them.
The inference BFF runs as one replica: its routing queues are its own, and dead-letter into the
subscription's shared ``<queue>.dlq`` (``dead_letter_queue``, ``subscription``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from flywheel_contracts.topology import DLQ_SUFFIX
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_inference_bff.logworker.main import create_app as create_log_worker
from flywheel_inference_bff.logworker.settings import LogWorkerSettings
from flywheel_inference_bff.main import create_app as create_bff
from flywheel_inference_bff.settings import BffSettings
from flywheel_rollout.main import create_app as create_rollout
from flywheel_rollout.settings import RolloutSettings
from flywheel_runtime.app import ServiceRuntime
from flywheel_runtime.auth import AuthSettings, generate_dev_key
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_trainer_dispatch.main import create_app as create_trainer_dispatch
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings
from flywheel_validator.main import create_app as create_validator
from flywheel_validator.settings import ValidatorSettings

UNREACHABLE = "http://127.0.0.1:9"
"""MLflow and Triton: nothing here should need them."""


MAX_MESSAGE_BYTES = 64 * 1024
"""The services' event size limit here: small, so an oversized poison stays cheap to send."""


@dataclass
class Services:
    """The running services of one test and the queues they consume from."""

    rabbit_url: str
    topology: Topology
    platform: PlatformSettings
    bucket: str
    runtimes: dict[str, ServiceRuntime] = field(default_factory=dict)

    @property
    def queues(self) -> dict[str, str]:
        """Every subscription queue with a dead-letter queue, and the service that owns it,
        as the services' own topologies declared them."""
        return {
            name: service
            for service, runtime in self.runtimes.items()
            for name in runtime.topology.queue_names
            if not name.endswith(DLQ_SUFFIX)
        }

    def dead_letter_queue(self, queue: str) -> str:
        """``queue``'s dead-letter queue, as its service's topology declared it."""
        return self.runtimes[self.queues[queue]].topology.dead_letter_queue(queue).name

    def subscription(self, queue: str) -> str:
        """The subscription ``queue`` serves, as ``flywheel status`` names it: the queue
        itself, or for a replica's own queue the name its shared dead-letter queue is of."""
        return self.dead_letter_queue(queue).removesuffix(DLQ_SUFFIX)

    async def put(self, queue: str, body: bytes, **properties: Any) -> None:
        """Put one message into ``queue`` only (default exchange), confirmed by the broker."""
        connection = await aio_pika.connect(self.rabbit_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties
                ),
                routing_key=queue,
                mandatory=True,
            )


@pytest.fixture
async def services(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    topology: Topology,
    unique_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Services]:
    # MLflow's client retries an unreachable server for minutes; the validator must fail fast.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        mlflow_uri=UNREACHABLE,
        triton_url=UNREACHABLE,
        delivery_limit=topology.delivery_limit,
        max_message_bytes=MAX_MESSAGE_BYTES,
        log_json=False,
    )
    suffix = uuid.uuid4().hex[:8]
    ns = topology.namespace

    def schema(service: str) -> str:
        return f"{service.replace('-', '_')}_{suffix}"

    apps: dict[str, FastAPI] = {
        "data-monitor": create_data_monitor(
            DataMonitorSettings(
                platform=platform,
                namespace=ns,
                db_schema=schema("data-monitor"),
                data_bucket=unique_bucket,
                tick_interval_s=5.0,
            )
        ),
        "trainer-dispatch": create_trainer_dispatch(
            TrainerDispatchSettings(
                platform=platform,
                namespace=ns,
                db_schema=schema("trainer-dispatch"),
                data_bucket=unique_bucket,
                runs_dir=tmp_path / "runs",
                poll_interval_s=1.0,
            )
        ),
        "validator": create_validator(
            ValidatorSettings(
                platform=platform,
                namespace=ns,
                db_schema=schema("validator"),
                data_bucket=unique_bucket,
            )
        ),
        "rollout": create_rollout(
            RolloutSettings(
                platform=platform,
                namespace=ns,
                db_schema=schema("rollout"),
                repository_dir=tmp_path / "repository",
                tick_s=1.0,
                republish_s=3600,
            )
        ),
        "inference-bff": create_bff(
            BffSettings(
                platform=platform,
                namespace=ns,
                db_schema=schema("inference-bff"),
                data_bucket=unique_bucket,
                results_bucket=unique_bucket,
                replica_id="faults-1",
                auth=AuthSettings(dev_signing_key=SecretStr(generate_dev_key())),
            )
        ),
        "log-worker": create_log_worker(
            LogWorkerSettings(
                platform=platform,
                namespace=ns,
                logs_bucket=unique_bucket,
                batch_size=1,
                max_wait_s=0.2,
            )
        ),
    }
    running = Services(rabbit_url, topology, platform, unique_bucket)
    async with AsyncExitStack() as stack:
        for name, app in apps.items():
            await stack.enter_async_context(app.router.lifespan_context(app))
            running.runtimes[name] = app.state.runtime
        yield running
    names = [q for runtime in running.runtimes.values() for q in runtime.topology.queue_names]
    await delete_names(rabbit_url, sorted(set(names)), [])
