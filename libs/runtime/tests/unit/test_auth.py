from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Route

from flywheel_runtime.auth import (
    AuthRequirement,
    AuthSettings,
    CurrentPrincipal,
    Principal,
    TokenVerifier,
    declares_auth,
    generate_dev_key,
    issue_dev_token,
    jwks_from_private_key,
    require_roles,
    roles_from_claims,
    route_auth,
)
from flywheel_runtime.http import install_error_handlers
from flywheel_testing.wait import wait_until

ISSUER = "http://keycloak.test/realms/flywheel"
AUDIENCE = "flywheel-api"


# --- a real JWKS endpoint -------------------------------------------------------------------


@dataclass
class JwksEndpoint:
    url: str = ""
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    failing: bool = False
    hits: int = 0

    def serve(self, *pems_with_kids: tuple[str, str]) -> None:
        self.document = {
            "keys": [jwks_from_private_key(pem, kid)["keys"][0] for pem, kid in pems_with_kids]
        }

    async def certs(self, _request: Request) -> Response:
        self.hits += 1
        if self.failing:
            return Response("down", status_code=500)
        return StarletteJSONResponse(self.document)


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksEndpoint]:
    endpoint = JwksEndpoint()
    app = Starlette(routes=[Route("/certs", endpoint.certs)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    endpoint.url = f"http://127.0.0.1:{port}/certs"
    yield endpoint
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def jwks(jwks_server: JwksEndpoint, rsa_pem: str, ec_pem: str) -> JwksEndpoint:
    jwks_server.serve((rsa_pem, "rsa-1"), (ec_pem, "ec-1"))
    jwks_server.failing = False
    jwks_server.hits = 0
    return jwks_server


# --- keys, clock, verifier, app ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return generate_dev_key("RSA")


@pytest.fixture(scope="module")
def other_rsa_pem() -> str:
    return generate_dev_key("RSA")


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return generate_dev_key("EC")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def verifier(jwks: JwksEndpoint, clock: FakeClock) -> AsyncIterator[TokenVerifier]:
    settings = AuthSettings(jwks_url=jwks.url, issuer=ISSUER, audience=AUDIENCE)
    async with TokenVerifier(settings, clock=clock) as token_verifier:
        yield token_verifier


AdminPrincipal = Annotated[Principal, Depends(require_roles("admin"))]


def _app(verifier: TokenVerifier) -> FastAPI:
    app = FastAPI()
    app.state.token_verifier = verifier
    install_error_handlers(app)

    @app.get("/me")
    async def me(principal: CurrentPrincipal) -> dict[str, Any]:
        return {
            "subject": principal.subject,
            "username": principal.username,
            "roles": sorted(principal.roles),
        }

    @app.get("/admin")
    async def admin(principal: AdminPrincipal) -> dict[str, str]:
        return {"subject": principal.subject}

    return app


@pytest.fixture
async def client(verifier: TokenVerifier) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(verifier))
    async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as http:
        yield http


def _token(pem: str, kid: str, **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "subject": "user-1",
        "username": "ada",
        "roles": ["labeler"],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "kid": kid,
    }
    claims.update(overrides)
    return issue_dev_token(pem, **claims)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned_parts(header: dict[str, Any]) -> str:
    now = int(time.time())
    payload = {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"


def _assert_rejected(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "unauthenticated"
    assert error["details"]["reason"] == reason


# --- accepted tokens --------------------------------------------------------------------------


async def test_valid_rs256_token_gives_principal_and_roles(
    client: httpx.AsyncClient, rsa_pem: str
) -> None:
    token = _token(rsa_pem, "rsa-1", roles=["labeler", "admin"])

    response = await client.get("/me", headers=_bearer(token))

    assert response.status_code == 200, response.text
    assert response.json() == {
        "subject": "user-1",
        "username": "ada",
        "roles": ["admin", "labeler"],
    }
    assert jwt.get_unverified_header(token)["alg"] == "RS256"


async def test_valid_es256_token_passes(client: httpx.AsyncClient, ec_pem: str) -> None:
    token = _token(ec_pem, "ec-1")

    response = await client.get("/me", headers=_bearer(token))

    assert response.status_code == 200, response.text
    assert response.json()["roles"] == ["labeler"]
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


async def test_token_expired_within_leeway_passes(client: httpx.AsyncClient, rsa_pem: str) -> None:
    response = await client.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1", expires_in=-5)))

    assert response.status_code == 200, response.text


async def test_principal_username_falls_back_to_subject(
    verifier: TokenVerifier, rsa_pem: str
) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"sub": "svc-account", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60},
        rsa_pem,
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    )

    principal = await verifier.verify(token)

    assert principal.username == "svc-account"
    assert principal.roles == frozenset()
    assert principal.claims["aud"] == AUDIENCE


# --- rejected requests ------------------------------------------------------------------------


async def test_missing_authorization_header_is_401_with_bearer_challenge(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/me")

    _assert_rejected(response, "missing_token")


async def test_non_bearer_scheme_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})

    _assert_rejected(response, "invalid_scheme")


