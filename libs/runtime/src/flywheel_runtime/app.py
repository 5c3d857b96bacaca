"""The app factory pieces every service shares.

A service's ``create_app(settings)`` builds a ``ServiceRuntime`` (logging → telemetry → broker
→ database → outbox relay), registers its handlers and routes on it, and turns it into an ASGI
app: ``asgi_app`` for broker-only services, ``fastapi_app`` for services that serve HTTP. Both
expose ``/healthz``, ``/readyz`` (broker and database ping) and ``/metrics``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import make_asgi_app

from flywheel_runtime.db import Database
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_runtime.http import (
    ReadinessCheck,
    ServiceAPI,
    install_error_handlers,
    ops_router,
    run_readiness,
)
from flywheel_runtime.logs import configure_logging
from flywheel_runtime.messaging import create_broker, start_broker
from flywheel_runtime.migrations import migrate
from flywheel_runtime.outbox import BrokerOutboxPublisher, OutboxRelay
from flywheel_runtime.settings import PlatformSettings, ServiceSettings
from flywheel_runtime.telemetry import Telemetry, setup_telemetry
from flywheel_runtime.topology import Topology

Hook = Callable[[], Awaitable[None]]


def serve(factory: str, settings: ServiceSettings) -> None:
    """Run ``module:create_app`` under uvicorn, with ``http_workers`` processes on one port.

    The factory is imported by path so each worker process builds its own app (and its own
    broker and engine) from the environment.
    """
    uvicorn.run(
        factory,
        factory=True,
        host=settings.http_host,
        port=settings.http_port,
        workers=settings.http_workers,
        # The runtime routes uvicorn's loggers through structlog.
        log_config=None,
        access_log=False,
    )


@dataclass
class ServiceRuntime:
    """The connections and background work of one running service."""

    name: str
    platform: PlatformSettings
    topology: Topology
    telemetry: Telemetry
    broker: RabbitBroker
    db: Database | None = None
    relay: OutboxRelay | None = None
    migrations: Path | None = None
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    on_start: list[Hook] = field(default_factory=list)
    on_stop: list[Hook] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        name: str,
        platform: PlatformSettings,
        *,
        schema: str | None = None,
        migrations: Path | None = None,
        outbox: bool = False,
        namespace: str = "",
        span_exporter: SpanExporter | None = None,
        configure_logs: bool = True,
    ) -> ServiceRuntime:
        """Wire a service: logs, telemetry, broker, and the database when it owns a schema."""
        if configure_logs:
            configure_logging(name, level=platform.log_level, json=platform.log_json)
        telemetry = setup_telemetry(
            name,
            otel_endpoint=platform.otel_endpoint,
            environment=platform.environment,
            span_exporter=span_exporter,
            set_global=configure_logs,
        )
        topology = Topology(namespace=namespace, delivery_limit=platform.delivery_limit)
        broker = create_broker(
            platform.rabbit_url.get_secret_value(),
            app_id=name,
            tracer_provider=telemetry.tracer_provider,
            metrics_registry=telemetry.registry,
            retry_delay_s=platform.retry_delay_s,
            retry_delay_max_s=platform.retry_delay_max_s,
            max_message_bytes=platform.max_message_bytes,
            delivery_limit=platform.delivery_limit,
        )
        runtime = cls(name, platform, topology, telemetry, broker, migrations=migrations)
        runtime.checks["broker"] = runtime._ping_broker
        if schema is not None:
            runtime.db = Database(platform.database_url.get_secret_value(), schema)
            runtime.checks["database"] = runtime.db.ping
            if outbox:
                runtime.relay = OutboxRelay(runtime.db, BrokerOutboxPublisher(broker, topology))
        return runtime

    @property
    def database(self) -> Database:
        """The service's database; only services created with a ``schema`` have one."""
        if self.db is None:
            raise RuntimeError(f"{self.name} was created without a database schema")
        return self.db

    async def _ping_broker(self) -> None:
        if not await self.broker.ping(timeout=1.0):
            raise DependencyUnavailableError("broker unavailable")

    async def prepare(self) -> None:
        """Migrate the schema, connect and declare the topology (before consuming)."""
        if self.db is not None:
            await migrate(self.db.url, self.db.schema, self.migrations)
        await self.broker.connect()
        await self.topology.declare(self.broker)

    async def start(self) -> None:
        await self.prepare()
        await start_broker(self.broker, self.topology)
        await self.started()

    async def started(self) -> None:
        if self.relay is not None:
            self.relay.start()
        for hook in self.on_start:
            await hook()

    async def stop(self) -> None:
        for hook in reversed(self.on_stop):
            await hook()
        if self.relay is not None:
            await self.relay.stop()
        await self.broker.stop()
        if self.db is not None:
            await self.db.dispose()
        self.telemetry.shutdown()


def fastapi_app(
    runtime: ServiceRuntime,
    *,
    title: str,
    version: str = "0.1.0",
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """A FastAPI app whose lifespan runs the runtime (for services with an HTTP API); its
    OpenAPI document declares each operation's error responses (``ServiceAPI``)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = ServiceAPI(
        title=title,
        version=version,
        lifespan=lifespan,
        # FastAPI's own request spans would otherwise go to the global provider, which is
        # another service's when several share a process (tests, the local demo).
        telemetry={
            "tracer_provider": runtime.telemetry.tracer_provider,
            "meter_provider": runtime.telemetry.meter_provider,
        },
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(ops_router(runtime.checks, runtime.telemetry.registry))
    for router in routers:
        app.include_router(router)
    return app


def asgi_app(runtime: ServiceRuntime) -> AsgiFastStream:
    """An AsgiFastStream app (for broker-only services) with the same operations routes."""

    @get
    async def healthz(_: object) -> AsgiResponse:
        return AsgiResponse(b'{"status":"ok"}', 200, {"content-type": "application/json"})

    @get
    async def readyz(_: object) -> AsgiResponse:
        ready, report = await run_readiness(runtime.checks)
        body = {"status": "ready" if ready else "not ready", "checks": report}
        return AsgiResponse(
            json.dumps(body).encode(), 200 if ready else 503, {"content-type": "application/json"}
        )

    return AsgiFastStream(
        runtime.broker,
        asgi_routes=[
            ("/healthz", healthz),
            ("/readyz", readyz),
            ("/metrics", make_asgi_app(runtime.telemetry.registry)),
        ],
        on_startup=[runtime.prepare],
        after_startup=[runtime.started],
        on_shutdown=[runtime.stop],
        asyncapi_path="/docs/asyncapi",
    )
