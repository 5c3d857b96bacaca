"""The rules that keep GPUs from being hoarded: plain functions, no I/O and no clock.

Every function that depends on the time takes ``now``; the service reads it from an injected
``Clock``, so tests move time at will.

**Pools.** GPUs are handed out from pools, one per GPU kind and way of sharing it
(``pool_of``): ``a100`` (whole GPUs), ``a100/mig-1g.10gb`` (MIG slices of one profile),
``a100/time-sliced``, ``a100/mps`` (and ``cpu`` for environments without GPUs, which never
wait). The settings' ``gpus`` inventory gives each pool's
capacity; a request for a pool that is not there, or for more than the pool has in all, could
never start and is refused as invalid input (422) naming the field at fault.

**Quotas.** Per engineer, at most ``max_environments`` environments not yet ended and at most
``max_gpus`` GPUs (a MIG slice or a share counts as one) in them. Queued environments count:
a queued request is a claim on GPUs, so the queue never holds more than quotas allow and an
environment admitted from it never takes its owner over quota. A request over quota is refused
(409 ``quota_exceeded``) with the limit it hit, its value and what is in use.

**Queue.** When its pool has not enough free GPUs, an environment waits, first come first
served per pool. The queue is strict: a request that does not fit blocks the ones behind it in
the same pool (no backfilling), so a large request is never starved by a stream of small ones.
Positions are 1-based and per pool. Admission runs on every request and every supervisor pass,
so freed GPUs are handed on without anyone asking.

**TTL.** An environment lives ``ttl_s`` from readiness, at most ``max_ttl_s``. ``:extend``
adds time, at most ``max_extensions`` times and never past ``max_lifetime_s`` from readiness
(a request beyond that is granted the rest; one with nothing left is refused, 409). Before
readiness an extension adds to the TTL it will start with.

**Idle.** A ready environment without activity (the backend's ``last_activity_at``, or its
readiness when the backend has seen none) for ``idle_timeout_s`` is shut down. Expiry and idle
shutdown stop the compute and keep the home volume.

**Usage.** Each holding interval (admission to stop) is recorded; the report clips them to the
asked window, open ones at ``now``, and adds up GPU-hours (``gpu_count`` times hours) per engineer
and GPU kind.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from flywheel_workspaces.errors import (
    ExtensionRefusedError,
    QuotaExceededError,
    UnsatisfiableRequestError,
)
from flywheel_workspaces.ports import (
    AllocationMode,
    Holding,
    StopReason,
    Workspace,
    WorkspaceSpec,
    WorkspaceState,
)

Clock = Callable[[], datetime]
"""Where the service reads the time from (tests pass a controllable one)."""

CPU_ONLY = "cpu"
"""The pool of environments without GPUs: unbounded, so they never wait."""


class Quota(BaseModel):
    """What one engineer may hold at once (queued environments included)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    max_gpus: int = Field(default=2, ge=0)
    """GPUs, MIG slices or shares in the engineer's environments that have not ended."""
    max_environments: int = Field(default=2, ge=0)
    """Environments of the engineer that have not ended (queued, provisioning, ready)."""


class Lifetime(BaseModel):
    """How long environments live."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    max_ttl_s: int = Field(default=12 * 3600, ge=60)
    """Longest TTL a request may ask for; a longer one is cut to this."""
    max_lifetime_s: int = Field(default=24 * 3600, ge=60)
    """Longest an environment may live from readiness, extensions included."""
    max_extensions: int = Field(default=3, ge=0)
    """How many times an environment's TTL may be extended."""
    idle_timeout_s: int | None = Field(default=3600, ge=60)
    """A ready environment without activity for this long is shut down; unset: never."""


# --- pools and capacity ------------------------------------------------------------------------


def pool_of(spec: WorkspaceSpec) -> str:
    """The pool a request draws from: its GPU kind and how the GPUs are shared (``cpu`` for
    an environment without GPUs, which never waits)."""
    if spec.gpu_count == 0:
        return CPU_ONLY
    if spec.mode is AllocationMode.FULL:
        return spec.gpu_type
    if spec.mode is AllocationMode.MIG:
        return f"{spec.gpu_type}/mig-{spec.mig_profile}"
    return f"{spec.gpu_type}/{spec.mode.value}"


def check_satisfiable(spec: WorkspaceSpec, capacity: Mapping[str, int]) -> None:
    """Refuse a request that could never start: an unknown pool, or more than it has."""
    if spec.gpu_count == 0:
        return
    pool = pool_of(spec)
    size = capacity.get(pool)
    if size is None:
        kinds = sorted({name.split("/", 1)[0] for name in capacity})
        if spec.gpu_type not in kinds:
            raise UnsatisfiableRequestError(
                f"there are no {spec.gpu_type!r} GPUs here; "
                f"GPU kinds: {', '.join(kinds) or 'none'}",
                details={"field": "gpu_type", "gpu_type": spec.gpu_type, "kinds": kinds},
            )
        offered = sorted(name for name in capacity if name.split("/", 1)[0] == spec.gpu_type)
        field = "mig_profile" if spec.mode is AllocationMode.MIG else "mode"
        raise UnsatisfiableRequestError(
            f"{spec.gpu_type} GPUs are not offered as {pool!r}; pools of that kind: "
            f"{', '.join(offered)}",
            details={"field": field, "pool": pool, "pools": offered},
        )
    if spec.gpu_count > size:
        raise UnsatisfiableRequestError(
            f"{spec.gpu_count} GPUs asked for, but pool {pool!r} has {size} in all: the "
            "request could never start",
            details={"field": "gpu_count", "pool": pool, "capacity": size},
        )


