"""The rollout's app factory: runtime, adapters, use cases, handlers, driver and operator API."""

from __future__ import annotations

from pathlib import Path

import structlog
from fastapi import FastAPI

from flywheel_clients.kubernetes import KubeObjects
from flywheel_clients.registry import ModelRegistry
from flywheel_rollout.adapters.bus import BrokerBus
from flywheel_rollout.adapters.kserve import KServeServing, register_steps
from flywheel_rollout.adapters.kserve_repository import S3VersionRepositories
from flywheel_rollout.adapters.repository import SqlStore
from flywheel_rollout.adapters.triton import TritonServing
from flywheel_rollout.api import router
from flywheel_rollout.handlers import Driver, register
from flywheel_rollout.ports import Serving
from flywheel_rollout.service import Rollout
from flywheel_rollout.settings import SERVICE, RolloutSettings
from flywheel_runtime.app import Hook, ServiceRuntime, fastapi_app
from flywheel_runtime.auth import TokenVerifier
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.triton import TritonControl

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel rollout"
VERSION = "0.1.0"
DESCRIPTION = (
    "Runs a canary for every validated model version, one per model line at a time: the "
    "candidate is loaded beside the champion, gets a growing share of the traffic "
    "(rollout.step) while each interval's errors, latency, corrections and agreement are "
    "compared with the champion's, and is promoted (alias champion) or rolled back "
    "(canary.verdict). Operators promote, roll back, pause, resume and freeze lines over an "
    "authenticated API; every step lands on the line's audit timeline."
)

log = structlog.get_logger(__name__)


def create_app(settings: RolloutSettings | None = None) -> FastAPI:
    """Build the service; nothing connects and no canary moves until the lifespan starts."""
    settings = settings or RolloutSettings()
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        outbox=True,
        namespace=settings.namespace,
    )
    registry = ModelRegistry.from_settings(settings.platform)
    serving: Serving
    if settings.backend == "kserve":
        repositories = None
        if settings.kserve.publish_repositories:
            storage = ObjectStorage.from_settings(settings.platform)
            runtime.on_stop.append(_closer(storage))
            repositories = S3VersionRepositories(registry, storage, settings.kserve.serving)
        kserve = KServeServing(
            KubeObjects(settings.kserve.connection),
            registry,
            settings.kserve,
            champion_alias=settings.champion_alias,
            challenger_alias=settings.challenger_alias,
            repositories=repositories,
        )
        # KServe splits the traffic: the rollout applies its own rollout.step events to it.
        register_steps(runtime.broker, runtime.topology, kserve)
        runtime.on_stop.append(kserve.close)
        serving = kserve
    else:
        control = TritonControl(settings.platform.triton_url, timeout=settings.triton_timeout_s)
        runtime.on_stop.append(control.close)
        serving = TritonServing(registry, control, settings.repository_dir, settings.serving)
    rollout = Rollout(
        SqlStore(runtime.database, consumer=SERVICE),
        registry,
        serving,
        BrokerBus(runtime.broker, runtime.topology),
        default_policy=settings.default_policy,
        project_policies=settings.project_policies,
        champion_alias=settings.champion_alias,
        challenger_alias=settings.challenger_alias,
        drain_s=settings.drain_s,
        recent_per_version=settings.recent_per_version,
        outage_error_codes=settings.outage_error_codes,
        log_claims_s=settings.log_claims_s,
        live_cache_s=settings.tick_s,
    )
    register(runtime.broker, runtime.topology, rollout, log_prefetch=settings.log_prefetch)
    # MLflow and Triton stay out of readiness on purpose: a rollback needs neither, and an
    # operator must reach the API exactly when they are in trouble.
    # Stop hooks run last-added first: the driver stops before the serving client closes.
    driver = Driver(rollout, settings.tick_s, settings.republish_s)
    runtime.on_start.append(driver.start)
    runtime.on_stop.append(driver.stop)

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=[router])
    app.state.rollout = rollout
    if settings.auth is not None:
        verifier = TokenVerifier(settings.auth)
        app.state.token_verifier = verifier
        runtime.on_stop.append(verifier.aclose)
    else:

        async def warn_open() -> None:
            log.warning("operator API is open: set auth to require bearer tokens")

        runtime.on_start.append(warn_open)
    return app


def _closer(storage: ObjectStorage) -> Hook:
    """A stop hook closing ``storage``'s connection pool."""

    async def close() -> None:
        storage.close()

    return close
