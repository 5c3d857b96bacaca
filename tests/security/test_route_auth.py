"""Every HTTP route of every service refuses callers it should refuse.

Routes come from each built app's ``app.routes`` and what each one demands from the
``declares_auth`` mark on its dependencies (``flywheel_runtime.auth.route_auth``), so a new
route, or a new role on one, is covered without touching this file.
"""

from __future__ import annotations

import base64
import inspect
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts

from flywheel_runtime.auth import AuthRequirement, generate_dev_key, route_auth

from .conftest import SERVICES, Services

pytestmark = pytest.mark.integration

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Liveness, readiness and Prometheus scraping: open so the orchestrator and scraper need no
token."""
API_DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
"""FastAPI's schema and documentation pages: they describe the API, they serve no data."""
EXEMPT: dict[str, frozenset[str]] = dict.fromkeys(SERVICES, PROBES | API_DOCS) | {
    # Label Studio polls its ML backends' health without credentials.
    "inference-bff": PROBES
    | API_DOCS
    | {"/label-studio/health", "/label-studio/lines/{model_line}/health"},
}
"""Paths each service serves without authentication, exactly."""

NOT_ENFORCED: dict[str, str] = {}
"""Services whose settings cannot turn authentication on: strict xfail, so a fix turns them
into passes that must be removed here (none at present)."""


PATH_VALUES = ("demo-1", "snap-0123abcd", "0" * 64)
"""Dummy path values tried in turn against a parameter's pattern (a slug, a snapshot id, a
sha256); UUID and int parameters get a fresh UUID and ``1``."""


@dataclass(frozen=True)
class Call:
    """One route and method, made callable: a concrete path and a body it accepts."""

    method: str
    template: str
    path: str
    requirement: AuthRequirement | None
    calls: tuple[Callable[..., Any], ...]
    multipart: bool

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def _dependency_calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _dependency_calls(sub)


def _path_value(dependant: Dependant, template: str, name: str) -> str:
    declared = [p for p in dependant.path_params if p.name == name]
    if not declared:
        return PATH_VALUES[0]  # the endpoint ignores it: any segment routes there
    [param] = declared
    if param.field_info.annotation is uuid.UUID:
        return str(uuid.uuid4())
    if param.field_info.annotation is int:
        return "1"
    patterns = [getattr(m, "pattern", None) for m in param.field_info.metadata]
    for value in PATH_VALUES:
        if all(p is None or re.fullmatch(p, value) for p in patterns):
            return value
    raise AssertionError(f"no dummy value in PATH_VALUES matches {template} {name} {patterns}")


def _multipart(app: FastAPI, template: str, method: str) -> bool:
    operation = app.openapi()["paths"][template][method.lower()]
    content = operation.get("requestBody", {}).get("content", {})
    return "multipart/form-data" in content and "application/json" not in content


def discover(app: FastAPI) -> tuple[set[str], list[Call]]:
    """Every path the app serves, and a ``Call`` for each method of its FastAPI routes.

    Routes are read as FastAPI itself reads them for OpenAPI (``iter_route_contexts``): an
    included router's routes with its prefix and its router-level dependencies.
    """
    paths: set[str] = set()
    calls: list[Call] = []
    for context in iter_route_contexts(app.routes):
        template = context.path_format
        assert isinstance(template, str), f"route without a path: {context.route!r}"
        paths.add(template)
        dependant = getattr(context, "dependant", None)
        if not isinstance(dependant, Dependant):
            continue  # a plain Starlette route: FastAPI's docs pages
        concrete = template
        for name in context.param_convertors:
            concrete = concrete.replace(f"{{{name}}}", _path_value(dependant, template, name))
        for method in sorted(context.methods or ()):
            calls.append(
                Call(
                    method,
                    template,
                    concrete,
                    route_auth(dependant, app.state),
                    tuple(_dependency_calls(dependant)),
                    _multipart(app, template, method),
                )
            )
    return paths, calls


def request_kwargs(call: Call) -> dict[str, Any]:
    """A body of the media type the route reads: auth must answer before the body is judged."""
    if call.method in {"GET", "DELETE"}:
        return {}
    if call.multipart:
        return {"files": {"image": ("x.png", b"\x89PNG\r\n", "image/png")}, "data": {"x": "1"}}
    return {"json": {}}


@dataclass
class Tally:
    checks: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


async def expect(
    client: httpx.AsyncClient,
    call: Call,
    headers: dict[str, str],
    allowed: set[int],
    what: str,
    tally: Tally,
    *,
    refused: bool = True,
) -> None:
    response = await client.request(call.method, call.path, headers=headers, **request_kwargs(call))
    tally.checks += 1
    tally.statuses[response.status_code] += 1
    if refused:
        assert response.status_code in allowed, (
            f"{call} with {what}: {response.status_code} {response.text[:300]}"
        )
        if (
            response.status_code == 401
            and "bearer" in (call.requirement or AuthRequirement()).schemes
        ):
            assert response.headers.get("www-authenticate", "").lower().startswith("bearer"), (
                f"{call} with {what}: 401 without WWW-Authenticate: Bearer"
            )
    else:
        assert response.status_code not in allowed, (
            f"{call} with {what} was refused: {response.status_code} {response.text[:300]}"
        )


_platform_roles: set[str] = set()


def platform_roles(services: Services) -> set[str]:
    """Every role any route of any service asks for, read from the built apps (once)."""
    if not _platform_roles:
        for service in SERVICES:
            _, calls = discover(services.build(service))  # no lifespan: nothing connects
            _platform_roles.update(r for c in calls if c.requirement for r in c.requirement.roles)
    return _platform_roles