def in_use(workspaces: Iterable[Workspace]) -> Counter[str]:
    """GPUs held per pool (provisioning and ready environments)."""
    used: Counter[str] = Counter()
    for workspace in workspaces:
        if workspace.state.holds_gpus:
            used[pool_of(workspace.spec)] += workspace.spec.gpu_count
    return used


# --- quotas ------------------------------------------------------------------------------------


def check_quota(
    owned: Iterable[Workspace], spec: WorkspaceSpec, quota: Quota, *, owner: str
) -> None:
    """Refuse a request that would take its owner over ``quota``.

    ``owned`` is every environment of the owner; those that ended do not count.
    """
    live = [w for w in owned if w.owner == owner and not w.state.terminal]
    if len(live) + 1 > quota.max_environments:
        raise QuotaExceededError(
            f"quota exceeded: {len(live)} of your environments have not ended and "
            f"max_environments is {quota.max_environments}; delete one first",
            details={
                "limit": "max_environments",
                "allowed": quota.max_environments,
                "in_use": len(live),
                "requested": 1,
            },
        )
    gpus = sum(w.spec.gpu_count for w in live)
    if gpus + spec.gpu_count > quota.max_gpus:
        raise QuotaExceededError(
            f"quota exceeded: your environments hold or wait for {gpus} GPUs and this one asks "
            f"for {spec.gpu_count}, more than max_gpus {quota.max_gpus}",
            details={
                "limit": "max_gpus",
                "allowed": quota.max_gpus,
                "in_use": gpus,
                "requested": spec.gpu_count,
            },
        )


# --- the queue ---------------------------------------------------------------------------------


def _fifo(workspaces: Iterable[Workspace]) -> list[Workspace]:
    """Queued environments in queue order (a stable sort keeps the store's tie order)."""
    queued = [w for w in workspaces if w.state is WorkspaceState.QUEUED]
    return sorted(queued, key=lambda w: w.queued_at or w.requested_at)


def admit(workspaces: Sequence[Workspace], capacity: Mapping[str, int]) -> list[Workspace]:
    """The queued environments to start now, in queue order.

    ``workspaces`` is every environment that has not ended; per pool the queue is served
    first come first served until one does not fit, which holds the rest of that pool back.
    """
    used = in_use(workspaces)
    blocked: set[str] = set()
    chosen: list[Workspace] = []
    for workspace in _fifo(workspaces):
        need = workspace.spec.gpu_count
        if need == 0:
            chosen.append(workspace)  # CPU only: nothing to wait for
            continue
        pool = pool_of(workspace.spec)
        if pool in blocked:
            continue
        if used[pool] + need <= capacity.get(pool, 0):
            used[pool] += need
            chosen.append(workspace)
        else:
            blocked.add(pool)
    return chosen


def queue_positions(workspaces: Iterable[Workspace]) -> dict[uuid.UUID, int]:
    """1-based place of each queued environment in its pool's queue."""
    seen: Counter[str] = Counter()
    positions: dict[uuid.UUID, int] = {}
    for workspace in _fifo(workspaces):
        pool = pool_of(workspace.spec)
        seen[pool] += 1
        positions[workspace.workspace_id] = seen[pool]
    return positions


# --- TTL and idle ------------------------------------------------------------------------------


def capped_ttl(requested_s: int, lifetime: Lifetime) -> int:
    """The TTL an environment gets: what was asked, at most ``max_ttl_s`` and the lifetime."""
    return min(requested_s, lifetime.max_ttl_s, lifetime.max_lifetime_s)


def expiry(workspace: Workspace, ready_at: datetime) -> datetime:
    """When an environment that became ready at ``ready_at`` expires."""
    return ready_at + timedelta(seconds=workspace.spec.ttl_s + workspace.extended_s)


def extension(workspace: Workspace, seconds: int, lifetime: Lifetime) -> int:
    """The seconds an ``:extend`` by ``seconds`` grants; refuses when none can be."""
    if workspace.extensions >= lifetime.max_extensions:
        raise ExtensionRefusedError(
            f"the environment was already extended {workspace.extensions} times, the most "
            f"allowed (max_extensions {lifetime.max_extensions})",
            details={"limit": "max_extensions", "allowed": lifetime.max_extensions},
        )
    room = lifetime.max_lifetime_s - (workspace.spec.ttl_s + workspace.extended_s)
    if room <= 0:
        raise ExtensionRefusedError(
            f"the environment already lives the longest allowed, {lifetime.max_lifetime_s} s "
            "from readiness (max_lifetime_s)",
            details={"limit": "max_lifetime_s", "allowed": lifetime.max_lifetime_s},
        )
    return min(seconds, room)


