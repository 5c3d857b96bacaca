"""In-memory fakes of the workspaces' ports, a controllable clock, and a harness around them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr

from flywheel_contracts import Event
from flywheel_runtime.auth import AuthSettings, TokenVerifier, generate_dev_key, issue_dev_token
from flywheel_runtime.http import ServiceAPI, install_error_handlers
from flywheel_workspaces.api import routers
from flywheel_workspaces.policy import Lifetime, Quota
from flywheel_workspaces.ports import (
    BackendPhase,
    BackendStatus,
    Connection,
    Holding,
    StopReason,
    Workspace,
    WorkspaceSpec,
    WorkspaceState,
)
from flywheel_workspaces.service import Engineer, Workspaces

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """The time every policy decision reads; tests move it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class FakeStore:
    """The WorkspaceStore in memory: one transaction at a time, applied only on success."""

    rows: dict[uuid.UUID, Workspace] = field(default_factory=dict)
    order: dict[uuid.UUID, int] = field(default_factory=dict)
    holding_rows: list[Holding] = field(default_factory=list)
    outbox: list[Event[Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        async with self.lock:
            tx = FakeTransaction(self)
            yield tx
            self.rows |= tx.rows
            for workspace_id in tx.rows:
                self.order.setdefault(workspace_id, len(self.order))
            self.holding_rows = tx.holding_rows
            self.outbox += tx.outbox
            opened = [h.workspace_id for h in self.holding_rows if h.ended_at is None]
            assert len(opened) == len(set(opened)), "two open holdings of one environment"

    def _fifo(self, found: list[Workspace]) -> list[Workspace]:
        return sorted(
            found,
            key=lambda w: (w.queued_at or w.requested_at, self.order.get(w.workspace_id, 1 << 30)),
        )

    async def get(self, workspace_id: uuid.UUID) -> Workspace | None:
        found = self.rows.get(workspace_id)
        return None if found is None else found.model_copy(deep=True)

    async def holdings(
        self, since: datetime, until: datetime, *, owner: str | None = None
    ) -> list[Holding]:
        return [
            h
            for h in self.holding_rows
            if h.started_at < until
            and (h.ended_at is None or h.ended_at > since)
            and owner in (None, h.owner)
        ]

    async def list(
        self, *, owner: str | None = None, states: frozenset[WorkspaceState] | None = None
    ) -> list[Workspace]:
        found = [
            w.model_copy(deep=True)
            for w in self.rows.values()
            if owner in (None, w.owner) and (states is None or w.state in states)
        ]
        return self._fifo(found)

    # --- for assertions -------------------------------------------------------------------

    def events(self, event_type: type[Event[Any]]) -> list[Any]:
        return [e for e in self.outbox if isinstance(e, event_type)]

    def state(self, workspace_id: uuid.UUID) -> WorkspaceState:
        return self.rows[workspace_id].state


class FakeTransaction:
    def __init__(self, store: FakeStore) -> None:
        self._store = store
        self.rows: dict[uuid.UUID, Workspace] = {}
        self.holding_rows = [h.model_copy() for h in store.holding_rows]
        self.outbox: list[Event[Any]] = []

    def _current(self, workspace_id: uuid.UUID) -> Workspace | None:
        found = self.rows.get(workspace_id) or self._store.rows.get(workspace_id)
        return None if found is None else found.model_copy(deep=True)

    async def lock(self, workspace_id: uuid.UUID) -> Workspace | None:
        return self._current(workspace_id)

    async def lock_admission(self) -> list[Workspace]:
        merged = self._store.rows | self.rows
        live = [w.model_copy(deep=True) for w in merged.values() if not w.state.terminal]
        return self._store._fifo(live)

    async def by_request(self, owner: str, request_id: uuid.UUID) -> Workspace | None:
        for workspace in (self._store.rows | self.rows).values():
            if workspace.owner == owner and workspace.request_id == request_id:
                return workspace.model_copy(deep=True)
        return None

    async def save(self, workspace: Workspace) -> None:
        self.rows[workspace.workspace_id] = workspace.model_copy(
            deep=True, update={"queue_position": None}
        )

    async def open_holding(self, holding: Holding) -> None:
        self.holding_rows.append(holding)

    async def close_holding(
        self, workspace_id: uuid.UUID, ended_at: datetime, reason: StopReason
    ) -> None:
        for n, holding in enumerate(self.holding_rows):
            if holding.workspace_id == workspace_id and holding.ended_at is None:
                self.holding_rows[n] = holding.model_copy(
                    update={"ended_at": ended_at, "reason": reason}
                )

    async def emit(self, event: Event[Any]) -> None:
        self.outbox.append(event)


@dataclass
class FakeBackend:
    """Records what it was told; environments become ready when a test says so."""

    calls: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    created: set[uuid.UUID] = field(default_factory=set)
    ready: set[uuid.UUID] = field(default_factory=set)
    failed: dict[uuid.UUID, str] = field(default_factory=dict)
    activity: dict[uuid.UUID, datetime] = field(default_factory=dict)
    volumes: set[uuid.UUID] = field(default_factory=set)
    """Home volumes that exist: made by create, kept by stop, removed by delete."""
    broken: set[uuid.UUID] = field(default_factory=set)
    """Environments whose status call raises."""
    refuse_create: Exception | None = None

    async def create(self, workspace: Workspace) -> None:
        self.calls.append(("create", workspace.workspace_id))
        if self.refuse_create is not None:
            raise self.refuse_create
        self.created.add(workspace.workspace_id)
        self.volumes.add(workspace.workspace_id)

    async def status(self, workspace: Workspace) -> BackendStatus:
        workspace_id = workspace.workspace_id
        if workspace_id in self.broken:
            raise RuntimeError("status call failed")
        activity = self.activity.get(workspace_id)
        if workspace_id in self.failed:
            return BackendStatus(phase=BackendPhase.FAILED, message=self.failed[workspace_id])
        if workspace_id not in self.created:
            return BackendStatus(phase=BackendPhase.GONE)
        if workspace_id in self.ready:
            return BackendStatus(
                phase=BackendPhase.READY,
                connection=Connection(
                    url=f"https://ide.test/{workspace_id}/", token="t0k", ide="code-server"
                ),
                last_activity_at=activity,
            )
        return BackendStatus(phase=BackendPhase.PENDING, message="pulling the image")

    async def stop(self, workspace: Workspace) -> None:
        self.calls.append(("stop", workspace.workspace_id))
        self.created.discard(workspace.workspace_id)
        self.ready.discard(workspace.workspace_id)

    async def delete(self, workspace: Workspace) -> None:
        self.calls.append(("delete", workspace.workspace_id))
        self.created.discard(workspace.workspace_id)
        self.ready.discard(workspace.workspace_id)
        self.volumes.discard(workspace.workspace_id)

    async def close(self) -> None:
        return None

    def made(self, action: str, workspace_id: uuid.UUID) -> int:
        return self.calls.count((action, workspace_id))


def spec(gpu_type: str = "a100", gpu_count: int = 1, **changes: Any) -> WorkspaceSpec:
    return WorkspaceSpec(
        image="ghcr.io/acme/dev:1", gpu_type=gpu_type, gpu_count=gpu_count, **changes
    )


ADA = Engineer("ada", "Ada")
BOB = Engineer("bob", "Bob")
CY = Engineer("cy", "Cy")


@dataclass
class Harness:
    store: FakeStore
    backend: FakeBackend
    clock: FakeClock
    workspaces: Workspaces

    async def ready(self, workspace_id: uuid.UUID) -> Workspace:
        """Let the supervisor create it, the backend report it ready, and the next pass see it."""
        await self.workspaces.tick()
        self.backend.ready.add(workspace_id)
        await self.workspaces.tick()
        found = await self.store.get(workspace_id)
        assert found is not None
        assert found.state is WorkspaceState.READY, found
        return found


def harness(
    *,
    capacity: dict[str, int] | None = None,
    quota: Quota | None = None,
    lifetime: Lifetime | None = None,
    provision_timeout_s: float = 600,
    quotas: dict[str, Quota] | None = None,
) -> Harness:
    store, backend, clock = FakeStore(), FakeBackend(), FakeClock()
    default = quota or Quota(max_gpus=4, max_environments=3)
    workspaces = Workspaces(
        store,
        backend,
        backend_name="fake",
        capacity=capacity if capacity is not None else {"a100": 2, "a100/mig-1g.10gb": 7},
        quota_of=lambda owner: (quotas or {}).get(owner, default),
        lifetime=lifetime or Lifetime(),
        provision_timeout_s=provision_timeout_s,
        clock=clock,
    )
    return Harness(store, backend, clock, workspaces)


# --- the API on the fakes ------------------------------------------------------------------------


@dataclass
class Api:
    harness: Harness
    key: str
    client: httpx.AsyncClient

    def token(self, subject: str, *roles: str, expires_in: int = 600) -> dict[str, str]:
        token = issue_dev_token(self.key, subject=subject, roles=roles, expires_in=expires_in)
        return {"Authorization": f"Bearer {token}"}


def api_app(workspaces: Workspaces, verifier: TokenVerifier | None) -> FastAPI:
    app = ServiceAPI()
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    app.state.workspaces = workspaces
    if verifier is not None:
        app.state.token_verifier = verifier
    return app


@asynccontextmanager
async def api(built: Harness, *, auth: bool = True) -> AsyncIterator[Api]:
    key = generate_dev_key()
    verifier = TokenVerifier(AuthSettings(dev_signing_key=SecretStr(key))) if auth else None
    app = api_app(built.workspaces, verifier)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Api(built, key, client)
    if verifier is not None:
        await verifier.aclose()


# --- real local environments -------------------------------------------------------------------


def workspace_of(workspace_id: uuid.UUID, ide: str = "code-server") -> Workspace:
    return Workspace(
        workspace_id=workspace_id,
        owner="ada",
        spec=spec(ide=ide),
        state=WorkspaceState.PROVISIONING,
        requested_at=START,
    )


async def stop_everything_under(root: Any) -> None:
    """Stop every local environment left under ``root`` (a test that failed half-way)."""
    from flywheel_workspaces.adapters.local import LocalBackend

    if not root.exists():
        return
    backend = LocalBackend(root, stop_grace_s=1)
    try:
        for folder in root.iterdir():
            await backend.stop(workspace_of(uuid.UUID(folder.name)))
    finally:
        await backend.close()
