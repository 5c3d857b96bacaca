"""HTTP edges shared by every service: one error rendering and the operations routes.

Every error leaves as ``{"error": {"code", "message", "details"}}``. Validation errors name
the offending field; unexpected errors are logged with their traceback and answered with a
generic 500 that leaks nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from flywheel_runtime.errors import (
    AuthenticationError,
    DependencyUnavailableError,
    FlywheelError,
)

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
"""Raises when the dependency it checks is not usable."""


def error_response(error: FlywheelError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(error, AuthenticationError):
        reason = error.details.get("reason")
        headers["WWW-Authenticate"] = (
            "Bearer"
            if reason in (None, "missing_token", "invalid_scheme")
            else 'Bearer error="invalid_token"'
        )
    if isinstance(error, DependencyUnavailableError):
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(error.to_body(), status_code=error.http_status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def install_error_handlers(app: FastAPI) -> None:
    """Render FlywheelError, request validation errors and unexpected errors alike."""

    async def on_flywheel_error(_: Request, error: Exception) -> Response:
        return error_response(cast(FlywheelError, error))

    async def on_validation_error(_: Request, error: Exception) -> Response:
        errors = cast(RequestValidationError, error).errors()
        fields = [
            {"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            for e in errors
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        body = {
            "error": {
                "code": "invalid_input",
                "message": f"invalid request: {summary}",
                "details": {"fields": fields},
            }
        }
        return JSONResponse(body, status_code=422)

    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.error("unhandled error", path=request.url.path, exc_info=error)
        body = {"error": {"code": "internal_error", "message": "internal error", "details": {}}}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(FlywheelError, on_flywheel_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


async def run_readiness(
    checks: Mapping[str, ReadinessCheck], timeout_s: float = 2.0
) -> tuple[bool, dict[str, str]]:
    """Run every check concurrently; each gets ``timeout_s``."""

    async def one(check: ReadinessCheck) -> str:
        try:
            await asyncio.wait_for(check(), timeout=timeout_s)
        except Exception as error:
            return f"failed: {type(error).__name__}"
        return "ok"

    results = await asyncio.gather(*(one(c) for c in checks.values()))
    report = dict(zip(checks, results, strict=True))
    return all(r == "ok" for r in results), report


def ops_router(checks: Mapping[str, ReadinessCheck], registry: CollectorRegistry) -> APIRouter:
    """``/healthz`` (the process is alive), ``/readyz`` (its dependencies answer), ``/metrics``."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, report = await run_readiness(checks)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": report},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
