"""Operator routes: thin fronts on ``TrainerDispatch``; an unknown run answers 404."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import PlainTextResponse

from flywheel_contracts.events import SLUG
from flywheel_runtime.http import error_responses
from flywheel_trainer_dispatch.api.deps import (
    DispatchDep,
    IdempotencyKey,
    Limit,
    Operator,
    Reader,
    RunId,
)
from flywheel_trainer_dispatch.api.schemas import RunDetailOut, RunOut, RunRequestIn, RunsOut
from flywheel_trainer_dispatch.ports import RunFilter, RunState
from flywheel_trainer_dispatch.scheduler import Priority
from flywheel_trainer_dispatch.service import RunRequest

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.get("")
async def list_runs(
    dispatch: DispatchDep,
    _: Reader,
    state: Annotated[list[RunState] | None, Query(description="Any of these states.")] = None,
    project_id: Annotated[str | None, Query(pattern=SLUG)] = None,
    model_line: Annotated[str | None, Query(pattern=SLUG)] = None,
    limit: Limit = 50,
) -> RunsOut:
    """Runs, newest first, optionally only some states, one project or one model line."""
    runs = await dispatch.runs(
        RunFilter(
            states=frozenset(state or ()),
            project_id=project_id,
            model_line=model_line,
            limit=limit,
        )
    )
    return RunsOut(runs=[RunOut.build(run) for run in runs])


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def request_run(
    body: RunRequestIn,
    dispatch: DispatchDep,
    principal: Operator,
    idempotency_key: IdempotencyKey = None,
) -> RunDetailOut:
    """Queue a manual or scheduled run, optionally with its own entry point, hyperparameters
    and processes per node; it replaces the line's queued run, if any."""
    run = await dispatch.request_run(
        RunRequest(
            project_id=body.project_id,
            model_line=body.model_line,
            snapshot_id=body.snapshot_id,
            priority=Priority(body.priority),
            excluded_label_ids=tuple(body.excluded_label_ids),
            requested_by=principal.subject,
            request_id=idempotency_key,
            entry_point=body.entry_point,
            hyperparameters=body.hyperparameters,
            nproc_per_node=body.nproc_per_node,
        )
    )
    return RunDetailOut.build(run)


@router.get("/{run_id}")
async def get_run(run_id: RunId, dispatch: DispatchDep, _: Reader) -> RunDetailOut:
    """A run's state, timestamps, backend, command and the end of its log."""
    return RunDetailOut.build(await dispatch.run(run_id))


@router.get("/{run_id}/log", response_class=PlainTextResponse)
async def get_run_log(run_id: RunId, dispatch: DispatchDep, _: Reader) -> PlainTextResponse:
    """The run's log as text: all of it from the instance that ran it, else its last lines
    (``X-Flywheel-Log-Complete: false``)."""
    found = await dispatch.log(run_id)
    return PlainTextResponse(
        found.text, headers={"X-Flywheel-Log-Complete": str(found.complete).lower()}
    )


@router.post(
    "/{run_id}/cancel", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(409)
)
async def cancel_run(run_id: RunId, dispatch: DispatchDep, _: Operator) -> RunDetailOut:
    """Cancel a run: a queued one at once; a running one is stopped by the instance watching
    it (``cancel_requested_at`` is set until then). 409 when it has already ended."""
    return RunDetailOut.build(await dispatch.cancel(run_id))
