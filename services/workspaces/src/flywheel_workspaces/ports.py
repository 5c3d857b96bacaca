"""What the workspace use cases need from the outside world, and the records crossing it.

``WorkspaceStore`` is the service's PostgreSQL schema, the source of truth for every
environment and its holding history (the audit and cost report read it). ``WorkspaceBackend``
is where environments actually run: a Pod with a home-directory PVC, a Service and a
NetworkPolicy in Kubernetes, or a process with its own directory on this machine (``local``).
The backend is told what to run and asked what became of it; it never decides policy.

Every backend call may be repeated (after a crash, or by the next supervisor pass): a backend
raises ``DependencyUnavailableError`` (retryable) when it cannot be reached, and the call is
made again later; any other error from ``create`` fails the environment.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel_contracts import Event


class AllocationMode(StrEnum):
    """How the GPUs are shared with others."""

    FULL = "full"
    """Whole GPUs, ``nvidia.com/gpu``."""
    MIG = "mig"
    """A Multi-Instance GPU slice, ``nvidia.com/mig-<profile>`` (e.g. ``1g.10gb``)."""
    TIME_SLICED = "time-sliced"
    """A time-sliced replica of a shared GPU (the device plugin's shared resource name)."""
    MPS = "mps"
    """A CUDA MPS share of a GPU (the device plugin's MPS resource name)."""


class WorkspaceState(StrEnum):
    QUEUED = "queued"
    """Admitted by quota, waiting for a GPU of its kind."""
    PROVISIONING = "provisioning"
    """Handed to the backend; not ready to connect yet."""
    READY = "ready"
    STOPPED = "stopped"
    """Expired (TTL) or shut down when idle: the compute is gone, the home volume is kept."""
    DELETED = "deleted"
    """Deleted by its owner; compute and home volume are gone."""
    FAILED = "failed"

    @property
    def holds_gpus(self) -> bool:
        """Whether the environment counts against quotas and capacity."""
        return self in (WorkspaceState.PROVISIONING, WorkspaceState.READY)

    @property
    def terminal(self) -> bool:
        return self in (WorkspaceState.STOPPED, WorkspaceState.DELETED, WorkspaceState.FAILED)


class StopReason(StrEnum):
    TTL = "ttl"
    IDLE = "idle"
    OWNER = "owner"
    OPERATOR = "operator"
    BACKEND = "backend"
    """The backend lost or failed it."""


class WorkspaceSpec(BaseModel):
    """What an engineer asks for (the body of ``POST /api/v1/environments``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    image: str = Field(min_length=1, max_length=300)
    """Container image of the environment (the local backend ignores it)."""
    gpu_type: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    """A GPU kind the platform knows (``settings.gpus``), e.g. ``a100``, ``h100``."""
    gpu_count: int = Field(default=1, ge=0, le=16)
    """GPUs (or MIG slices, or shares) to hold; 0 asks for a CPU-only environment."""
    mode: AllocationMode = AllocationMode.FULL
    """``full`` GPUs, a ``mig`` slice, a ``time-sliced`` replica or an ``mps`` share."""
    mig_profile: str | None = Field(default=None, pattern=r"^[1-7]g\.[0-9]+gb$")
    """Required with ``mode=mig``, forbidden otherwise."""
    cpu: str = Field(default="4", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """Kubernetes quantity."""
    memory: str = Field(default="16Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")
    storage: str = Field(default="50Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$")
    """Size of the home-directory volume."""
    ttl_s: int = Field(default=8 * 3600, ge=60)
    """Lifetime from readiness; capped by ``settings.max_ttl_s``."""
    ide: str = Field(default="code-server", pattern=r"^(code-server|jupyter|ssh)$")
    """How the engineer connects: code-server in the browser, JupyterLab, or SSH (VS Code
    Remote-SSH)."""

    @model_validator(mode="after")
    def _mig_profile_with_mig_only(self) -> WorkspaceSpec:
        if (self.mode is AllocationMode.MIG) != (self.mig_profile is not None):
            raise ValueError("mig_profile is required with mode 'mig' and only with it")
        return self


class Connection(BaseModel):
    """How the engineer's IDE reaches a ready environment."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    url: str | None = None
    """code-server / Jupyter URL."""
    ssh: str | None = None
    """``ssh`` command line (VS Code Remote-SSH host)."""
    ssh_tunnel: str | None = None
    """Command to keep running while ``ssh`` is used (a ``kubectl port-forward``); None when
    ``ssh`` reaches the environment as is."""
    token: str | None = None
    """Secret the IDE asks for, when it has one."""
    ide: str | None = None
    """What answers at ``url``: ``code-server``, ``jupyter``, or ``http-server`` (the local
    backend's stand-in when neither is installed: a file server of the home directory)."""


class Workspace(BaseModel):
    """One environment: who asked for what, where it stands, and its times."""

    workspace_id: uuid.UUID
    owner: str
    """Token subject of the engineer."""
    owner_name: str | None = None
    """The engineer's user name (``preferred_username``), for people reading reports."""
    spec: WorkspaceSpec
    state: WorkspaceState
    requested_at: datetime
    queued_at: datetime | None = None
    """When it joined its GPU kind's queue (the request, or a later start): FIFO order."""
    request_id: uuid.UUID | None = None
    """The request's ``Idempotency-Key``: the same key from the same owner, the same one."""
    started_at: datetime | None = None
    """When it was handed to the backend (holding starts)."""
    ready_at: datetime | None = None
    expires_at: datetime | None = None
    last_activity_at: datetime | None = None
    ended_at: datetime | None = None
    stop_reason: StopReason | None = None
    connection: Connection | None = None
    queue_position: int | None = None
    """1-based place among queued requests for the same GPU kind; None when not queued."""
    message: str | None = None
    """Why it failed or waits."""
    extensions: int = 0
    """How many times its TTL was extended."""
    extended_s: int = 0
    """Seconds the extensions added to ``spec.ttl_s``."""


class BackendPhase(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    GONE = "gone"


class BackendStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    phase: BackendPhase
    connection: Connection | None = None
    last_activity_at: datetime | None = None
    """Last sign of use the backend can see (IDE traffic, a shell); None if it cannot tell."""
    message: str | None = None


class WorkspaceBackend(Protocol):
    """Runs environments. Every call is idempotent: it may be repeated after a crash."""

    async def create(self, workspace: Workspace) -> None:
        """Start the environment (and its home volume, if it does not exist yet)."""
        ...

    async def status(self, workspace: Workspace) -> BackendStatus: ...

    async def stop(self, workspace: Workspace) -> None:
        """Remove the compute; keep the home volume (TTL expiry, idle shutdown)."""
        ...

    async def delete(self, workspace: Workspace) -> None:
        """Remove the compute and the home volume."""
        ...

    async def close(self) -> None: ...


class Holding(BaseModel):
    """One interval during which an environment held its GPUs: the audit, and what the cost
    report adds up. Opened when the environment is admitted, closed when it stops."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    workspace_id: uuid.UUID
    owner: str
    owner_name: str | None = None
    gpu_type: str
    gpu_count: int
    mode: AllocationMode
    mig_profile: str | None = None
    started_at: datetime
    ended_at: datetime | None = None
    """None while it still holds them."""
    reason: StopReason | None = None
    """Why it ended (``ttl``, ``idle``, ``owner`` …); None while open."""


class WorkspaceStore(Protocol):
    """The service's schema; ``transaction()`` for a unit of work with outbox events.

    Listings are oldest first (by ``queued_at``, else ``requested_at``, then insertion order),
    the order of the queue.
    """

    def transaction(self) -> AbstractAsyncContextManager[WorkspaceTransaction]: ...

    async def get(self, workspace_id: uuid.UUID) -> Workspace | None: ...

    async def holdings(
        self, since: datetime, until: datetime, *, owner: str | None = None
    ) -> list[Holding]:
        """Holding intervals overlapping ``[since, until)``, open ones included, oldest first."""
        ...

    async def list(
        self, *, owner: str | None = None, states: frozenset[WorkspaceState] | None = None
    ) -> list[Workspace]: ...


class WorkspaceTransaction(Protocol):
    """One unit of work: rows locked until commit, outbox events committed with them.

    Backend calls that change an environment are made while its row is locked, so two
    callers (the supervisor, an owner's DELETE, another replica) never act on it at once.
    """

    async def lock(self, workspace_id: uuid.UUID) -> Workspace | None: ...

    async def lock_admission(self) -> list[Workspace]:
        """Take the admission lock (until commit) and return every non-terminal environment.

        Admissions and quota checks serialize on this lock; the rows are not locked, so an
        environment to be changed is ``lock``ed (and its state checked again) first.
        """
        ...

    async def by_request(self, owner: str, request_id: uuid.UUID) -> Workspace | None:
        """The environment an earlier request with this idempotency key created."""
        ...

    async def save(self, workspace: Workspace) -> None:
        """Insert or update."""
        ...

    async def open_holding(self, holding: Holding) -> None: ...

    async def close_holding(
        self, workspace_id: uuid.UUID, ended_at: datetime, reason: StopReason
    ) -> None:
        """End the environment's open holding interval, if it has one."""
        ...

    async def emit(self, event: Event[Any]) -> None:
        """Queue ``event`` in the outbox, committed with the state change."""
        ...