async def test_expired_token_is_401(client: httpx.AsyncClient, rsa_pem: str) -> None:
    response = await client.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1", expires_in=-120)))

    _assert_rejected(response, "expired")
    assert response.json()["error"]["message"] == "token has expired"


async def test_signature_by_another_key_with_same_kid_is_401(
    client: httpx.AsyncClient, other_rsa_pem: str
) -> None:
    response = await client.get("/me", headers=_bearer(_token(other_rsa_pem, "rsa-1")))

    _assert_rejected(response, "bad_signature")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"issuer": "http://evil.test/realms/flywheel"}, "invalid_issuer"),
        ({"audience": "another-api"}, "invalid_audience"),
    ],
)
async def test_wrong_issuer_or_audience_is_401(
    client: httpx.AsyncClient, rsa_pem: str, overrides: dict[str, str], reason: str
) -> None:
    response = await client.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1", **overrides)))

    _assert_rejected(response, reason)


async def test_alg_none_token_is_401(client: httpx.AsyncClient) -> None:
    token = _unsigned_parts({"alg": "none", "typ": "JWT", "kid": "rsa-1"}) + "."

    response = await client.get("/me", headers=_bearer(token))

    _assert_rejected(response, "algorithm_not_allowed")


async def test_hs256_token_signed_with_the_public_key_is_401(
    client: httpx.AsyncClient, rsa_pem: str
) -> None:
    private_key = serialization.load_pem_private_key(rsa_pem.encode(), password=None)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = _unsigned_parts({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()

    response = await client.get("/me", headers=_bearer(f"{signing_input}.{_b64(signature)}"))

    _assert_rejected(response, "algorithm_not_allowed")


async def test_rs256_token_naming_an_ec_key_is_401(client: httpx.AsyncClient, rsa_pem: str) -> None:
    response = await client.get("/me", headers=_bearer(_token(rsa_pem, "ec-1")))

    _assert_rejected(response, "algorithm_not_allowed")


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", ""])
async def test_malformed_token_is_401(client: httpx.AsyncClient, token: str) -> None:
    response = await client.get("/me", headers={"Authorization": f"Bearer {token}"})

    _assert_rejected(response, "malformed" if token else "invalid_scheme")


async def test_token_without_exp_is_401(client: httpx.AsyncClient, rsa_pem: str) -> None:
    token = jwt.encode(
        {"sub": "user-1", "iss": ISSUER, "aud": AUDIENCE},
        rsa_pem,
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    )

    response = await client.get("/me", headers=_bearer(token))

    _assert_rejected(response, "missing_claim")
    assert response.json()["error"]["message"] == "token has no 'exp' claim"


async def test_missing_role_is_403_naming_it(client: httpx.AsyncClient, rsa_pem: str) -> None:
    response = await client.get("/admin", headers=_bearer(_token(rsa_pem, "rsa-1")))

    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "forbidden"
    assert "'admin'" in error["message"]
    assert error["details"] == {"missing_roles": ["admin"]}


async def test_required_role_present_passes(client: httpx.AsyncClient, rsa_pem: str) -> None:
    token = _token(rsa_pem, "rsa-1", roles=["admin"])

    response = await client.get("/admin", headers=_bearer(token))

    assert response.status_code == 200, response.text
    assert response.json() == {"subject": "user-1"}


# --- JWKS cache, rotation and outages ---------------------------------------------------------


async def test_unknown_kid_refetches_jwks_once_so_key_rotation_works(
    client: httpx.AsyncClient,
    jwks: JwksEndpoint,
    clock: FakeClock,
    rsa_pem: str,
    other_rsa_pem: str,
) -> None:
    assert (await client.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1")))).status_code == 200
    assert (await client.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1")))).status_code == 200
    assert jwks.hits == 1

    jwks.serve((rsa_pem, "rsa-1"), (other_rsa_pem, "rsa-2"))
    clock.advance(15)
    rotated = _bearer(_token(other_rsa_pem, "rsa-2"))
    responses = await asyncio.gather(*(client.get("/me", headers=rotated) for _ in range(5)))

    assert [r.status_code for r in responses] == [200] * 5
    assert jwks.hits == 2


async def test_unknown_kids_refetch_at_most_once_per_interval(
    client: httpx.AsyncClient, jwks: JwksEndpoint, clock: FakeClock, other_rsa_pem: str
) -> None:
    for attempt in range(5):
        response = await client.get(
            "/me", headers=_bearer(_token(other_rsa_pem, f"spray-{attempt}"))
        )
        _assert_rejected(response, "unknown_key")
    assert jwks.hits == 1

    clock.advance(10)
    response = await client.get("/me", headers=_bearer(_token(other_rsa_pem, "spray-late")))

    _assert_rejected(response, "unknown_key")
    assert jwks.hits == 2


async def test_jwks_is_refetched_after_the_cache_expires(
    client: httpx.AsyncClient, jwks: JwksEndpoint, clock: FakeClock, rsa_pem: str
) -> None:
    token = _bearer(_token(rsa_pem, "rsa-1"))
    assert (await client.get("/me", headers=token)).status_code == 200

    jwks.serve()
    clock.advance(301)
    response = await client.get("/me", headers=token)

    _assert_rejected(response, "unknown_key")
    assert jwks.hits == 2


async def test_known_key_keeps_working_while_jwks_is_down(
    client: httpx.AsyncClient, jwks: JwksEndpoint, clock: FakeClock, rsa_pem: str
) -> None:
    token = _bearer(_token(rsa_pem, "rsa-1"))
    assert (await client.get("/me", headers=token)).status_code == 200

    jwks.failing = True
    clock.advance(301)

    assert (await client.get("/me", headers=token)).status_code == 200
    assert jwks.hits == 2


async def test_jwks_failure_without_cached_key_is_503(
    client: httpx.AsyncClient, jwks: JwksEndpoint, rsa_pem: str
) -> None:
    jwks.failing = True

    response = await client.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1")))

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "dependency_unavailable"


async def test_unreachable_jwks_is_503(rsa_pem: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = AuthSettings(jwks_url=f"http://127.0.0.1:{closed_port}/certs", jwks_timeout_s=2)
    async with TokenVerifier(settings) as verifier:
        transport = httpx.ASGITransport(app=_app(verifier))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as http:
            response = await http.get("/me", headers=_bearer(_token(rsa_pem, "rsa-1")))

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "dependency_unavailable"


# --- dev signing key, settings ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["EC", "RSA"])
async def test_dev_signing_key_works_without_jwks(kind: Literal["EC", "RSA"]) -> None:
    dev_pem = generate_dev_key(kind)
    settings = AuthSettings(dev_signing_key=SecretStr(dev_pem))
    async with TokenVerifier(settings) as verifier:
        transport = httpx.ASGITransport(app=_app(verifier))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as http:
            good = await http.get(
                "/admin", headers=_bearer(issue_dev_token(dev_pem, subject="dev", roles=["admin"]))
            )
            foreign = await http.get(
                "/me", headers=_bearer(issue_dev_token(generate_dev_key(kind), subject="dev"))
            )

    assert good.status_code == 200, good.text
    _assert_rejected(foreign, "unknown_key")


async def test_dev_key_with_flat_roles_claim(ec_pem: str) -> None:
    settings = AuthSettings(dev_signing_key=SecretStr(ec_pem), roles_claim="roles")
    token = issue_dev_token(ec_pem, subject="dev", roles=["a", "b"], roles_claim="roles")
    async with TokenVerifier(settings) as verifier:
        principal = await verifier.verify(token)

    assert principal.roles == frozenset({"a", "b"})
    assert principal.claims["roles"] == ["a", "b"]


def test_auth_without_jwks_or_dev_key_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="authentication is not configured"):
        TokenVerifier(AuthSettings())


@pytest.mark.parametrize("algorithm", ["none", "HS256"])
def test_symmetric_or_none_algorithms_are_refused_in_settings(algorithm: str) -> None:
    with pytest.raises(ValidationError, match="not accepted"):
        AuthSettings(jwks_url="http://idp.test/certs", algorithms=["RS256", algorithm])


@pytest.mark.parametrize(
    ("claims", "roles_claim", "expected"),
    [
        ({"realm_access": {"roles": ["a", "b"]}}, "realm_access.roles", {"a", "b"}),
        ({"roles": ["a", 3]}, "roles", {"a"}),
        ({"scope": "read write"}, "scope", {"read", "write"}),
        ({"https://flywheel.test/roles": ["x"]}, "https://flywheel.test/roles", {"x"}),
        ({"realm_access": "oops"}, "realm_access.roles", set()),
        ({}, "realm_access.roles", set()),
    ],
)
def test_roles_from_claims(claims: dict[str, Any], roles_claim: str, expected: set[str]) -> None:
    assert roles_from_claims(claims, roles_claim) == frozenset(expected)


async def test_missing_token_verifier_on_app_state_is_a_wiring_error(
    verifier: TokenVerifier,
) -> None:
    app = _app(verifier)
    del app.state.token_verifier
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as http:
        with pytest.raises(RuntimeError, match="token_verifier"):
            await http.get("/me")


# --- route_auth: what routes demand, read from their dependencies -----------------------------


def _requirements(app: FastAPI) -> dict[str, AuthRequirement | None]:
    # As FastAPI reads routes for OpenAPI: included routers with their prefix and dependencies.
    return {
        str(context.path_format): route_auth(context.dependant, app.state)
        for context in iter_route_contexts(app.routes)
        if isinstance(getattr(context, "dependant", None), Dependant)
    }


@declares_auth(roles_from=lambda state: [state.role], schemes=("bearer", "basic"))
async def _role_from_settings(principal: CurrentPrincipal) -> Principal:
    return principal


@declares_auth(schemes=("webhook_secret",))
async def _webhook() -> None:
    return None


AdminOrAuditor = Annotated[Principal, Depends(require_roles("admin", "auditor"))]
FromSettings = Annotated[Principal, Depends(_role_from_settings)]


def test_route_auth_reads_roles_and_schemes_from_dependencies() -> None:
    app = FastAPI()
    app.state.role = "predict"
    router = APIRouter(prefix="/v1", dependencies=[Depends(_webhook)])

    @app.get("/any")
    async def any_caller(_: CurrentPrincipal) -> None: ...

    @app.get("/admin")
    async def admin_only(_: AdminOrAuditor) -> None: ...

    @app.get("/predict")
    async def predict(_: FromSettings) -> None: ...

    @app.get("/open")
    async def open_route() -> None: ...

    @router.post("/hook")
    async def hook() -> None: ...

    app.include_router(router)
    found = _requirements(app)

    assert found["/any"] == AuthRequirement()
    assert found["/admin"] == AuthRequirement(frozenset({"admin", "auditor"}))
    assert found["/predict"] == AuthRequirement(
        frozenset({"predict"}), frozenset({"bearer", "basic"})
    )
    assert found["/open"] is None
    assert found["/v1/hook"] == AuthRequirement(schemes=frozenset({"webhook_secret"}))