async def check_bearer(
    services: Services, client: httpx.AsyncClient, call: Call, roles: set[str], tally: Tally
) -> None:
    assert call.requirement is not None
    required = call.requirement.roles
    other_key = generate_dev_key("EC")
    await expect(client, call, {}, {401}, "no token", tally)
    expired = services.token("eve", *roles, expires_in=-3600)
    await expect(client, call, {"Authorization": f"Bearer {expired}"}, {401}, "expired", tally)
    forged = services.token("eve", *roles, key=other_key)
    await expect(client, call, {"Authorization": f"Bearer {forged}"}, {401}, "other key", tally)
    await expect(client, call, {"Authorization": "Basic ZXZlOmV2ZQ=="}, {401}, "basic", tally)
    await expect(client, call, {"Authorization": "Bearer not-a-jwt"}, {401}, "garbage", tally)
    if required:
        await expect(client, call, services.bearer("eve"), {403}, "no roles", tally)
        for role in sorted(roles - required):
            await expect(client, call, services.bearer("eve", role), {403}, f"role {role}", tally)
    # The roles the route asks for pass authentication: the dummy values were not refused.
    await expect(
        client,
        call,
        services.bearer("ada", *required),
        {401, 403},
        "its roles",
        tally,
        refused=False,
    )


async def check_webhook_secret(
    services: Services, client: httpx.AsyncClient, call: Call, roles: set[str], tally: Tally
) -> None:
    header = "X-Flywheel-Webhook-Secret"
    await expect(client, call, {}, {401}, "no secret", tally)
    await expect(client, call, {header: "wrong"}, {401}, "wrong secret", tally)
    await expect(
        client, call, {header: services.secrets.webhook_secret[:-1]}, {401}, "prefix", tally
    )
    await expect(client, call, services.bearer("ada", *roles), {401}, "a bearer token", tally)
    await expect(
        client,
        call,
        {header: services.secrets.webhook_secret},
        {401, 403},
        "the secret",
        tally,
        refused=False,
    )


async def check_basic(
    services: Services, client: httpx.AsyncClient, call: Call, roles: set[str], tally: Tally
) -> None:
    def basic(user: str, password: str) -> dict[str, str]:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }

    good = services.secrets.label_studio_password
    await expect(client, call, basic("label-studio", "wrong"), {401}, "wrong password", tally)
    await expect(client, call, basic("label-studio", good[:-1]), {401}, "password prefix", tally)
    await expect(client, call, basic("someone", good), {401}, "wrong user", tally)
    await expect(client, call, {"Authorization": "Basic %%%"}, {401}, "malformed basic", tally)
    await expect(
        client, call, basic("label-studio", good), {401, 403}, "Label Studio", tally, refused=False
    )


SCHEME_CHECKS = {
    "bearer": check_bearer,
    "webhook_secret": check_webhook_secret,
    "basic": check_basic,
}
"""How each authentication scheme a route may declare is attacked; an unknown one fails."""


@pytest.mark.parametrize(
    "service",
    [
        pytest.param(s, marks=pytest.mark.xfail(reason=NOT_ENFORCED[s], strict=True))
        if s in NOT_ENFORCED
        else s
        for s in SERVICES
    ],
)
async def test_every_route_refuses_callers_without_the_right_credentials(
    services: Services, service: str
) -> None:
    roles = platform_roles(services)
    await services.start(service)
    app, client = services.apps[service], services.clients[service]
    paths, calls = discover(app)
    assert paths - {c.template for c in calls} <= EXEMPT[service]
    open_paths = {c.template for c in calls if c.requirement is None}
    assert open_paths | (paths - {c.template for c in calls}) == EXEMPT[service], (
        f"{service}: open paths differ from the exempt list"
    )
    tally = Tally()
    checked = [c for c in calls if c.requirement is not None]
    for call in checked:
        assert call.requirement is not None
        unknown = call.requirement.schemes - SCHEME_CHECKS.keys()
        assert not unknown, f"{call}: no attack written for schemes {unknown}"
        for scheme in sorted(call.requirement.schemes):
            await SCHEME_CHECKS[scheme](services, client, call, roles, tally)
    print(
        f"service={service} routes={len(checked)} exempt={len(EXEMPT[service])} "
        f"roles={sorted(roles)} checks={tally.checks} "
        f"statuses={dict(sorted(tally.statuses.items()))} ok"
    )


def test_no_source_compares_a_secret_with_equality() -> None:
    root = Path(__file__).resolve().parents[2]
    sources = [*root.glob("services/*/src/**/*.py"), *root.glob("libs/*/src/**/*.py")]
    naive = re.compile(
        r"(secret|password|token|signature)\w*(\(\))?\s*[!=]=|[!=]=\s*\w*(secret|password|signature)",
        re.I,
    )
    found = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if naive.search(line) and "is None" not in line
    ]
    compared = [path.relative_to(root) for path in sources if "compare_digest" in path.read_text()]
    print(f"sources={len(sources)} compare_digest_in={[str(p) for p in compared]} naive={found}")
    assert not found


async def test_non_bearer_schemes_use_compare_digest(services: Services) -> None:
    await services.start("labeling", "inference-bff")
    checked = 0
    for service in ("labeling", "inference-bff"):
        _, calls = discover(services.apps[service])
        for call in calls:
            if call.requirement is None or call.requirement.schemes == {"bearer"}:
                continue
            sources = "\n".join(
                inspect.getsource(fn) for fn in call.calls if inspect.isfunction(fn)
            )
            assert "hmac.compare_digest(" in sources, f"{service} {call}: no compare_digest"
            checked += 1
    print(f"secret_routes={checked} compare_digest=all ok")
    assert checked
