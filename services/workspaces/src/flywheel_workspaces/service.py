"""The workspaces' use cases: plain async methods over the ports, the rules from ``policy``.

A request is checked (could it ever start? is it within its engineer's quota?) and queued in one
transaction under the admission lock, in which whatever fits is also admitted; the transaction
queues workspace.requested in the outbox. An admitted environment holds its GPUs from then on
(a holding interval opens) and is created on the backend by the supervisor's ``tick``, which
also:

* admits queued environments as GPUs come free (first come, first served per pool);
* marks provisioning environments ready when the backend says so (workspace.ready), or
  failed when the backend fails them or they are not ready within ``provision_timeout_s``;
* stops ready environments whose TTL ran out or that stayed idle too long: the compute goes,
  the home volume stays, the holding interval closes and workspace.expired goes out;
* fails ready environments the backend lost.

Every backend call that changes an environment is made while its row is locked and after its
state was checked again under the lock, so an owner's DELETE and the supervisor never act on
one environment at once. Backend calls are idempotent: one repeated after a crash (the state
change was not committed) does no harm.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog

from flywheel_contracts import (
    WorkspaceExpiredPayload,
    WorkspaceExpiredV1,
    WorkspaceExpiryReason,
    WorkspaceReadyPayload,
    WorkspaceReadyV1,
    WorkspaceRequestedPayload,
    WorkspaceRequestedV1,
)
from flywheel_runtime.errors import FlywheelError, InvalidInputError
from flywheel_workspaces import policy
from flywheel_workspaces.errors import WorkspaceNotFoundError, WorkspaceStateError
from flywheel_workspaces.policy import Clock, Lifetime, Quota, UsageReport
from flywheel_workspaces.ports import (
    BackendPhase,
    BackendStatus,
    Holding,
    StopReason,
    Workspace,
    WorkspaceBackend,
    WorkspaceSpec,
    WorkspaceState,
    WorkspaceStore,
    WorkspaceTransaction,
)

log = structlog.get_logger(__name__)

HOLDING_STATES = frozenset({WorkspaceState.PROVISIONING, WorkspaceState.READY})
LISTED_BY_DEFAULT = frozenset(WorkspaceState) - {WorkspaceState.DELETED}
RESTARTABLE = frozenset({WorkspaceState.STOPPED, WorkspaceState.FAILED})

Change = Callable[[WorkspaceTransaction, Workspace], Awaitable[None]]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Engineer:
    """Who asks: the token's subject (the owner of what they create) and user name."""

    subject: str
    name: str | None = None


