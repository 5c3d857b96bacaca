"""Where a running canary goes after a check: pure, no I/O, the time passed in.

Flagger's rules: a failed check adds to the canary's failed checks and ``threshold`` of them roll
it back; a passed check counts towards its step, and a step that has baked for ``bake_s`` with
``min_passed_checks`` passes moves on (after the last step: promotion). Inconclusive and outage
checks change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from flywheel_rollout.analysis import CheckStatus
from flywheel_rollout.policy import CanaryPolicy

__all__ = ["Action", "Progress", "Transition", "judge"]


class Action(StrEnum):
    HOLD = "hold"
    """Stay at this step and keep checking."""
    ADVANCE = "advance"
    """Move to the next step's share."""
    PROMOTE = "promote"
    """Every step passed: the candidate becomes champion."""
    ROLLBACK = "rollback"
    """Too many failed checks: all traffic back to the champion."""


@dataclass(frozen=True)
class Progress:
    """How far a canary got: its step and the checks that count."""

    step: int
    """Index into ``policy.steps``."""
    step_started_at: datetime
    passed_in_step: int = 0
    failed_checks: int = 0


@dataclass(frozen=True)
class Transition:
    action: Action
    progress: Progress
    reason: str


def judge(
    progress: Progress, status: CheckStatus, policy: CanaryPolicy, now: datetime
) -> Transition:
    """The canary's next move after a check with ``status`` at ``now``."""
    if status is CheckStatus.FAILED:
        failed = progress.failed_checks + 1
        after = replace(progress, failed_checks=failed)
        if failed >= policy.threshold:
            return Transition(
                Action.ROLLBACK, after, f"{failed} failed checks reached the threshold"
            )
        return Transition(
            Action.HOLD, after, f"check failed ({failed} of {policy.threshold} allowed)"
        )
    if not status.counted:
        return Transition(Action.HOLD, progress, f"check {status.value}: not counted")
    passed = progress.passed_in_step + 1
    after = replace(progress, passed_in_step=passed)
    baked = (now - progress.step_started_at).total_seconds()
    share = policy.steps[progress.step]
    if baked + 1e-6 < policy.bake_s:
        return Transition(
            Action.HOLD, after, f"{share}% baking: {baked:.0f}s of {policy.bake_s:g}s"
        )
    if passed < policy.min_passed_checks:
        return Transition(
            Action.HOLD, after, f"{share}%: {passed} of {policy.min_passed_checks} checks passed"
        )
    if progress.step + 1 >= len(policy.steps):
        return Transition(Action.PROMOTE, after, f"every step passed (last {share}%)")
    next_step = Progress(
        step=progress.step + 1, step_started_at=now, failed_checks=after.failed_checks
    )
    return Transition(
        Action.ADVANCE,
        next_step,
        f"{share}% passed: on to {policy.steps[progress.step + 1]}%",
    )
