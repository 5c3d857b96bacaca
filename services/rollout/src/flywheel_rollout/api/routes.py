"""Operator routes: thin fronts on ``Rollout``; an unknown canary answers 404, an action that
does not fit the canary's state 409."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from flywheel_rollout.api.deps import (
    CorrelationId,
    Limit,
    LineFilter,
    ModelLine,
    Operator,
    Reader,
    RolloutDep,
    RolloutId,
)
from flywheel_rollout.api.schemas import ActionIn, CanariesOut, ChecksOut, LineOut, TimelineOut
from flywheel_rollout.ports import Canary, CanaryFilter, CanaryState, LineControl
from flywheel_runtime.http import error_responses

router = APIRouter(prefix="/api/v1", tags=["rollout"])


@router.get("/canaries")
async def list_canaries(
    rollout: RolloutDep,
    _: Reader,
    model_line: LineFilter = None,
    state: Annotated[list[CanaryState] | None, Query(description="Any of these states.")] = None,
    limit: Limit = 50,
) -> CanariesOut:
    """Canaries, newest first, optionally of one line or in some states."""
    found = await rollout.canaries(
        CanaryFilter(model_line=model_line, states=frozenset(state or ()), limit=limit)
    )
    return CanariesOut(canaries=found)


@router.get("/canaries/{rollout_id}")
async def get_canary(rollout_id: RolloutId, rollout: RolloutDep, _: Reader) -> Canary:
    """One canary: state, weights, policy, counters, reasons."""
    return await rollout.canary(rollout_id)


@router.get("/canaries/{rollout_id}/checks")
async def get_checks(rollout_id: RolloutId, rollout: RolloutDep, _: Reader) -> ChecksOut:
    """Every check of a canary, in order, with its inputs (both versions' windows) and result."""
    return ChecksOut(rollout_id=str(rollout_id), checks=await rollout.checks(rollout_id))


@router.get("/lines/{model_line}")
async def get_line(model_line: ModelLine, rollout: RolloutDep, _: Reader) -> LineOut:
    """A line's controls (frozen?), its canary in progress and the versions waiting."""
    status = await rollout.line(model_line)
    return LineOut(
        model_line=model_line,
        control=status.control,
        current=status.current,
        waiting=status.waiting,
    )


@router.get("/lines/{model_line}/canary")
async def get_current_canary(model_line: ModelLine, rollout: RolloutDep, _: Reader) -> Canary:
    """The line's canary in progress; 404 when there is none."""
    return await rollout.current(model_line)


@router.get("/lines/{model_line}/timeline")
async def get_timeline(
    model_line: ModelLine,
    rollout: RolloutDep,
    _: Reader,
    correlation_id: CorrelationId = None,
    limit: Limit = 200,
) -> TimelineOut:
    """The line's audit timeline, oldest first: labels, triggers, runs, validations, steps,
    checks, verdicts and every operator action."""
    entries = await rollout.timeline(model_line, correlation_id, limit)
    return TimelineOut(model_line=model_line, entries=entries)


@router.post("/lines/{model_line}/promote", status_code=202, responses=error_responses(409))
async def promote(
    model_line: ModelLine, rollout: RolloutDep, principal: Operator, body: ActionIn | None = None
) -> Canary:
    """Promote the line's canary now; the verdict follows once the registry moved the alias."""
    return await rollout.promote(model_line, principal.username, _reason(body))


@router.post("/lines/{model_line}/rollback", responses=error_responses(409))
async def rollback(
    model_line: ModelLine, rollout: RolloutDep, principal: Operator, body: ActionIn | None = None
) -> Canary:
    """Roll the line's canary back now: all traffic to the champion at once."""
    return await rollout.rollback(model_line, principal.username, _reason(body))


@router.post("/lines/{model_line}/pause", responses=error_responses(409))
async def pause(
    model_line: ModelLine, rollout: RolloutDep, principal: Operator, body: ActionIn | None = None
) -> Canary:
    """Hold the line's canary at its current weights; no checks until resumed."""
    return await rollout.pause(model_line, principal.username, _reason(body))


@router.post("/lines/{model_line}/resume", responses=error_responses(409))
async def resume(
    model_line: ModelLine, rollout: RolloutDep, principal: Operator, body: ActionIn | None = None
) -> Canary:
    """Resume a paused canary with a fresh analysis interval."""
    return await rollout.resume(model_line, principal.username, _reason(body))


@router.post("/lines/{model_line}/freeze")
async def freeze(
    model_line: ModelLine, rollout: RolloutDep, principal: Operator, body: ActionIn | None = None
) -> LineControl:
    """Freeze the line: no new canary starts, newly validated versions are refused."""
    return await rollout.freeze(model_line, principal.username, _reason(body))


@router.post("/lines/{model_line}/unfreeze")
async def unfreeze(
    model_line: ModelLine, rollout: RolloutDep, principal: Operator, body: ActionIn | None = None
) -> LineControl:
    """Unfreeze the line; waiting versions may start."""
    return await rollout.unfreeze(model_line, principal.username, _reason(body))


def _reason(body: ActionIn | None) -> str | None:
    return None if body is None else body.reason