class Workspaces:
    """Queues, admits, watches, expires and deletes development environments."""

    def __init__(
        self,
        store: WorkspaceStore,
        backend: WorkspaceBackend,
        *,
        backend_name: str,
        capacity: Mapping[str, int],
        quota_of: Callable[[str], Quota],
        lifetime: Lifetime,
        provision_timeout_s: float,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._backend = backend
        self._backend_name = backend_name
        self._capacity = dict(capacity)
        self._quota_of = quota_of
        self._lifetime = lifetime
        self._provision_timeout = timedelta(seconds=provision_timeout_s)
        self._clock = clock
        self.changed = asyncio.Event()
        """Set when GPUs may have come free or work was queued: the supervisor ticks now."""
        self._freed = False

    # --- an engineer's requests -------------------------------------------------------------

    async def request(
        self, engineer: Engineer, spec: WorkspaceSpec, request_id: uuid.UUID | None = None
    ) -> Workspace:
        """Reacts to an engineer asking for an environment: queues it, admitting it at once
        when its GPUs are free; emits workspace.requested. The same ``request_id`` from the
        same engineer returns the environment the first request created."""
        spec = spec.model_copy(update={"ttl_s": policy.capped_ttl(spec.ttl_s, self._lifetime)})
        policy.check_satisfiable(spec, self._capacity)
        async with self._store.transaction() as tx:
            live = await tx.lock_admission()
            if request_id is not None:
                existing = await tx.by_request(engineer.subject, request_id)
                if existing is not None:
                    return (await self._decorated([existing]))[0]
            policy.check_quota(live, spec, self._quota_of(engineer.subject), owner=engineer.subject)
            now = self._clock()
            workspace = Workspace(
                workspace_id=uuid.uuid4(),
                owner=engineer.subject,
                owner_name=engineer.name,
                spec=spec,
                state=WorkspaceState.QUEUED,
                requested_at=now,
                queued_at=now,
                request_id=request_id,
            )
            await tx.save(workspace)
            workspace = await self._enqueued(tx, live, workspace, now, resumed=False)
        self.changed.set()
        log.info(
            "environment requested",
            workspace_id=str(workspace.workspace_id),
            owner=workspace.owner,
            pool=policy.pool_of(spec),
            gpu_count=spec.gpu_count,
            state=workspace.state.value,
            queue_position=workspace.queue_position,
        )
        return workspace

    async def start(self, workspace_id: uuid.UUID, owner: str | None) -> Workspace:
        """Reacts to an engineer starting a stopped (or failed) environment again on its kept
        home volume: queued like a new request; emits workspace.requested (``resumed``)."""
        async with self._store.transaction() as tx:
            live = await tx.lock_admission()
            current = _owned(await tx.lock(workspace_id), workspace_id, owner)
            if current.state not in RESTARTABLE:
                raise WorkspaceStateError(
                    f"environment {workspace_id} is {current.state.value}: only a stopped or "
                    "failed one can be started again",
                    details={"workspace_id": str(workspace_id), "state": current.state.value},
                )
            policy.check_quota(
                live, current.spec, self._quota_of(current.owner), owner=current.owner
            )
            now = self._clock()
            restarted = current.model_copy(
                update={
                    "state": WorkspaceState.QUEUED,
                    "queued_at": now,
                    "started_at": None,
                    "ready_at": None,
                    "expires_at": None,
                    "last_activity_at": None,
                    "ended_at": None,
                    "stop_reason": None,
                    "connection": None,
                    "message": None,
                    "extensions": 0,
                    "extended_s": 0,
                }
            )
            await tx.save(restarted)
            workspace = await self._enqueued(tx, live, restarted, now, resumed=True)
        self.changed.set()
        log.info("environment started again", workspace_id=str(workspace_id))
        return workspace

    async def delete(self, workspace_id: uuid.UUID, owner: str | None) -> Workspace:
        """Reacts to an engineer (``owner``) or an operator (None) deleting an environment:
        its compute and home volume are removed and its GPUs freed; emits nothing."""
        async with self._store.transaction() as tx:
            current = _owned(await tx.lock(workspace_id), workspace_id, owner)
            if current.state is WorkspaceState.DELETED:
                return current
            await self._backend.delete(current)
            if current.state.terminal:
                current.state = WorkspaceState.DELETED
                await tx.save(current)
            else:
                reason = StopReason.OWNER if owner is not None else StopReason.OPERATOR
                await self._end(tx, current, WorkspaceState.DELETED, reason)
        self.changed.set()
        log.info("environment deleted", workspace_id=str(workspace_id), by_owner=owner is not None)
        return current

    async def extend(self, workspace_id: uuid.UUID, owner: str | None, seconds: int) -> Workspace:
        """Reacts to an engineer asking for more time: the TTL grows up to the caps."""
        async with self._store.transaction() as tx:
            current = _owned(await tx.lock(workspace_id), workspace_id, owner)
            if current.state.terminal:
                raise WorkspaceStateError(
                    f"environment {workspace_id} is {current.state.value}: only one that has "
                    "not ended can be extended",
                    details={"workspace_id": str(workspace_id), "state": current.state.value},
                )
            granted = policy.extension(current, seconds, self._lifetime)
            current.extensions += 1
            current.extended_s += granted
            if current.ready_at is not None:
                current.expires_at = policy.expiry(current, current.ready_at)
            await tx.save(current)
        log.info(
            "environment extended",
            workspace_id=str(workspace_id),
            asked_s=seconds,
            granted_s=granted,
            expires_at=current.expires_at.isoformat() if current.expires_at else None,
        )
        return (await self._decorated([current]))[0]

    # --- reading ----------------------------------------------------------------------------

    async def environment(self, workspace_id: uuid.UUID, owner: str | None) -> Workspace:
        """One environment; an engineer (``owner``) sees only their own."""
        found = _owned(await self._store.get(workspace_id), workspace_id, owner)
        return (await self._decorated([found]))[0]

    async def environments(
        self, owner: str | None, states: Iterable[WorkspaceState] = ()
    ) -> list[Workspace]:
        """Environments (an engineer's, or everyone's), newest first; deleted ones only when
        asked for by state."""
        wanted = frozenset(states) or LISTED_BY_DEFAULT
        found = await self._store.list(owner=owner, states=wanted)
        return list(reversed(await self._decorated(found)))

    async def usage(self, since: datetime | None, until: datetime | None) -> UsageReport:
        """GPU-hours per engineer and GPU kind over ``[since, until)`` (default: 30 days to
        now)."""
        since, until = self._window(since, until)
        holdings = await self._store.holdings(since, until)
        return policy.usage_report(holdings, since, until, self._clock())

    async def holdings(
        self, since: datetime | None, until: datetime | None, owner: str | None = None
    ) -> list[Holding]:
        """The audit: who held which GPUs from when to when, over ``[since, until)``."""
        since, until = self._window(since, until)
        return await self._store.holdings(since, until, owner=owner)

    def _window(self, since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
        until = until or self._clock()
        since = since or until - timedelta(days=30)
        for name, value in (("since", since), ("until", until)):
            if value.tzinfo is None:
                raise InvalidInputError(
                    f"{name} needs a time zone (…Z or …+00:00)", details={"field": name}
                )
        if since >= until:
            raise InvalidInputError(
                "since must be before until",
                details={"field": "since", "since": since.isoformat(), "until": until.isoformat()},
            )
        return since, until

    async def _decorated(self, workspaces: list[Workspace]) -> list[Workspace]:
        """Queued environments with their place in the queue and what they wait for."""
        if not any(w.state is WorkspaceState.QUEUED for w in workspaces):
            return workspaces
        queued = await self._store.list(states=frozenset({WorkspaceState.QUEUED}))
        positions = policy.queue_positions(queued)
        return [_with_position(w, positions) for w in workspaces]

    # --- the supervisor's pass --------------------------------------------------------------

    async def tick(self) -> None:
        """Admits what fits, then checks on every environment holding GPUs: creates admitted
        ones, emits workspace.ready and workspace.expired, fails what the backend lost."""
        async with self._store.transaction() as tx:
            live = await tx.lock_admission()
            admitted = await self._admit(tx, live, self._clock())
        for workspace in admitted.values():
            log.info("environment admitted", workspace_id=str(workspace.workspace_id))
        for workspace in await self._store.list(states=HOLDING_STATES):
            try:
                if workspace.state is WorkspaceState.PROVISIONING:
                    await self._provision(workspace)
                else:
                    await self._watch(workspace)
            except Exception as error:
                # One environment's trouble (its backend call failed) must not stall the rest;
                # the next pass tries it again.
                log.warning(
                    "environment check failed; retrying",
                    workspace_id=str(workspace.workspace_id),
                    error=repr(error),
                )

    async def _provision(self, workspace: Workspace) -> None:
        status = await self._backend.status(workspace)
        workspace_id = workspace.workspace_id
        if status.phase is BackendPhase.GONE:
            await self._locked(workspace_id, WorkspaceState.PROVISIONING, self._create)
        elif status.phase is BackendPhase.READY:
            await self._locked(
                workspace_id,
                WorkspaceState.PROVISIONING,
                lambda tx, current: self._ready(tx, current, status),
            )
        elif status.phase is BackendPhase.FAILED:
            message = status.message or "the backend reports that it failed"
            await self._locked(
                workspace_id,
                WorkspaceState.PROVISIONING,
                lambda tx, current: self._fail(tx, current, message),
            )
        elif (
            workspace.started_at is not None
            and self._clock() - workspace.started_at > self._provision_timeout
        ):
            limit = int(self._provision_timeout.total_seconds())
            message = f"not ready within {limit} s" + (
                f" ({status.message})" if status.message else ""
            )
            await self._locked(
                workspace_id,
                WorkspaceState.PROVISIONING,
                lambda tx, current: self._fail(tx, current, message),
            )
        elif status.message != workspace.message:
            await self._locked(
                workspace_id,
                WorkspaceState.PROVISIONING,
                lambda tx, current: self._note(tx, current, status.message),
            )

    async def _watch(self, workspace: Workspace) -> None:
        workspace_id = workspace.workspace_id
        if policy.ttl_expired(workspace, self._clock()):
            await self._locked(
                workspace_id,
                WorkspaceState.READY,
                lambda tx, current: self._settle(tx, current, None),
            )
            return
        status = await self._backend.status(workspace)
        if status.phase in (BackendPhase.GONE, BackendPhase.FAILED):
            message = status.message or "the backend lost the environment"
            await self._locked(
                workspace_id,
                WorkspaceState.READY,
                lambda tx, current: self._fail(tx, current, message),
            )
            return
        await self._locked(
            workspace_id,
            WorkspaceState.READY,
            lambda tx, current: self._settle(tx, current, status),
        )

    async def _locked(self, workspace_id: uuid.UUID, state: WorkspaceState, change: Change) -> None:
        """Apply ``change`` to the environment under its row lock, if it is still in ``state``."""
        async with self._store.transaction() as tx:
            current = await tx.lock(workspace_id)
            if current is None or current.state is not state:
                return
            await change(tx, current)
        if self._freed:
            self._freed = False
            self.changed.set()  # GPUs came free: admit from the queue now

    # --- steps (in the caller's transaction, the environment locked) -----------------------

    async def _enqueued(
        self,
        tx: WorkspaceTransaction,
        live: list[Workspace],
        workspace: Workspace,
        now: datetime,
        *,
        resumed: bool,
    ) -> Workspace:
        """Admit what fits now that ``workspace`` is queued; emit its workspace.requested."""
        others = [w for w in live if w.workspace_id != workspace.workspace_id]
        admitted = await self._admit(tx, [*others, workspace], now)
        after = [admitted.get(w.workspace_id, w) for w in [*others, workspace]]
        current = _with_position(
            admitted.get(workspace.workspace_id, workspace), policy.queue_positions(after)
        )
        await tx.emit(_requested_event(current, resumed=resumed))
        return current

    async def _admit(
        self, tx: WorkspaceTransaction, live: list[Workspace], now: datetime
    ) -> dict[uuid.UUID, Workspace]:
        """Start holding GPUs for every queued environment that fits (under the admission
        lock, which the caller holds)."""
        admitted: dict[uuid.UUID, Workspace] = {}
        for candidate in policy.admit(live, self._capacity):
            current = await tx.lock(candidate.workspace_id)
            if current is None or current.state is not WorkspaceState.QUEUED:
                continue  # deleted since it was read
            current.state = WorkspaceState.PROVISIONING
            current.started_at = now
            current.message = None
            await tx.save(current)
            await tx.open_holding(
                Holding(
                    workspace_id=current.workspace_id,
                    owner=current.owner,
                    owner_name=current.owner_name,
                    gpu_type=current.spec.gpu_type,
                    gpu_count=current.spec.gpu_count,
                    mode=current.spec.mode,
                    mig_profile=current.spec.mig_profile,
                    started_at=now,
                )
            )
            admitted[current.workspace_id] = current
        return admitted

    async def _create(self, tx: WorkspaceTransaction, current: Workspace) -> None:
        try:
            await self._backend.create(current)
        except FlywheelError as error:
            if error.retryable:
                raise  # the backend is unreachable: the next pass tries again
            message = f"could not be created: {error.message}"
        except Exception as error:
            log.exception(
                "environment could not be created", workspace_id=str(current.workspace_id)
            )
            message = f"could not be created ({type(error).__name__}; see the service log)"
        else:
            log.info("environment created", workspace_id=str(current.workspace_id))
            return
        await self._fail(tx, current, message)

    async def _ready(
        self, tx: WorkspaceTransaction, current: Workspace, status: BackendStatus
    ) -> None:
        now = self._clock()
        expires_at = policy.expiry(current, now)
        current.state = WorkspaceState.READY
        current.ready_at = now
        current.expires_at = expires_at
        current.connection = status.connection
        current.last_activity_at = status.last_activity_at
        current.message = status.message
        await tx.save(current)
        await tx.emit(_ready_event(current, self._backend_name, now, expires_at))
        log.info(
            "environment ready",
            workspace_id=str(current.workspace_id),
            expires_at=expires_at.isoformat(),
        )

    async def _settle(
        self, tx: WorkspaceTransaction, current: Workspace, status: BackendStatus | None
    ) -> None:
        """Record the backend's last activity; stop the environment if its TTL ran out or it
        has been idle too long (keeping its home volume); emits workspace.expired."""
        changed = False
        if status is not None:
            seen = status.last_activity_at
            if seen is not None and (
                current.last_activity_at is None or seen > current.last_activity_at
            ):
                current.last_activity_at = seen
                changed = True
            if status.connection is not None and status.connection != current.connection:
                current.connection = status.connection
                changed = True
        reason = policy.shutdown_reason(current, self._clock(), self._lifetime.idle_timeout_s)
        if reason is None:
            if changed:
                await tx.save(current)
            return
        started_at = current.started_at or current.ready_at
        await self._backend.stop(current)
        ended_at = await self._end(tx, current, WorkspaceState.STOPPED, reason)
        await tx.emit(_expired_event(current, reason, started_at or ended_at, ended_at))
        log.info(
            "environment stopped",
            workspace_id=str(current.workspace_id),
            reason=reason.value,
            home_kept=True,
        )

    async def _fail(self, tx: WorkspaceTransaction, current: Workspace, message: str) -> None:
        """Remove what the backend has of a broken environment (its home volume stays)."""
        await self._backend.stop(current)
        await self._end(tx, current, WorkspaceState.FAILED, StopReason.BACKEND, message)
        log.warning("environment failed", workspace_id=str(current.workspace_id), message=message)

    async def _note(
        self, tx: WorkspaceTransaction, current: Workspace, message: str | None
    ) -> None:
        current.message = message
        await tx.save(current)

    async def _end(
        self,
        tx: WorkspaceTransaction,
        current: Workspace,
        state: WorkspaceState,
        reason: StopReason,
        message: str | None = None,
    ) -> datetime:
        """Close the environment (and its holding interval, if it held GPUs); returns when."""
        now = self._clock()
        held = current.state.holds_gpus
        current.state = state
        current.ended_at = now
        current.stop_reason = reason
        current.connection = None
        current.queue_position = None
        if message is not None:
            current.message = message
        elif state is WorkspaceState.STOPPED:
            current.message = (
                f"stopped ({reason.value}); the home volume is kept: start it again to use it"
            )
        else:
            current.message = None
        await tx.save(current)
        if held:
            await tx.close_holding(current.workspace_id, now, reason)
            self._freed = True
        return now


# --- helpers -----------------------------------------------------------------------------------


def _owned(found: Workspace | None, workspace_id: uuid.UUID, owner: str | None) -> Workspace:
    """``found`` if the caller may see it; anyone else's is as unknown as a missing one."""
    if found is None or (owner is not None and found.owner != owner):
        raise WorkspaceNotFoundError(
            f"environment {workspace_id} does not exist",
            details={"workspace_id": str(workspace_id)},
        )
    return found


def _with_position(workspace: Workspace, positions: Mapping[uuid.UUID, int]) -> Workspace:
    if workspace.state is not WorkspaceState.QUEUED:
        return workspace
    position = positions.get(workspace.workspace_id)
    spec = workspace.spec
    ahead = "" if position is None else f"; {position - 1} ahead of it"
    return workspace.model_copy(
        update={
            "queue_position": position,
            "message": f"waiting for {spec.gpu_count} free GPU(s) of pool "
            f"{policy.pool_of(spec)!r}{ahead}",
        }
    )


def _about(workspace: Workspace) -> dict[str, Any]:
    spec = workspace.spec
    return {
        "workspace_id": workspace.workspace_id,
        "owner": workspace.owner,
        "gpu_type": spec.gpu_type,
        "gpu_count": spec.gpu_count,
        "mode": spec.mode.value,
        "mig_profile": spec.mig_profile,
    }


def _envelope(workspace: Workspace) -> dict[str, Any]:
    # One correlation id follows an environment through all its events.
    return {"correlation_id": workspace.workspace_id}


def _requested_event(workspace: Workspace, *, resumed: bool) -> WorkspaceRequestedV1:
    state: Literal["queued", "provisioning"] = (
        "queued" if workspace.state is WorkspaceState.QUEUED else "provisioning"
    )
    payload = WorkspaceRequestedPayload(
        **_about(workspace),
        image=workspace.spec.image,
        ttl_s=workspace.spec.ttl_s,
        state=state,
        queue_position=workspace.queue_position,
        resumed=resumed,
    )
    return WorkspaceRequestedV1.model_validate(_envelope(workspace) | {"payload": payload})


def _ready_event(
    workspace: Workspace, backend: str, ready_at: datetime, expires_at: datetime
) -> WorkspaceReadyV1:
    waited = ready_at - (workspace.queued_at or workspace.requested_at)
    payload = WorkspaceReadyPayload(
        **_about(workspace),
        ready_at=ready_at,
        expires_at=expires_at,
        waited_s=max(0.0, waited.total_seconds()),
        backend=backend,
    )
    return WorkspaceReadyV1.model_validate(_envelope(workspace) | {"payload": payload})


def _expired_event(
    workspace: Workspace, reason: StopReason, started_at: datetime, ended_at: datetime
) -> WorkspaceExpiredV1:
    payload = WorkspaceExpiredPayload(
        **_about(workspace),
        reason=WorkspaceExpiryReason(reason.value),
        started_at=started_at,
        ended_at=ended_at,
        held_s=max(0.0, (ended_at - started_at).total_seconds()),
        home_kept=True,
    )
    return WorkspaceExpiredV1.model_validate(_envelope(workspace) | {"payload": payload})
