"""Every service's OpenAPI document declares the error responses its operations give, each as
``ErrorBody``, the one shape every error leaves in.

What an operation needs is read from the built app's routes (``route_auth`` for credentials,
FastAPI's own dependency tree for input), not from the document under test, so a route that
adds a parameter or a role without its error responses being declared fails here.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts

from flywheel_runtime.auth import route_auth
from flywheel_runtime.http import ErrorBody

from .conftest import SERVICES, Services

pytestmark = pytest.mark.integration

HEALTH = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scraping; Label Studio's ``.../health`` probes are told by their name."""

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


def operations(app: FastAPI) -> list[tuple[str, str, Dependant]]:
    found = []
    for context in iter_route_contexts(app.routes):
        dependant = getattr(context, "dependant", None)
        if not isinstance(dependant, Dependant) or not getattr(context, "include_in_schema", 1):
            continue
        template = str(context.path_format)
        if template in HEALTH or template.endswith("/health"):
            continue
        found += [(template, m.lower(), dependant) for m in sorted(context.methods or ())]
    return found


def error_schema(operation: dict[str, Any], status: int) -> dict[str, Any] | None:
    response = operation["responses"].get(str(status))
    if response is None:
        return None
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def inputs(dependant: Dependant) -> Counter[str]:
    """Parameters and body fields by kind, the route's and its dependencies' alike."""
    found: Counter[str] = Counter(
        path=len(dependant.path_params),
        query=len(dependant.query_params),
        header=len(dependant.header_params),
        cookie=len(dependant.cookie_params),
        body=len(dependant.body_params),
    )
    for sub in dependant.dependencies:
        found += inputs(sub)
    return found


def takes_input(dependant: Dependant, operation: dict[str, Any]) -> bool:
    # A body the endpoint reads itself is documented through openapi_extra.
    return sum(inputs(dependant).values()) > 0 or "requestBody" in operation


@pytest.mark.parametrize("service", SERVICES)
def test_every_operation_documents_its_error_responses_as_error_body(
    services: Services, service: str
) -> None:
    app = services.build(service)  # no lifespan: nothing connects
    document = app.openapi()
    tally: Counter[str] = Counter()
    for template, method, dependant in operations(app):
        operation = document["paths"][template][method]
        where = f"{service} {method.upper()} {template}"
        requirement = route_auth(dependant, app.state)
        if requirement is not None and "bearer" in requirement.schemes:
            assert error_schema(operation, 401) == ERROR_BODY, where
            assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
            tally["401"] += 1
            if requirement.roles:
                assert error_schema(operation, 403) == ERROR_BODY, where
                tally["403"] += 1
        if takes_input(dependant, operation):
            assert error_schema(operation, 422) == ERROR_BODY, where
            tally["422"] += 1
        if inputs(dependant)["path"]:
            assert error_schema(operation, 404) == ERROR_BODY, where
            tally["404"] += 1
        if dependant.dependencies:
            assert error_schema(operation, 503) == ERROR_BODY, where
            retry_after = operation["responses"]["503"]["headers"]["Retry-After"]
            assert retry_after["required"], where
            tally["503"] += 1
        for status in operation["responses"]:
            if int(status) >= 400:
                assert error_schema(operation, int(status)) == ERROR_BODY, (where, status)
        tally["operations"] += 1
    # FastAPI's own 422 body ({"detail": [...]}) is never sent: nothing may still name it.
    assert "HTTPValidationError" not in json.dumps(document)
    assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    print(f"service={service} {dict(sorted(tally.items()))} ok")


async def test_a_body_over_the_limit_is_refused_with_an_error_body(services: Services) -> None:
    app = services.build("labeling")
    app.max_body_size = 1024
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/v1/projects",
            content=b"{" + b" " * 4096 + b"}",
            headers={"content-type": "application/json", **services.bearer("ada", "admin")},
        )

    assert response.status_code == 413, response.text
    body = ErrorBody.model_validate(response.json())
    assert (body.error.code, body.error.details) == ("payload_too_large", {"limit_bytes": 1024})
