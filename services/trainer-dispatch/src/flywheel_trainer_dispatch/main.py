"""The trainer dispatch's app factory: runtime, adapters, use cases, handler, supervisor, API."""

from __future__ import annotations

from pathlib import Path

import structlog
from fastapi import FastAPI

from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.auth import TokenVerifier
from flywheel_trainer_dispatch.adapters.kubernetes import KubernetesBackend
from flywheel_trainer_dispatch.adapters.local import LocalBackend, TrainingOptions, default_threads
from flywheel_trainer_dispatch.adapters.mlflow_results import MlflowResults
from flywheel_trainer_dispatch.adapters.repository import SqlRunStore
from flywheel_trainer_dispatch.api import router
from flywheel_trainer_dispatch.handlers import Supervisor, register
from flywheel_trainer_dispatch.ports import TrainingBackend
from flywheel_trainer_dispatch.scheduler import Scheduler
from flywheel_trainer_dispatch.service import TrainerDispatch
from flywheel_trainer_dispatch.settings import SERVICE, TrainerDispatchSettings

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel trainer dispatch"
VERSION = "0.1.0"
DESCRIPTION = (
    "Turns each threshold.reached into a training run: queued by priority with at most one run "
    "per model line, started on a training backend (local subprocess or torchrun DDP, or a "
    "Kubernetes Job or PyTorchJob queued by Kueue and placed across clusters), watched "
    "across restarts, and reported as model.trained or training.failed."
)

log = structlog.get_logger(__name__)


def create_backend(settings: TrainerDispatchSettings) -> TrainingBackend:
    """The training backend the settings name; nothing connects until it is used."""
    if settings.backend == "kubernetes":
        # Threads follow the pod's CPUs, not this machine's.
        cpus = pod_cpus(settings.kubernetes.cpu)
        return KubernetesBackend(
            settings.kubernetes,
            training_options(settings, default_threads(settings.nproc_per_node, cpus)),
            settings.platform,
            MlflowResults(settings.platform.mlflow_uri),
            timeout_s=settings.timeout_s,
            kill_grace_s=settings.kill_grace_s,
            tail_lines=settings.log_tail_lines,
        )
    options = training_options(settings, default_threads(settings.nproc_per_node))
    return LocalBackend(
        settings.runs_dir,
        options,
        settings.platform,
        kill_grace_s=settings.kill_grace_s,
        tail_lines=settings.log_tail_lines,
    )


def training_options(settings: TrainerDispatchSettings, default_threads: int) -> TrainingOptions:
    """How every run trains, whatever the backend."""
    return TrainingOptions(
        nproc_per_node=settings.nproc_per_node,
        threads_per_process=settings.threads_per_process or default_threads,
        threads_configured=settings.threads_per_process is not None,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        base_alias=settings.base_alias,
        data_bucket=settings.data_bucket,
        entry_point=settings.entry_point,
        hyperparameters=dict(settings.hyperparameters),
        model_lines=dict(settings.model_lines),
    )


def pod_cpus(quantity: str) -> int:
    """Whole CPUs of a Kubernetes CPU quantity (``2``, ``1.5``, ``500m``), at least one."""
    cores = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, int(cores))


def create_app(settings: TrainerDispatchSettings | None = None) -> FastAPI:
    """Build the service; nothing connects and nothing is launched until the lifespan starts."""
    settings = settings or TrainerDispatchSettings()
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        outbox=True,
        namespace=settings.namespace,
    )
    backend = create_backend(settings)
    dispatch = TrainerDispatch(
        SqlRunStore(runtime.database, consumer=SERVICE),
        backend,
        Scheduler(settings.max_concurrent_runs),
        owner=settings.owner(),
        registered_model=settings.registered_model,
        timeout_s=settings.timeout_s,
        lost_after_s=settings.lost_after_s,
    )
    register(runtime.broker, runtime.topology, dispatch)

    if isinstance(backend, KubernetesBackend):
        # Stop hooks run in reverse: the supervisor stops before the clients close.
        runtime.on_stop.append(backend.aclose)
    supervisor = Supervisor(dispatch, settings.poll_interval_s)
    runtime.on_start.append(supervisor.start)
    runtime.on_stop.append(supervisor.stop)

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=[router])
    app.state.dispatch = dispatch
    if settings.auth is not None:
        verifier = TokenVerifier(settings.auth)
        app.state.token_verifier = verifier
        runtime.on_stop.append(verifier.aclose)
    else:

        async def warn_open() -> None:
            log.warning("operator API is open: set auth to require bearer tokens")

        runtime.on_start.append(warn_open)
    return app
