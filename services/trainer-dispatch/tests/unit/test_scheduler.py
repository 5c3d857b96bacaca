import uuid

import pytest

from flywheel_contracts.events import ThresholdReason
from flywheel_trainer_dispatch.scheduler import Priority, Scheduler, Waiting, priority_of


def _waiting(line: str, priority: Priority, position: int) -> Waiting:
    return Waiting(uuid.uuid4(), line, priority, position)


def test_priorities_rank_drift_then_threshold_then_scheduled_then_manual() -> None:
    ranked = sorted(Priority, key=lambda p: p.rank)

    assert ranked == [Priority.DRIFT, Priority.THRESHOLD, Priority.SCHEDULED, Priority.MANUAL]
    assert Priority.MANUAL.most_urgent(Priority.DRIFT) is Priority.DRIFT
    assert Priority.THRESHOLD.most_urgent(Priority.SCHEDULED) is Priority.THRESHOLD


@pytest.mark.parametrize(
    ("reason", "priority"),
    [
        (ThresholdReason.DRIFT, Priority.DRIFT),
        (ThresholdReason.COUNT, Priority.THRESHOLD),
        (ThresholdReason.ADAPTIVE, Priority.THRESHOLD),
        (ThresholdReason.MAX_WAIT, Priority.THRESHOLD),
        (ThresholdReason.MANUAL, Priority.MANUAL),
    ],
)
def test_threshold_reasons_map_to_priorities(reason: ThresholdReason, priority: Priority) -> None:
    assert priority_of(reason) is priority


def test_waiting_runs_start_by_priority_then_first_come_first_served() -> None:
    manual = _waiting("a", Priority.MANUAL, 1)
    early = _waiting("b", Priority.THRESHOLD, 2)
    scheduled = _waiting("c", Priority.SCHEDULED, 3)
    late = _waiting("d", Priority.THRESHOLD, 4)
    drift = _waiting("e", Priority.DRIFT, 5)

    picked = Scheduler(max_concurrent=10).pick([manual, late, scheduled, drift, early], [])

    assert picked == [drift, early, late, scheduled, manual]


def test_the_global_bound_counts_runs_in_progress() -> None:
    waiting = [_waiting(line, Priority.THRESHOLD, i) for i, line in enumerate("abcd")]
    scheduler = Scheduler(max_concurrent=3)

    assert scheduler.pick(waiting, []) == waiting[:3]
    assert scheduler.pick(waiting, ["x"]) == waiting[:2]
    assert scheduler.pick(waiting, ["x", "y", "z"]) == []


def test_a_line_with_a_run_in_progress_waits_and_others_go_ahead() -> None:
    busy = _waiting("busy", Priority.DRIFT, 1)
    other = _waiting("free", Priority.MANUAL, 2)

    picked = Scheduler(max_concurrent=2).pick([busy, other], ["busy"])

    assert picked == [other]


def test_never_two_runs_of_one_line_in_one_pass() -> None:
    first = _waiting("a", Priority.THRESHOLD, 1)
    second = _waiting("a", Priority.DRIFT, 2)  # the invariant says it cannot exist; still safe
    third = _waiting("b", Priority.MANUAL, 3)

    picked = Scheduler(max_concurrent=5).pick([first, second, third], [])

    assert picked == [second, third]


def test_a_new_trigger_without_a_waiting_run_takes_the_next_place() -> None:
    admission = Scheduler(1).admit(None, Priority.SCHEDULED)

    assert admission.priority is Priority.SCHEDULED
    assert admission.position is None
    assert admission.supersedes is None


def test_a_newer_trigger_replaces_the_waiting_run_keeping_its_place_and_urgency() -> None:
    waiting = _waiting("a", Priority.DRIFT, 7)

    admission = Scheduler(1).admit(waiting, Priority.MANUAL)

    assert admission.supersedes == waiting.run_id
    assert admission.position == 7
    assert admission.priority is Priority.DRIFT


def test_a_more_urgent_replacement_raises_the_priority() -> None:
    waiting = _waiting("a", Priority.MANUAL, 3)

    admission = Scheduler(1).admit(waiting, Priority.THRESHOLD)

    assert (admission.priority, admission.position) == (Priority.THRESHOLD, 3)


def test_the_global_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        Scheduler(0)
