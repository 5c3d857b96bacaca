"""No secret a service is given, nor a token it is sent, ever reaches its logs.

Every HTTP service starts with known secret values (database password, S3 secret key, JWT dev
signing key, Label Studio webhook secret and basic-auth password, the broker's password) and
DEBUG logging; the test then sends accepted, refused and failing requests, starts one service
against an unreachable database, and searches everything logged for each value: the rendered
lines on stdout/stderr and, record by record, every attribute of every stdlib record (structlog
event dicts included), so a secret dropped by the renderer but present in a record is found too.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
import pytest
import structlog
from pydantic import SecretStr

from flywheel_runtime.auth import generate_dev_key, issue_dev_token

from .conftest import SERVICES, Services, with_password

pytestmark = pytest.mark.integration


class RecordKeeper(logging.Handler):
    """Keeps every record's attributes as text, before any formatter drops or masks one."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.getMessage()} {record.__dict__!r}"
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.texts.append(text)


def leaks(needles: dict[str, str], haystacks: dict[str, str]) -> list[str]:
    return [
        f"{name} in {where}"
        for name, value in needles.items()
        for where, text in haystacks.items()
        if value in text
    ]


async def send_traffic(services: Services, tokens: list[str]) -> list[httpx.Response]:
    """Accepted, refused and failing requests to each service that checks credentials."""
    key = services.secrets.signing_key

    def bearer(*roles: str, signing_key: str = key, expires_in: int = 600) -> dict[str, str]:
        token = issue_dev_token(signing_key, subject="ada", roles=roles, expires_in=expires_in)
        tokens.append(token)
        return {"Authorization": f"Bearer {token}"}

    basic = httpx.BasicAuth("label-studio", services.secrets.label_studio_password)
    wrong_basic = httpx.BasicAuth("label-studio", services.secrets.label_studio_password[::-1])
    webhook = "X-Flywheel-Webhook-Secret"
    labeling, bff = services.clients["labeling"], services.clients["inference-bff"]
    rollout, dispatch = services.clients["rollout"], services.clients["trainer-dispatch"]
    workspaces = services.clients["workspaces"]
    project = {
        "project_id": "digits",
        "name": "Digits",
        "class_names": [str(d) for d in range(10)],
        "model_line": "digits-secrets",
        "policy": {"count": 5},
    }
    requests: list[tuple[httpx.AsyncClient, str, str, dict[str, Any]]] = [
        (labeling, "POST", "/v1/projects", {"json": project, "headers": bearer("admin")}),
        (labeling, "GET", "/v1/projects/digits", {"headers": bearer()}),
        (labeling, "GET", "/v1/projects", {"headers": bearer(expires_in=-3600)}),
        (labeling, "GET", "/v1/projects", {"headers": bearer(signing_key=generate_dev_key())}),
        (labeling, "GET", "/v1/projects", {"headers": {"Authorization": "Bearer x.y.z"}}),
        (labeling, "POST", "/v1/projects", {"json": project, "headers": bearer("labeler")}),
        (
            labeling,
            "POST",
            "/v1/projects/digits/integrations/label-studio/webhook",
            {"json": {"action": "ANNOTATION_CREATED"}, "headers": {webhook: "wrong"}},
        ),
        (
            labeling,
            "POST",
            "/v1/projects/digits/integrations/label-studio/webhook",
            {
                "json": {"action": "ANNOTATION_CREATED", "annotation": {"result": []}},
                "headers": {webhook: services.secrets.webhook_secret},
            },
        ),
        (bff, "POST", "/predict", {"json": {}, "headers": bearer()}),
        (
            bff,
            "POST",
            "/predict",
            {"json": {"image": {"uri": "s3://x/y.png"}}, "headers": bearer("predict")},
        ),
        (bff, "POST", "/label-studio/predict", {"json": {"tasks": []}, "auth": wrong_basic}),
        (bff, "POST", "/label-studio/setup", {"json": {"project": "1"}, "auth": basic}),
        (
            bff,
            "POST",
            "/label-studio/predict",
            {"json": {"tasks": [{"id": 1, "data": {}}]}, "auth": basic},
        ),
        (rollout, "POST", "/api/v1/lines/digits-secrets/promote", {"headers": bearer()}),
        (rollout, "POST", "/api/v1/lines/digits-secrets/freeze", {"headers": bearer("operator")}),
        (rollout, "GET", "/api/v1/lines/digits-secrets", {"headers": bearer()}),
        (dispatch, "POST", "/v1/runs", {"json": {}, "headers": bearer()}),
        (dispatch, "GET", "/v1/runs", {"headers": bearer("operator")}),
        (
            workspaces,
            "POST",
            "/api/v1/environments",
            {"json": {"image": "dev:1", "gpu_type": "h100"}, "headers": bearer("engineer")},
        ),
        (workspaces, "GET", "/api/v1/environments", {"headers": bearer("operator")}),
        (workspaces, "GET", "/api/v1/reports/usage", {"headers": bearer("operator")}),
    ]
    responses = []
    for client, method, path, kwargs in requests:
        responses.append(await client.request(method, path, **kwargs))
    return responses


