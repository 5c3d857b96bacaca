"""The API's routes: thin fronts on ``Workspaces``.

``/api/v1/environments`` is an engineer's own (role ``engineer``): another engineer's
environment answers 404 like one that does not exist. ``/api/v1/operator/environments`` and
``/api/v1/reports`` are the operator's (role ``operator``): every environment (tokens left
out), deleting any, and the GPU usage report.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from flywheel_runtime.http import error_responses
from flywheel_workspaces.api.deps import (
    EngineerDep,
    IdempotencyKey,
    OperatorDep,
    Owner,
    Since,
    States,
    Until,
    WorkspaceId,
    WorkspacesDep,
    engineer,
)
from flywheel_workspaces.api.schemas import (
    EnvironmentOut,
    EnvironmentsOut,
    ExtendIn,
    HoldingsOut,
)
from flywheel_workspaces.policy import UsageReport
from flywheel_workspaces.ports import WorkspaceSpec

environments = APIRouter(prefix="/api/v1/environments", tags=["environments"])
operator = APIRouter(prefix="/api/v1", tags=["operator"])


@environments.post("", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(409))
async def request_environment(
    body: WorkspaceSpec,
    workspaces: WorkspacesDep,
    principal: EngineerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> EnvironmentOut:
    """Ask for an environment: it is queued, and admitted as soon as GPUs of its kind are free
    (``queued`` with its place, or ``provisioning``). 409 ``quota_exceeded`` names the limit
    hit; 422 when no GPUs of that kind and mode exist, or fewer than asked for."""
    created = await workspaces.request(engineer(principal), body, idempotency_key)
    response.headers["Location"] = f"{environments.prefix}/{created.workspace_id}"
    return EnvironmentOut.build(created)


@environments.get("")
async def list_environments(
    workspaces: WorkspacesDep, principal: EngineerDep, state: States = None
) -> EnvironmentsOut:
    """The caller's environments, newest first (deleted ones only when asked for by state)."""
    found = await workspaces.environments(principal.subject, state or ())
    return EnvironmentsOut(environments=[EnvironmentOut.build(w) for w in found])


@environments.get("/{workspace_id}")
async def get_environment(
    workspace_id: WorkspaceId, workspaces: WorkspacesDep, principal: EngineerDep
) -> EnvironmentOut:
    """One of the caller's environments: its state, place in the queue, expiry and, when
    ready, how to connect."""
    return EnvironmentOut.build(await workspaces.environment(workspace_id, principal.subject))


@environments.delete("/{workspace_id}")
async def delete_environment(
    workspace_id: WorkspaceId, workspaces: WorkspacesDep, principal: EngineerDep
) -> EnvironmentOut:
    """Delete one of the caller's environments: compute and home volume are removed and its
    GPUs freed at once. Deleting it again answers the same."""
    return EnvironmentOut.build(await workspaces.delete(workspace_id, principal.subject))


@environments.post("/{workspace_id}:extend", responses=error_responses(409))
async def extend_environment(
    workspace_id: WorkspaceId, body: ExtendIn, workspaces: WorkspacesDep, principal: EngineerDep
) -> EnvironmentOut:
    """Add time to an environment's TTL, up to the caps (409 ``extension_refused`` when none is
    left; 409 ``environment_state`` once it has ended)."""
    extended = await workspaces.extend(workspace_id, principal.subject, body.seconds)
    return EnvironmentOut.build(extended)


@environments.post(
    "/{workspace_id}:start", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(409)
)
async def start_environment(
    workspace_id: WorkspaceId, workspaces: WorkspacesDep, principal: EngineerDep
) -> EnvironmentOut:
    """Start a stopped (or failed) environment again on its kept home volume: queued like a
    new request, within the quota."""
    return EnvironmentOut.build(await workspaces.start(workspace_id, principal.subject))


@operator.get("/operator/environments")
async def list_all_environments(
    workspaces: WorkspacesDep, _: OperatorDep, owner: Owner = None, state: States = None
) -> EnvironmentsOut:
    """Every engineer's environments (or one's), newest first; IDE tokens left out."""
    found = await workspaces.environments(owner, state or ())
    return EnvironmentsOut(
        environments=[EnvironmentOut.build(w, reveal_token=False) for w in found]
    )


@operator.get("/operator/environments/{workspace_id}")
async def get_any_environment(
    workspace_id: WorkspaceId, workspaces: WorkspacesDep, _: OperatorDep
) -> EnvironmentOut:
    """Any engineer's environment; its IDE token left out."""
    found = await workspaces.environment(workspace_id, None)
    return EnvironmentOut.build(found, reveal_token=False)


@operator.delete("/operator/environments/{workspace_id}")
async def delete_any_environment(
    workspace_id: WorkspaceId, workspaces: WorkspacesDep, _: OperatorDep
) -> EnvironmentOut:
    """Delete any engineer's environment (compute and home volume)."""
    deleted = await workspaces.delete(workspace_id, None)
    return EnvironmentOut.build(deleted, reveal_token=False)


@operator.get("/reports/usage")
async def usage_report(
    workspaces: WorkspacesDep, _: OperatorDep, since: Since = None, until: Until = None
) -> UsageReport:
    """GPU-hours (``gpu_count`` times hours held) per engineer and GPU kind over ``[since,
    until)``: every holding interval clipped to the window, those still open up to now."""
    return await workspaces.usage(since, until)


@operator.get("/reports/holdings")
async def holdings(
    workspaces: WorkspacesDep,
    _: OperatorDep,
    since: Since = None,
    until: Until = None,
    owner: Owner = None,
) -> HoldingsOut:
    """The audit: who held which GPUs from when to when (intervals overlapping the window)."""
    return HoldingsOut(holdings=await workspaces.holdings(since, until, owner))
