"""Request and response bodies of the API (the request body is ``ports.WorkspaceSpec``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from flywheel_workspaces.ports import (
    AllocationMode,
    Connection,
    Holding,
    StopReason,
    Workspace,
    WorkspaceState,
)


class ExtendIn(BaseModel):
    """More time for an environment."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seconds: int = Field(ge=60, le=7 * 24 * 3600)
    """Seconds to add to its TTL (what the caps allow of them is granted)."""


class EnvironmentOut(BaseModel):
    """An environment: what was asked for, where it stands, and how to connect when ready."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    workspace_id: uuid.UUID
    owner: str
    """Token subject of the engineer it belongs to."""
    owner_name: str | None
    state: WorkspaceState
    message: str | None
    """What it waits for, why it stopped or failed, or that its IDE is a stand-in."""
    queue_position: int | None
    """1-based place in its GPU pool's queue while ``queued``."""
    image: str
    gpu_type: str
    gpu_count: int
    mode: AllocationMode
    mig_profile: str | None
    cpu: str
    memory: str
    storage: str
    """Size of the home volume."""
    ide: str
    ttl_s: int
    """Lifetime from readiness (after the service's cap), before extensions."""
    extensions: int
    extended_s: int
    """Seconds the extensions added."""
    requested_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    """When it was admitted and began to hold its GPUs."""
    ready_at: datetime | None
    expires_at: datetime | None
    last_activity_at: datetime | None
    ended_at: datetime | None
    stop_reason: StopReason | None
    connection: Connection | None
    """How to connect while ``ready``: the IDE's URL (code-server, JupyterLab, or the local
    backend's stand-in file server), an ``ssh`` command line, and the IDE's token."""
    home_kept: bool
    """The compute is gone and the home volume is kept (stopped or failed): starting it again
    (``:start``) mounts the same home; deleting it removes the volume."""

    @classmethod
    def build(cls, workspace: Workspace, *, reveal_token: bool = True) -> EnvironmentOut:
        spec = workspace.spec
        connection = workspace.connection
        if connection is not None and not reveal_token:
            connection = connection.model_copy(update={"token": None})
        return cls(
            **workspace.model_dump(
                include={
                    "workspace_id",
                    "owner",
                    "owner_name",
                    "state",
                    "message",
                    "queue_position",
                    "extensions",
                    "extended_s",
                    "requested_at",
                    "queued_at",
                    "started_at",
                    "ready_at",
                    "expires_at",
                    "last_activity_at",
                    "ended_at",
                    "stop_reason",
                }
            ),
            image=spec.image,
            gpu_type=spec.gpu_type,
            gpu_count=spec.gpu_count,
            mode=spec.mode,
            mig_profile=spec.mig_profile,
            cpu=spec.cpu,
            memory=spec.memory,
            storage=spec.storage,
            ide=spec.ide,
            ttl_s=spec.ttl_s,
            connection=connection,
            home_kept=workspace.state in (WorkspaceState.STOPPED, WorkspaceState.FAILED),
        )


class EnvironmentsOut(BaseModel):
    environments: list[EnvironmentOut]
    """Newest first."""


class HoldingsOut(BaseModel):
    holdings: list[Holding]
    """Oldest first; ``ended_at`` is null while the environment still holds its GPUs."""
