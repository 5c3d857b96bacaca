from __future__ import annotations

import uuid
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, File, Path, UploadFile
from pydantic import BaseModel, SecretStr

from flywheel_runtime.auth import (
    AuthSettings,
    CurrentPrincipal,
    Principal,
    TokenVerifier,
    generate_dev_key,
    require_roles,
)
from flywheel_runtime.errors import ConflictError, FlywheelError
from flywheel_runtime.http import (
    ErrorBody,
    ServiceAPI,
    answers,
    error_responses,
    install_error_handlers,
)

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}

Admin = Annotated[Principal, Depends(require_roles("admin"))]


class Body(BaseModel):
    name: str


class RefusedConfiguration(FlywheelError):
    """A 503 that is no ``DependencyUnavailableError``: it names no wait of its own."""

    code = "refused"
    http_status = 503


@answers(415)
async def require_json() -> None:
    """Stands for a media-type check."""


def app() -> ServiceAPI:
    router = APIRouter()

    @router.get("/open")
    async def open_route() -> dict[str, str]:
        return {}

    @router.get("/things/{thing_id}")
    async def get_thing(thing_id: Annotated[uuid.UUID, Path()], _: CurrentPrincipal) -> None:
        raise RefusedConfiguration("no grant")

    @router.post("/things", dependencies=[Depends(require_json)], responses=error_responses(409))
    async def create_thing(body: Body, _: Admin) -> dict[str, str]:
        raise ConflictError("exists")

    @router.post("/uploads")
    async def upload(image: Annotated[UploadFile, File()]) -> dict[str, str]:
        return {}

    built = ServiceAPI()
    built.state.token_verifier = TokenVerifier(
        AuthSettings(dev_signing_key=SecretStr(generate_dev_key()))
    )
    install_error_handlers(built)
    built.include_router(router)
    return built


def responses(document: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    found: dict[str, Any] = document["paths"][path][method]["responses"]
    return found


def test_each_route_declares_the_errors_it_is_made_to_give() -> None:
    document = app().openapi()

    def errors(path: str, method: str) -> list[str]:
        return sorted(s for s in responses(document, path, method) if int(s) >= 400)

    assert errors("/open", "get") == []
    assert errors("/things/{thing_id}", "get") == ["401", "404", "422", "503"]
    assert errors("/things", "post") == ["401", "403", "409", "415", "422", "503"]
    assert errors("/uploads", "post") == ["413", "415", "422"]


def test_every_declared_error_is_an_error_body_with_its_headers() -> None:
    document = app().openapi()
    things = responses(document, "/things", "post")

    for status, response in things.items():
        if int(status) >= 400:
            assert response["content"]["application/json"]["schema"] == ERROR_BODY, status
    assert things["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert things["503"]["headers"]["Retry-After"]["required"] is True
    assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "ValidationError" not in document["components"]["schemas"]


def test_documenting_twice_changes_nothing() -> None:
    built = app()

    assert built.openapi() == built.openapi()


def test_an_undescribed_status_is_refused() -> None:
    with pytest.raises(ValueError, match="418"):
        error_responses(418)


async def test_a_401_is_an_error_body_that_says_how_to_authenticate() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/things/not-a-uuid")

    assert response.status_code == 401  # credentials are checked before the path is judged
    body = ErrorBody.model_validate(response.json())
    assert response.headers["www-authenticate"] == "Bearer"
    assert body.error.code == "unauthenticated"


async def test_a_validation_error_body_names_its_first_field_and_lists_them_all() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/uploads", files={"other": ("x", b"1")})

    assert response.status_code == 422, response.text
    body = ErrorBody.model_validate(response.json())
    assert body.error.details["field"] == "image"
    assert body.error.details["fields"][0]["field"] == "image"


async def test_every_503_says_when_to_retry() -> None:
    built = app()
    router = APIRouter()

    @router.get("/refused")
    async def refused() -> None:
        raise RefusedConfiguration("missing grant")

    built.include_router(router)
    transport = httpx.ASGITransport(app=built)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/refused")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert ErrorBody.model_validate(response.json()).error.code == "refused"


async def test_a_body_over_the_limit_is_an_error_body_not_plain_text() -> None:
    built = app()
    built.max_body_size = 100
    transport = httpx.ASGITransport(app=built)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/uploads", files={"image": ("x.png", b"x" * 1000)})

    assert response.status_code == 413
    body = ErrorBody.model_validate(response.json())
    assert (body.error.code, body.error.details) == ("payload_too_large", {"limit_bytes": 100})
