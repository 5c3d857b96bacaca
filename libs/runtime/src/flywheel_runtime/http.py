"""HTTP edges shared by every service: one error body, its rendering and its documentation,
and the operations routes.

Every error leaves as ``{"error": {"code", "message", "details"}}`` (``ErrorBody``). Validation
errors name the offending field; unexpected errors are logged with their traceback and
answered with a generic 500 that leaks nothing. A 503 always says when to retry
(``Retry-After``); a 401 always carries ``WWW-Authenticate``.

The OpenAPI document says so too: ``ServiceAPI`` declares on each operation the error
responses it can give (``document_errors``), read from what the route is made of, so no route
restates them; a route adds only its own (``error_responses(409)``).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar, cast

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel_runtime.auth import route_auth
from flywheel_runtime.errors import (
    AuthenticationError,
    DependencyUnavailableError,
    FlywheelError,
)

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
"""Raises when the dependency it checks is not usable."""

RETRY_AFTER_S = 5
"""``Retry-After`` of a 503 whose error names no wait of its own."""


class ErrorDetail(BaseModel):
    """What went wrong: a stable code for programs, a message for people, facts for both."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    code: str
    """Stable and machine-readable: ``invalid_input``, ``not_found``, ``unauthenticated``, …"""
    message: str
    """For people; an unexpected error's own text never shows in it."""
    details: dict[str, Any]
    """Facts about it. ``field``: the request field at fault (``images.3.image_b64``); a
    request that fails validation also lists ``fields``, each ``{field, message}``."""


class ErrorBody(BaseModel):
    """The body of every error answer of every service."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``ErrorBody`` as JSON-ready data."""
    detail = ErrorDetail(code=code, message=message, details=dict(details or {}))
    return ErrorBody(error=detail).model_dump(mode="json")


