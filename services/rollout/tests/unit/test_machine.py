from datetime import UTC, datetime, timedelta

import pytest

from flywheel_rollout.analysis import CheckStatus
from flywheel_rollout.machine import Action, Progress, judge
from flywheel_rollout.policy import CanaryPolicy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = CanaryPolicy(steps=[10, 50], bake_s=60, min_passed_checks=2, threshold=3)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_passed_check_before_the_bake_time_holds_the_step() -> None:
    moved = judge(Progress(0, T0, passed_in_step=1), CheckStatus.PASSED, POLICY, at(30))

    assert moved.action is Action.HOLD
    assert moved.progress.passed_in_step == 2
    assert moved.reason == "10% baking: 30s of 60s"


def test_a_baked_step_needs_its_passed_checks_too() -> None:
    moved = judge(Progress(0, T0), CheckStatus.PASSED, POLICY, at(90))

    assert moved.action is Action.HOLD
    assert moved.reason == "10%: 1 of 2 checks passed"


def test_a_baked_step_with_enough_passes_moves_to_the_next_share() -> None:
    moved = judge(Progress(0, T0, 1, failed_checks=1), CheckStatus.PASSED, POLICY, at(60))

    assert moved.action is Action.ADVANCE
    assert moved.progress == Progress(step=1, step_started_at=at(60), failed_checks=1)
    assert moved.reason == "10% passed: on to 50%"


def test_the_last_step_passed_promotes() -> None:
    moved = judge(Progress(1, T0, 1), CheckStatus.PASSED, POLICY, at(61))

    assert moved.action is Action.PROMOTE
    assert moved.reason == "every step passed (last 50%)"


def test_failed_checks_add_up_over_the_canary_until_the_threshold() -> None:
    first = judge(Progress(0, T0, 5), CheckStatus.FAILED, POLICY, at(1))
    third = judge(Progress(1, T0, 0, failed_checks=2), CheckStatus.FAILED, POLICY, at(1))

    assert first.action is Action.HOLD
    assert first.progress.failed_checks == 1
    assert first.progress.passed_in_step == 5
    assert first.reason == "check failed (1 of 3 allowed)"
    assert third.action is Action.ROLLBACK
    assert third.reason == "3 failed checks reached the threshold"


@pytest.mark.parametrize("status", [CheckStatus.INCONCLUSIVE, CheckStatus.OUTAGE])
def test_checks_that_do_not_count_change_nothing(status: CheckStatus) -> None:
    progress = Progress(1, T0, 1, failed_checks=2)

    moved = judge(progress, status, POLICY, at(600))

    assert moved.action is Action.HOLD
    assert moved.progress == progress
    assert moved.reason == f"check {status.value}: not counted"
