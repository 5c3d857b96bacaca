"""The workspaces service's app factory: runtime, store, backend, use cases, supervisor, API."""

from __future__ import annotations

from pathlib import Path

import structlog
from fastapi import FastAPI

from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.auth import TokenVerifier
from flywheel_workspaces.adapters.local import LocalBackend
from flywheel_workspaces.adapters.repository import SqlWorkspaceStore
from flywheel_workspaces.api import routers
from flywheel_workspaces.handlers import Supervisor, register
from flywheel_workspaces.policy import Clock
from flywheel_workspaces.ports import WorkspaceBackend
from flywheel_workspaces.service import Workspaces, utcnow
from flywheel_workspaces.settings import SERVICE, WorkspacesSettings

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel workspaces"
VERSION = "0.1.0"
DESCRIPTION = (
    "Isolated GPU development environments: an engineer asks for GPUs (kind, count, full, MIG, "
    "time-sliced or MPS) and gets a container (Kubernetes) or process (local) environment "
    "their IDE connects to. Per-engineer quotas, a first-come-first-served queue per GPU "
    "pool, a TTL and idle shutdown that keep the home volume, and an audit of who held "
    "which GPUs for how long."
)

log = structlog.get_logger(__name__)


def create_backend(settings: WorkspacesSettings) -> WorkspaceBackend:
    """The backend the settings name; nothing connects until it is used."""
    if settings.backend == "kubernetes":
        from flywheel_workspaces.adapters.kubernetes import KubernetesBackend

        return KubernetesBackend(settings.kubernetes)
    return LocalBackend(
        settings.local_root, ide=settings.local_ide, venv_pip=settings.local_venv_pip
    )


def create_app(settings: WorkspacesSettings | None = None, *, clock: Clock = utcnow) -> FastAPI:
    """Build the service; nothing connects and nothing starts until the lifespan starts.

    ``clock`` is where every policy decision reads the time (tests pass a controllable one).
    """
    settings = settings or WorkspacesSettings()
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        outbox=True,
        namespace=settings.namespace,
    )
    backend = create_backend(settings)
    workspaces = Workspaces(
        SqlWorkspaceStore(runtime.database),
        backend,
        backend_name=settings.backend,
        capacity=settings.gpus,
        quota_of=settings.quota_of,
        lifetime=settings.lifetime,
        provision_timeout_s=settings.provision_timeout_s,
        clock=clock,
    )
    register(runtime.broker, runtime.topology)

    # Stop hooks run in reverse: the supervisor stops before the backend's clients close.
    runtime.on_stop.append(backend.close)
    supervisor = Supervisor(workspaces, settings.poll_interval_s)
    runtime.on_start.append(supervisor.start)
    runtime.on_stop.append(supervisor.stop)

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=routers)
    app.state.workspaces = workspaces
    app.state.backend = backend
    if settings.auth is not None:
        verifier = TokenVerifier(settings.auth)
        app.state.token_verifier = verifier
        runtime.on_stop.append(verifier.aclose)
    else:

        async def warn_open() -> None:
            log.warning("API is open: set auth to require bearer tokens")

        runtime.on_start.append(warn_open)
    return app
