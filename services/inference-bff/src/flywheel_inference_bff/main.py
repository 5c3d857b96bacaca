"""The BFF's app factory: runtime, adapters, the predict core, its fronts and background work."""

from __future__ import annotations

import gc
import time
import uuid
from pathlib import Path
from typing import cast

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel_clients.registry import ModelRegistry
from flywheel_inference_bff.adapters.cache import RedisPredictionCache
from flywheel_inference_bff.adapters.images import S3Images, S3Inputs, S3Results
from flywheel_inference_bff.adapters.inference_log import (
    BufferedInferenceLog,
    DisabledInferenceLog,
    InferenceLogPublisher,
)
from flywheel_inference_bff.adapters.repository import SqlJobStore, SqlRouteStore
from flywheel_inference_bff.adapters.triton import TritonInference
from flywheel_inference_bff.api import routers
from flywheel_inference_bff.handlers import register
from flywheel_inference_bff.jobs import BatchJobs, JobSettings
from flywheel_inference_bff.metrics import BffMetrics
from flywheel_inference_bff.service import Limits, Predictor, Routing, ServedVersions
from flywheel_inference_bff.settings import SERVICE, BffSettings
from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.auth import CachingTokenVerifier, TokenVerifier
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.storage import ObjectStorage

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel inference BFF"
VERSION = "0.1.0"
DESCRIPTION = (
    "Serves /predict, /predict/batch (inline or as a batch job writing pseudo labels) and a "
    "Label Studio ML backend over Triton's v2 protocol, splits each model line's traffic "
    "between champion and candidate as rollout says, and logs every prediction as "
    "inference.logged without ever waiting for the broker."
)

log = structlog.get_logger(__name__)


def create_app(settings: BffSettings | None = None) -> FastAPI:
    """Build the service; nothing connects until the app's lifespan starts."""
    settings = settings or BffSettings()
    replica = settings.replica_id or uuid.uuid4().hex[:12]
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        namespace=settings.namespace,
    )
    metrics = BffMetrics.create(runtime.telemetry.registry)
    storage = ObjectStorage.from_settings(settings.platform)
    registry = ModelRegistry.from_settings(settings.platform)
    routing = Routing(
        registry,
        SqlRouteStore(runtime.database),
        registered_models=settings.registered_models,
        project_ids=settings.project_ids,
        champion_alias=settings.champion_alias,
        champion_cache_s=settings.champion_cache_s,
    )
    register(runtime.broker, runtime.topology, routing, replica)

    triton = TritonInference(
        settings.triton_grpc_url
        if settings.triton_protocol == "grpc"
        else settings.platform.triton_url,
        protocol=settings.triton_protocol,
        timeout_s=settings.inference_timeout_s,
    )
    cache = (
        None
        if settings.redis_url is None
        else RedisPredictionCache(
            settings.redis_url.get_secret_value(),
            metrics,
            ttl_s=settings.cache_ttl_s,
            timeout_s=settings.cache_timeout_s,
        )
    )
    inference_log: BufferedInferenceLog | DisabledInferenceLog = (
        BufferedInferenceLog(
            InferenceLogPublisher(runtime.broker, runtime.topology, app_id=SERVICE),
            metrics,
            capacity=settings.log_buffer,
            publishers=settings.log_publishers,
            publish_timeout_s=settings.log_publish_timeout_s,
        )
        if settings.log_enabled
        else DisabledInferenceLog()
    )
    predictor = Predictor(
        routing,
        triton,
        ServedVersions(registry),
        S3Images(storage, settings.data_bucket),
        cache,
        inference_log,
        limits=Limits(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            chunk=settings.inference_chunk,
        ),
        metrics=metrics,
        drift_features=settings.drift_features,
        inputs=S3Inputs(storage, settings.data_bucket) if settings.keep_inputs else None,
    )
    jobs = BatchJobs(
        SqlJobStore(runtime.database),
        predictor,
        SnapshotStore(storage, bucket=settings.data_bucket),
        S3Results(storage),
        JobSettings(
            data_bucket=settings.data_bucket,
            results_bucket=settings.results_bucket,
            results_prefix=settings.results_prefix,
            chunk_size=settings.job_chunk,
            concurrency=settings.job_concurrency,
            lease_s=settings.job_lease_s,
            sweep_s=settings.job_sweep_s,
            retries=settings.job_retries,
            slots=settings.job_slots,
            max_attempts=settings.job_max_attempts,
        ),
        default_model_line=settings.default_model_line,
        replica=replica,
    )
    verifier = CachingTokenVerifier(settings.auth)

    async def start() -> None:
        await routing.restore()
        if isinstance(inference_log, BufferedInferenceLog):
            inference_log.start()
        jobs.start()
        log.info("inference bff started", replica=replica, protocol=settings.triton_protocol)

    async def stop() -> None:
        await jobs.stop()
        if isinstance(inference_log, BufferedInferenceLog):
            await inference_log.stop()
        await predictor.close()
        if cache is not None:
            await cache.close()
        await triton.close()
        await verifier.aclose()
        storage.close()

    runtime.on_start.append(start)
    runtime.on_stop.append(stop)
    runtime.checks["triton"] = triton.ready

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=routers)
    attach(app, settings, predictor, jobs, verifier, metrics)
    app.state.inference_log = inference_log
    app.state.replica = replica
    return app


def create_service_app() -> FastAPI:
    """``create_app`` as ``python -m flywheel_inference_bff`` runs it: once started, the heap
    is frozen.

    The process holds some 300 000 long-lived objects (MLflow, pyarrow, SQLAlchemy, pydantic
    schemas) from start-up on. Every full collection walks all of them while requests wait:
    100+ ms stalls on a busy node, and a measurable share of a request's CPU. ``gc.freeze``
    moves what is alive after start-up out of the collector's sight, so collections only
    look at what requests allocate. In-process tests start many apps and are left alone.
    """
    app = create_app()
    runtime: ServiceRuntime = app.state.runtime
    runtime.on_start.append(_freeze_heap)
    return app


async def _freeze_heap() -> None:
    gc.collect()
    gc.freeze()


def attach(
    app: FastAPI,
    settings: BffSettings,
    predictor: Predictor,
    jobs: BatchJobs,
    verifier: TokenVerifier,
    metrics: BffMetrics,
) -> None:
    """Give the routes what their dependencies look up on ``app.state``, the body limit and
    the request-latency middleware."""
    app.max_body_size = settings.max_request_bytes
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestMetrics, histogram=metrics.requests)
    app.state.settings = settings
    app.state.token_verifier = verifier
    app.state.predictor = predictor
    app.state.jobs = jobs


class RequestMetrics:
    """Observes every HTTP request's latency by route template, method and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self._app = app
        self._histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self._histogram.labels(route, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )


async def _http_error(_: Request, error: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method, body too large) in the platform's
    error shape."""
    refused = cast(StarletteHTTPException, error)
    code = _HTTP_CODES.get(refused.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(refused.detail), "details": {}}},
        status_code=refused.status_code,
        headers=refused.headers,
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
