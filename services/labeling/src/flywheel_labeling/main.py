"""The labeling app factory: runtime, adapters, use cases, the handler and the HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel_contracts import LabelsSavedV1, ProjectConfiguredV1
from flywheel_labeling.adapters.fetch import HttpImageFetcher
from flywheel_labeling.adapters.images import S3ImageStore
from flywheel_labeling.adapters.repository import SqlStore
from flywheel_labeling.api import routers
from flywheel_labeling.handlers import register
from flywheel_labeling.service import (
    LabelingService,
    LabelRequestQueue,
    Limits,
    ProjectService,
)
from flywheel_labeling.settings import SERVICE, LabelingSettings
from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.auth import CachingTokenVerifier, TokenVerifier
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_runtime.storage import ObjectStorage

MIGRATIONS = Path(__file__).parent / "migrations"

TITLE = "Flywheel labeling"
VERSION = "0.1.0"
DESCRIPTION = (
    "Takes labels from labeling tools (native JSON and multipart, Label Studio webhooks), "
    "stores images in S3 by content and labels in PostgreSQL, and records every change as an "
    "immutable dataset snapshot announced by labels.saved. Keeps the needs-label queue that "
    "labels.requested fills: a saved label of the same image answers its request."
)

log = structlog.get_logger(__name__)


def create_app(settings: LabelingSettings | None = None) -> FastAPI:
    """Build the service; nothing connects until the app's lifespan starts."""
    settings = settings or LabelingSettings()
    runtime = ServiceRuntime.create(
        SERVICE,
        settings.platform,
        schema=settings.db_schema,
        migrations=MIGRATIONS,
        outbox=True,
        namespace=settings.namespace,
    )
    declare_publishes(
        runtime.broker,
        runtime.topology,
        ProjectConfiguredV1,
        "A project was created or reconfigured (classes, retrain policy); revision grows.",
    )
    declare_publishes(
        runtime.broker,
        runtime.topology,
        LabelsSavedV1,
        "Labels were created, updated or deleted; the payload names the new dataset snapshot.",
    )

    storage = ObjectStorage.from_settings(settings.platform)
    fetcher = HttpImageFetcher(
        settings.image_fetch_allowed_hosts, timeout_s=settings.image_fetch_timeout_s
    )
    store = SqlStore(runtime.database, consumer=SERVICE)
    images = S3ImageStore(storage, settings.data_bucket)
    label_requests = LabelRequestQueue(store, images)
    register(runtime.broker, runtime.topology, label_requests)
    labeling = LabelingService(
        store,
        images,
        fetcher,
        SnapshotStore(storage, bucket=settings.data_bucket),
        Limits(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            prepare_concurrency=settings.prepare_concurrency,
            project_cache_s=settings.project_cache_s,
        ),
        group_max_items=settings.group_max_items,
        group_linger_s=settings.group_linger_s,
    )
    verifier = CachingTokenVerifier(settings.auth)

    async def ensure_bucket() -> None:
        try:
            await storage.ensure_buckets(settings.data_bucket)
        except DependencyUnavailableError:
            # Readiness reports S3 until it answers; labels are refused with 503 meanwhile.
            log.warning("data bucket not ensured: S3 unavailable", bucket=settings.data_bucket)

    async def shut_down() -> None:
        await labeling.committer.close()
        await fetcher.aclose()
        await verifier.aclose()
        storage.close()

    runtime.on_start.append(ensure_bucket)
    runtime.on_stop.append(shut_down)
    runtime.checks["s3"] = storage.ping

    app = fastapi_app(runtime, title=TITLE, version=VERSION, routers=routers)
    attach(app, settings, ProjectService(store), labeling, verifier, label_requests)
    return app


async def _http_error(_: Request, error: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method) in the platform's error shape."""
    refused = cast(StarletteHTTPException, error)
    code = _HTTP_CODES.get(refused.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(refused.detail), "details": {}}},
        status_code=refused.status_code,
        headers=refused.headers,
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def attach(
    app: FastAPI,
    settings: LabelingSettings,
    projects: ProjectService,
    labeling: LabelingService,
    verifier: TokenVerifier,
    label_requests: LabelRequestQueue,
) -> None:
    """Give the routes what their dependencies look up on ``app.state``, and the body limit."""
    app.max_body_size = settings.max_request_bytes
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.state.settings = settings
    app.state.token_verifier = verifier
    app.state.projects = projects
    app.state.labeling = labeling
    app.state.label_requests = label_requests
