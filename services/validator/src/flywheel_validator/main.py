"""The validator's app factory: runtime, adapters, use case, handler and read API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from flywheel_clients.registry import ModelRegistry
from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.auth import TokenVerifier
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.triton import TritonControl
from flywheel_validator.adapters.onnx import OnnxEvaluator
from flywheel_validator.adapters.references import S3ReferenceStore
from flywheel_validator.adapters.repository import SqlStore
from flywheel_validator.adapters.splits import S3SplitReader
from flywheel_validator.adapters.triton import TritonBenchmark
from flywheel_validator.api import router
from flywheel_validator.handlers import register
from flywheel_validator.service import Validator
from flywheel_validator.settings import SERVICE, ValidatorSettings

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel validator"
VERSION = "0.1.0"
DESCRIPTION = (
    "Judges every trained model version against the champion on the snapshot's held-out TEST "
    "split, as serving will run it, and emits model.validated once per model.trained; a "
    "version that passes every gate gets the registry alias challenger."
)


def create_app(settings: ValidatorSettings | None = None) -> FastAPI:
    """Build the service; nothing connects until the app's lifespan starts."""
    settings = settings or ValidatorSettings()
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        outbox=True,
        namespace=settings.namespace,
    )
    storage = ObjectStorage.from_settings(settings.platform)
    registry = ModelRegistry.from_settings(settings.platform)
    performance = settings.performance
    control: TritonControl | None = None
    benchmark: TritonBenchmark | None = None
    if performance.enabled and performance.triton_url:
        control = TritonControl(performance.triton_url, timeout=performance.load_timeout_s)
        benchmark = TritonBenchmark(
            control,
            performance.repository_dir,
            performance.serving,
            concurrencies=performance.concurrencies,
            requests_per_level=performance.requests_per_level,
            rounds=performance.rounds,
            load_timeout_s=performance.load_timeout_s,
        )
    validator = Validator(
        SqlStore(runtime.database, consumer=SERVICE),
        registry,
        S3SplitReader(
            SnapshotStore(storage, bucket=settings.data_bucket),
            storage,
            bucket=settings.data_bucket,
            concurrency=settings.fetch_concurrency,
        ),
        OnnxEvaluator(
            latency_images=settings.latency_images,
            parity_images=settings.parity_images,
            threads=settings.eval_threads,
        ),
        default_gates=settings.default_gates,
        project_gates=settings.project_gates,
        champion_alias=settings.champion_alias,
        challenger_alias=settings.challenger_alias,
        performance=performance if performance.enabled else None,
        benchmark=benchmark,
        benchmark_images=performance.images,
        references=(
            S3ReferenceStore(
                storage, bucket=settings.data_bucket, prefix=settings.drift_reference_prefix
            )
            if settings.drift_reference
            else None
        ),
    )
    register(runtime.broker, runtime.topology, validator)
    runtime.checks["s3"] = storage.ping
    runtime.checks["mlflow"] = registry.ping

    async def close_storage() -> None:
        storage.close()

    runtime.on_stop.append(close_storage)
    if control is not None:
        runtime.on_stop.append(control.close)

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=[router])
    if settings.auth is not None:
        verifier = TokenVerifier(settings.auth)
        app.state.token_verifier = verifier
        runtime.on_stop.append(verifier.aclose)
    app.state.validator = validator
    return app