def error_response(error: FlywheelError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(error, AuthenticationError):
        reason = error.details.get("reason")
        headers["WWW-Authenticate"] = (
            "Bearer"
            if reason in (None, "missing_token", "invalid_scheme")
            else 'Bearer error="invalid_token"'
        )
    if isinstance(error, DependencyUnavailableError) or error.http_status == 503:
        headers["Retry-After"] = str(getattr(error, "retry_after_s", RETRY_AFTER_S))
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
        # ``field`` as every other 422 names it; ``fields`` for all of them.
        first = {"field": fields[0]["field"]} if fields else {}
        body = error_body(
            "invalid_input", f"invalid request: {summary}", {**first, "fields": fields}
        )
        return JSONResponse(body, status_code=422)

    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.error("unhandled error", path=request.url.path, exc_info=error)
        return JSONResponse(error_body("internal_error", "internal error"), status_code=500)

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


class Readiness(BaseModel):
    """Whether the service's dependencies answer, each check's outcome by name."""

    status: Literal["ready", "not ready"]
    checks: dict[str, str]
    """``ok`` or ``failed: <error type>``."""


def ops_router(checks: Mapping[str, ReadinessCheck], registry: CollectorRegistry) -> APIRouter:
    """``/healthz`` (the process is alive), ``/readyz`` (its dependencies answer), ``/metrics``."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A dependency does not answer."}},
    )
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


# --- Error responses in the OpenAPI document ---------------------------------------------------

ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "No valid credentials: missing, malformed, expired or signed by someone else.",
    403: "Valid credentials without the role (or the permission) this operation needs.",
    404: "What the request names does not exist.",
    409: "The request does not fit the current state of what it names.",
    413: "The body, or an image in it, is over the size limit.",
    415: "The body, or a part of it, has a media type this operation does not read.",
    422: (
        "The request is invalid: ``details.field`` names the field at fault; a request that "
        "fails validation lists each field in ``details.fields``."
    ),
    502: "A server this operation relies on answered with something unusable.",
    503: (
        "A server this operation needs (database, broker, object store, identity provider, "
        "model registry, Triton) does not answer; try again after ``Retry-After`` seconds."
    ),
    504: "A server this operation needs answered too late; try again after ``Retry-After``.",
}
"""Every error status an operation may declare, and what it means on this platform."""

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'The scheme to authenticate with: ``Bearer`` (``error="invalid_token"``'
            " when a token was given and refused).",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    503: _RETRY_AFTER,
    504: _RETRY_AFTER,
}

_ERROR_BODY_REF = "#/components/schemas/ErrorBody"
_MULTIPART = "multipart/form-data"

_D = TypeVar("_D", bound=Callable[..., Any])

_answers: weakref.WeakKeyDictionary[Callable[..., Any], frozenset[int]] = (
    weakref.WeakKeyDictionary()
)


def answers(*statuses: int) -> Callable[[_D], _D]:
    """Mark a FastAPI dependency as one that may answer ``statuses`` itself (a media-type
    check's 415), so ``document_errors`` declares them on every route that depends on it."""
    _described(statuses)

    def mark(dependency: _D) -> _D:
        _answers[dependency] = _answers.get(dependency, frozenset()) | frozenset(statuses)
        return dependency

    return mark


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses`` for the errors only it can give (a 409, a 404 for an id in its
    body): each an ``ErrorBody`` with its description and headers."""
    _described(statuses)
    return {
        status: {
            "model": ErrorBody,
            "description": ERROR_DESCRIPTIONS[status],
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def route_error_statuses(
    app: FastAPI, dependant: Dependant, operation: Mapping[str, Any]
) -> set[int]:
    """The error statuses a route can give, from what it is made of.

    401 when it authenticates, 403 when it asks for roles; 404 when its path names something;
    422 when it takes parameters or a body; 413 and 415 when it takes uploads (multipart), 413
    for any body where the app has a body limit; 503 when it depends on anything (a use case
    on a server, or the identity provider's keys); and what its dependencies ``answers``.
    """
    statuses = set(_answered(dependant))
    requirement = route_auth(dependant, app.state)
    if requirement is not None:
        statuses.add(401)
        if requirement.roles:
            statuses.add(403)
    if dependant.dependencies:
        statuses.add(503)
    parameters = operation.get("parameters") or []
    body = operation.get("requestBody")
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if parameters or body:
        statuses.add(422)
    if body:
        if _MULTIPART in (body.get("content") or {}):
            statuses |= {413, 415}
        if app.max_body_size is not None:
            statuses.add(413)
    return statuses


def document_errors(app: FastAPI, document: dict[str, Any]) -> dict[str, Any]:
    """Declare on each operation of ``document`` (``app``'s OpenAPI) the error responses its
    route can give, as ``ErrorBody``; a route's own declaration of a status stands, FastAPI's
    default 422 (a body this platform never sends) does not. Idempotent."""
    paths: dict[str, Any] = document.get("paths") or {}
    for template, method, dependant in _operations(app):
        operation = (paths.get(template) or {}).get(method)
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        for status in sorted(route_error_statuses(app, dependant, operation)):
            declared = responses.get(str(status))
            if declared is None or _is_fastapi_validation_error(declared):
                responses[str(status)] = _error_response(status)
    _add_error_schemas(document)
    return document


class ServiceAPI(FastAPI):
    """FastAPI as every service runs it: its OpenAPI document declares each operation's error
    responses (``document_errors``), and a body over ``max_body_size`` is refused with an
    ``ErrorBody`` like every other error."""

    def openapi(self) -> dict[str, Any]:
        return document_errors(self, super().openapi())

    def build_middleware_stack(self) -> ASGIApp:
        return _RefuseOversizedBodies(super().build_middleware_stack(), self)


class _RefuseOversizedBodies:
    """Answers a request whose ``Content-Length`` is over the app's ``max_body_size`` with a
    413 ``ErrorBody`` before anything reads it.

    Starlette's own limit replaces any answer to such a request with a plain-text 413,
    whatever the error handlers said; a body sent without a length still meets that limit as
    it is read, and is answered through the handlers.
    """

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self._app = app
        self._api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._api.max_body_size
        if scope["type"] == "http" and limit is not None:
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > limit:
                body = error_body(
                    "payload_too_large",
                    f"the request body is more than the limit of {limit} bytes",
                    {"limit_bytes": limit},
                )
                await JSONResponse(body, status_code=413)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _described(statuses: tuple[int, ...]) -> None:
    unknown = set(statuses) - ERROR_DESCRIPTIONS.keys()
    if unknown:
        raise ValueError(f"no description for error statuses {sorted(unknown)}")


def _operations(app: FastAPI) -> Iterator[tuple[str, str, Dependant]]:
    """``(path template, method, dependant)`` of each documented route, included routers'
    with their prefix and router-level dependencies."""
    for context in iter_route_contexts(app.routes):
        dependant = getattr(context, "dependant", None)
        template = context.path_format
        if not isinstance(dependant, Dependant) or template is None:
            continue  # a plain Starlette route: FastAPI's docs pages
        if not getattr(context, "include_in_schema", True):
            continue
        for method in sorted(context.methods or ()):
            yield template, method.lower(), dependant


def _answered(dependant: Dependant) -> Iterator[int]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield from _answers.get(sub.call, ())
        yield from _answered(sub)


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": _ERROR_BODY_REF}}},
    }
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


def _is_fastapi_validation_error(response: Mapping[str, Any]) -> bool:
    schema = ((response.get("content") or {}).get("application/json") or {}).get("schema") or {}
    return str(schema.get("$ref", "")).endswith("/HTTPValidationError")


def _add_error_schemas(document: dict[str, Any]) -> None:
    """Put ``ErrorBody`` (and ``ErrorDetail``) in the components; drop FastAPI's validation
    error schemas once nothing refers to them."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" not in schemas:
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, schema in body.pop("$defs", {}).items():
            schemas.setdefault(name, schema)
        schemas["ErrorBody"] = body
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'"#/components/schemas/{unused}"' not in json.dumps(document):
            del schemas[unused]