async def test_no_secret_or_token_reaches_the_logs(
    services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    services.platform = services.platform.model_copy(update={"log_level": "DEBUG"})
    keeper = RecordKeeper()
    root = logging.getLogger()
    # The services point the root logger at capsys's stream, which closes with this test.
    handlers, level = root.handlers[:], root.level
    try:
        await run_and_scan(services, keeper, capsys)
    finally:
        root.handlers[:], root.level = handlers, level


async def run_and_scan(
    services: Services, keeper: RecordKeeper, capsys: pytest.CaptureFixture[str]
) -> None:
    def attach() -> None:
        logging.getLogger().addHandler(keeper)

    await services.start(*SERVICES, built=attach)
    tokens: list[str] = []
    responses = await send_traffic(services, tokens)

    # A service whose database refuses connections fails to start; its error must not carry
    # the URL's password either.
    closed_port = with_password(
        services.platform.database_url.get_secret_value(),
        services.secrets.db_password,
        address="127.0.0.1:9",
    )
    services.platform = services.platform.model_copy(
        update={"database_url": SecretStr(closed_port)}
    )
    with pytest.raises(Exception) as failed:  # noqa: PT011 - whatever the driver raises
        await services.start("labeling", built=attach)
    await services.stack.aclose()  # lifespans log their shutdown too
    # The search must find what it looks for: a value logged on purpose is found in both.
    canary = f"canary-{uuid.uuid4().hex}"
    structlog.get_logger("security-test").warning("canary", value=canary)

    captured = capsys.readouterr()
    statuses = sorted({r.status_code for r in responses})
    needles = services.secrets.needles() | {f"token_{n}": t for n, t in enumerate(tokens)}
    haystacks = {
        "stdout": captured.out,
        "stderr": captured.err,
        "records": "\n".join(keeper.texts),
        "responses": "\n".join(r.text + repr(dict(r.headers)) for r in responses),
        "startup_error": repr(failed.value) + str(failed.value),
    }
    assert leaks({"canary": canary}, haystacks) == ["canary in stdout", "canary in records"]
    found = leaks(needles, haystacks)
    with capsys.disabled():
        print(
            f"services={len(SERVICES)} requests={len(responses)} statuses={statuses} "
            f"records={len(keeper.texts)} log_bytes={len(captured.out) + len(captured.err)} "
            f"secrets={len(needles) - len(tokens)} tokens={len(tokens)} "
            f"db_down={type(failed.value).__name__} leaks={len(found)} "
            + ("ok" if not found else "LEAKED")
        )
    assert not found, found
    assert len(keeper.texts) > 100, "too few records: is the keeper still attached?"
    assert {401, 403} <= set(statuses)
