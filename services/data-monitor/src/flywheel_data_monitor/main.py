"""The data monitor's app factory: runtime, adapters, use cases, handlers, timer and read API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from flywheel_data_monitor.adapters.drift_store import (
    S3References,
    S3ReportArtifacts,
    SqlDriftStore,
)
from flywheel_data_monitor.adapters.snapshots import S3SnapshotReader
from flywheel_data_monitor.api import drift_router, router
from flywheel_data_monitor.handlers import Ticker, register
from flywheel_data_monitor.service import DataMonitor, DriftMonitor
from flywheel_data_monitor.settings import SERVICE, DataMonitorSettings
from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.auth import TokenVerifier
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.storage import ObjectStorage

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel data monitor"
VERSION = "0.1.0"
DESCRIPTION = (
    "Counts the labels of each project since its last retrain, checks every batch's quality "
    "and emits threshold.reached exactly once when the project's policy says it should retrain."
)


def create_app(settings: DataMonitorSettings | None = None) -> FastAPI:
    """Build the service; nothing connects until the app's lifespan starts."""
    settings = settings or DataMonitorSettings()
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        outbox=True,
        namespace=settings.namespace,
    )
    storage = ObjectStorage.from_settings(settings.platform)
    store = SqlDriftStore(runtime.database, consumer=SERVICE)
    monitor = DataMonitor(
        store,
        S3SnapshotReader(SnapshotStore(storage, bucket=settings.data_bucket)),
        default_policy=settings.default_policy,
    )
    drift = DriftMonitor(
        store,
        S3References(storage, settings.data_bucket, settings.drift.reference_prefix),
        S3ReportArtifacts(storage, settings.data_bucket, settings.drift.reports_prefix),
        monitor,
        settings.drift,
    )
    register(runtime.broker, runtime.topology, monitor, drift)

    for ticker in (
        Ticker(monitor.tick, settings.tick_interval_s, "timer"),
        Ticker(drift.tick, settings.tick_interval_s, "drift"),
    ):
        runtime.on_start.append(ticker.start)
        runtime.on_stop.append(ticker.stop)
    runtime.checks["s3"] = storage.ping

    async def close_storage() -> None:
        storage.close()

    runtime.on_stop.append(close_storage)

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=[router, drift_router])
    if settings.auth is not None:
        verifier = TokenVerifier(settings.auth)
        app.state.token_verifier = verifier
        runtime.on_stop.append(verifier.aclose)
    app.state.monitor = monitor
    app.state.drift = drift
    return app