def ttl_expired(workspace: Workspace, now: datetime) -> bool:
    return (
        workspace.state is WorkspaceState.READY
        and workspace.expires_at is not None
        and now >= workspace.expires_at
    )


def idle_since(workspace: Workspace) -> datetime | None:
    """The last sign of use: the backend's, else readiness."""
    marks = [m for m in (workspace.ready_at, workspace.last_activity_at) if m is not None]
    return max(marks) if marks else None


def is_idle(workspace: Workspace, now: datetime, idle_timeout_s: int | None) -> bool:
    if workspace.state is not WorkspaceState.READY or idle_timeout_s is None:
        return False
    since = idle_since(workspace)
    return since is not None and (now - since).total_seconds() >= idle_timeout_s


def shutdown_reason(
    workspace: Workspace, now: datetime, idle_timeout_s: int | None
) -> StopReason | None:
    """Why a ready environment must stop now (TTL before idle), or None."""
    if ttl_expired(workspace, now):
        return StopReason.TTL
    if is_idle(workspace, now, idle_timeout_s):
        return StopReason.IDLE
    return None


# --- usage -------------------------------------------------------------------------------------


class UsageRow(BaseModel):
    """One engineer's use of one GPU kind in one sharing mode over the window."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    owner: str
    owner_name: str | None = None
    gpu_type: str
    mode: AllocationMode
    environments: int
    """Environments that held GPUs of this kind in the window."""
    held_hours: float
    """Hours those environments held their GPUs (clipped to the window)."""
    gpu_hours: float
    """``gpu_count`` times hours held, summed: what the cost is charged on."""


class UsageReport(BaseModel):
    """GPU-hours per engineer and GPU kind over ``[since, until)``."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    since: datetime
    until: datetime
    rows: list[UsageRow]
    """Per engineer, GPU kind and mode; most GPU-hours first."""
    by_owner: dict[str, float]
    """GPU-hours per engineer (token subject)."""
    by_gpu_type: dict[str, float]
    """GPU-hours per GPU kind."""
    total_gpu_hours: float


def held_seconds(holding: Holding, since: datetime, until: datetime, now: datetime) -> float:
    """Seconds of ``holding`` inside ``[since, until)``; an open one runs to ``now``."""
    start = max(holding.started_at, since)
    end = min(holding.ended_at or now, until)
    return max(0.0, (end - start).total_seconds())


def usage_report(
    holdings: Iterable[Holding], since: datetime, until: datetime, now: datetime
) -> UsageReport:
    """Add the holding intervals up into GPU-hours per engineer and GPU kind."""
    seconds: defaultdict[tuple[str, str, AllocationMode], float] = defaultdict(float)
    gpu_seconds: defaultdict[tuple[str, str, AllocationMode], float] = defaultdict(float)
    environments: defaultdict[tuple[str, str, AllocationMode], set[uuid.UUID]] = defaultdict(set)
    names: dict[str, str | None] = {}
    for holding in holdings:
        held = held_seconds(holding, since, until, now)
        if held <= 0:
            continue
        key = (holding.owner, holding.gpu_type, holding.mode)
        seconds[key] += held
        gpu_seconds[key] += held * holding.gpu_count
        environments[key].add(holding.workspace_id)
        names[holding.owner] = holding.owner_name or names.get(holding.owner)
    rows = [
        UsageRow(
            owner=owner,
            owner_name=names.get(owner),
            gpu_type=gpu_type,
            mode=mode,
            environments=len(environments[(owner, gpu_type, mode)]),
            held_hours=_hours(seconds[(owner, gpu_type, mode)]),
            gpu_hours=_hours(gpu_seconds[(owner, gpu_type, mode)]),
        )
        for owner, gpu_type, mode in seconds
    ]
    rows.sort(key=lambda r: (-r.gpu_hours, r.owner, r.gpu_type, r.mode.value))
    by_owner: defaultdict[str, float] = defaultdict(float)
    by_gpu_type: defaultdict[str, float] = defaultdict(float)
    for (owner, gpu_type, _), value in gpu_seconds.items():
        by_owner[owner] += value
        by_gpu_type[gpu_type] += value
    return UsageReport(
        since=since,
        until=until,
        rows=rows,
        by_owner={k: _hours(v) for k, v in sorted(by_owner.items())},
        by_gpu_type={k: _hours(v) for k, v in sorted(by_gpu_type.items())},
        total_gpu_hours=_hours(sum(gpu_seconds.values())),
    )


def _hours(seconds: float) -> float:
    return round(seconds / 3600, 6)
