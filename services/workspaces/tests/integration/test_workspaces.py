"""The service end to end on the real PostgreSQL and RabbitMQ, with the local backend starting
real environments and a controllable clock driving TTLs."""

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_contracts import WorkspaceExpiredV1, WorkspaceReadyV1, WorkspaceRequestedV1
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.db import Database
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_testing.events import EventProbe
from flywheel_testing.wait import close_within, wait_for
from flywheel_workspaces.main import create_app
from flywheel_workspaces.policy import Lifetime, Quota
from flywheel_workspaces.settings import WorkspacesSettings

from ..fakes import FakeClock, stop_everything_under

pytestmark = pytest.mark.integration

BODY: dict[str, Any] = {"image": "ghcr.io/acme/dev:1", "gpu_type": "a100", "ttl_s": 3600}


@dataclass
class Service:
    client: httpx.AsyncClient
    clock: FakeClock
    probe: EventProbe
    settings: WorkspacesSettings
    key: str

    def as_(self, subject: str, *roles: str) -> dict[str, str]:
        token = issue_dev_token(self.key, subject=subject, roles=roles or ("engineer",))
        return {"Authorization": f"Bearer {token}"}

    async def environment(self, workspace_id: str, subject: str) -> dict[str, Any]:
        response = await self.client.get(
            f"/api/v1/environments/{workspace_id}", headers=self.as_(subject)
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def reaches(self, workspace_id: str, subject: str, state: str) -> dict[str, Any]:
        async def there() -> dict[str, Any] | None:
            found = await self.environment(workspace_id, subject)
            assert found["state"] != "failed", found
            return found if found["state"] == state else None

        return await wait_for(there, timeout=60, interval=0.1, message=f"{workspace_id} {state}")

    def home(self, workspace_id: str) -> Path:
        return self.settings.local_root / workspace_id / "home"


@pytest.fixture
async def service(
    rabbit_url: str, database_url: str, topology: Topology, tmp_path: Path
) -> AsyncIterator[Service]:
    key = generate_dev_key()
    settings = WorkspacesSettings(
        platform=PlatformSettings(
            rabbit_url=SecretStr(rabbit_url),
            database_url=SecretStr(database_url),
            delivery_limit=topology.delivery_limit,
            log_json=False,
        ),
        namespace=topology.namespace,
        db_schema=f"ws_{uuid.uuid4().hex[:10]}",
        auth=AuthSettings(dev_signing_key=SecretStr(key)),
        local_root=tmp_path / "envs",
        local_ide="http-server",
        gpus={"a100": 1},
        quota=Quota(max_gpus=1, max_environments=1),
        lifetime=Lifetime(idle_timeout_s=None),
        poll_interval_s=0.1,
    )
    clock = FakeClock(datetime.now(UTC))
    app = create_app(settings, clock=clock)
    stack = AsyncExitStack()
    probe = await stack.enter_async_context(
        EventProbe(rabbit_url, topology, WorkspaceRequestedV1, WorkspaceReadyV1, WorkspaceExpiredV1)
    )
    await stack.enter_async_context(app.router.lifespan_context(app))
    client = await stack.enter_async_context(
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    )
    try:
        yield Service(client, clock, probe, settings, key)
    finally:
        await close_within(stack, 30)
        await stop_everything_under(settings.local_root)


async def test_an_environment_is_queued_ready_expired_keeping_its_home_and_deleted(
    service: Service, database_url: str
) -> None:
    ada, bob = service.as_("ada"), service.as_("bob")
    first = await service.client.post("/api/v1/environments", json=BODY, headers=ada)
    assert first.status_code == 202, first.text
    ada_id = first.json()["workspace_id"]
    queued = await service.client.post(
        "/api/v1/environments", json=BODY | {"ttl_s": 600}, headers=bob
    )
    bob_id = queued.json()["workspace_id"]
    assert (queued.json()["state"], queued.json()["queue_position"]) == ("queued", 1)
    over = await service.client.post("/api/v1/environments", json=BODY, headers=ada)
    assert (over.status_code, over.json()["error"]["details"]["limit"]) == (
        409,
        "max_environments",
    )

    # Ready: a real process answers HTTP at the connection URL.
    ready = await service.reaches(ada_id, "ada", "ready")
    url = ready["connection"]["url"]
    assert ready["connection"]["ide"] == "http-server"
    (service.home(ada_id) / "model.py").write_text("print('mine')\n")
    async with httpx.AsyncClient(trust_env=False) as outside:
        assert (await outside.get(url + "model.py")).text == "print('mine')\n"

    # Past its TTL: stopped, the home kept, and the queued request admitted in its place.
    service.clock.advance(3600)
    stopped = await service.reaches(ada_id, "ada", "stopped")
    assert (stopped["stop_reason"], stopped["home_kept"], stopped["connection"]) == (
        "ttl",
        True,
        None,
    )
    assert (service.home(ada_id) / "model.py").read_text() == "print('mine')\n"
    async with httpx.AsyncClient(trust_env=False) as outside:
        with pytest.raises(httpx.ConnectError):
            await outside.get(url)
    await service.reaches(bob_id, "bob", "ready")

    # Events on the real bus, in the environment's chain.
    [ada_requested, bob_requested] = await service.probe.wait(WorkspaceRequestedV1, 2)
    assert (ada_requested.payload.state, bob_requested.payload.queue_position) == (
        "provisioning",
        1,
    )
    ready_events = await service.probe.wait(WorkspaceReadyV1, 2)
    assert {str(e.payload.workspace_id) for e in ready_events} == {ada_id, bob_id}
    [expired] = await service.probe.wait(WorkspaceExpiredV1)
    assert str(expired.payload.workspace_id) == ada_id
    assert (expired.payload.reason.value, expired.payload.held_s) == ("ttl", 3600)
    assert expired.correlation_id == uuid.UUID(ada_id)

    # The audit, read by an operator.
    usage = await service.client.get(
        "/api/v1/reports/usage",
        params={"until": service.clock.now.isoformat()},
        headers=service.as_("olga", "operator"),
    )
    assert usage.json()["by_owner"]["ada"] == 1.0

    # Delete: the process and the home directory are gone, for good.
    for workspace_id, subject in ((ada_id, "ada"), (bob_id, "bob")):
        deleted = await service.client.delete(
            f"/api/v1/environments/{workspace_id}", headers=service.as_(subject)
        )
        assert deleted.json()["state"] == "deleted"
        assert not (service.settings.local_root / workspace_id).exists()
    gone = await service.client.get(f"/api/v1/environments/{bob_id}", headers=ada)
    assert gone.status_code == 404

    db = Database(database_url, service.settings.db_schema)
    try:
        async with db.transaction() as session:
            rows = (
                await session.execute(
                    text("SELECT owner, reason, ended_at IS NULL FROM holdings ORDER BY started_at")
                )
            ).all()
    finally:
        await db.dispose()
    assert [tuple(r) for r in rows] == [("ada", "ttl", False), ("bob", "owner", False)]
