import uuid

import pytest

from flywheel_contracts import CanaryOutcome, CanaryVerdictV1, RolloutStepV1
from flywheel_rollout.analysis import CheckStatus
from flywheel_rollout.errors import CanaryNotFoundError, CanaryStateError
from flywheel_rollout.machine import Action
from flywheel_rollout.policy import CanaryPolicy
from flywheel_rollout.ports import CanaryState
from flywheel_rollout.service import Rollout
from flywheel_runtime.errors import InvalidInputError

from ..fakes import (
    LINE,
    POLICY,
    Harness,
    harness,
    labels,
    logged,
    threshold,
    trained,
    validated,
)


async def running(h: Harness, version: str = "2", champion: str = "1") -> None:
    """``version`` in canary against ``champion`` at the first step."""
    h.registry.aliases |= {"champion": champion, "challenger": version}
    await h.rollout.model_validated(validated(version, champion=champion))
    await h.settle()
    assert h.store.only(version).state is CanaryState.RUNNING


async def healthy_interval(h: Harness, candidate: str = "2", champion: str = "1") -> None:
    await h.serve(candidate, 30)
    await h.serve(champion, 60)
    await h.later(POLICY.interval_s)


def steps(h: Harness) -> list[tuple[int, int, int]]:
    """``(traffic, previous, sequence)`` of every rollout.step, in order."""
    return [
        (e.payload.traffic_percent, e.payload.previous_percent, e.payload.sequence)
        for e in h.store.events(RolloutStepV1)
    ]


# --- without a champion -------------------------------------------------------------------------


async def test_the_first_passed_version_of_a_line_is_promoted_without_a_canary() -> None:
    h = harness()
    h.registry.aliases["challenger"] = "1"
    event = validated("1")

    canary = await h.rollout.model_validated(event)
    await h.settle()

    assert canary is not None
    done = h.store.only("1")
    assert done.state is CanaryState.PROMOTED
    assert done.direct
    assert done.reasons == ["no champion to compare with: promoted without a canary"]
    assert h.registry.aliases == {"champion": "1"}
    assert h.registry.tags["1"]["canary.verdict"] == "promoted"
    assert h.serving.loaded == ["1"]
    [step] = h.store.events(RolloutStepV1)
    assert (step.payload.traffic_percent, step.payload.champion_version) == (100, None)
    [verdict] = h.store.events(CanaryVerdictV1)
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED
    assert verdict.payload.reasons == done.reasons
    assert verdict.correlation_id == event.correlation_id
    assert verdict.causation_id == event.event_id
    assert done.finalized_at is not None


async def test_a_failed_validation_is_recorded_and_gets_no_canary() -> None:
    h = harness()

    assert await h.rollout.model_validated(validated("2", verdict="failed")) is None
    await h.settle()

    assert h.store.state.canaries == {}
    [entry] = await h.rollout.timeline(LINE, None, 10)
    assert entry.kind == "model.validated"
    assert entry.actor == "validator"
    assert entry.summary == "version 2 failed validation against no champion"


# --- steps ------------------------------------------------------------------------------------


async def test_a_canary_starts_with_the_candidate_loaded_beside_the_champion() -> None:
    h = harness()

    await running(h)

    canary = h.store.only("2")
    assert (canary.step, canary.traffic_percent, canary.sequence) == (0, 10, 1)
    assert canary.champion_version == "1"
    assert h.serving.loaded == ["1", "2"]
    assert h.registry.aliases["challenger"] == "2"
    assert steps(h) == [(10, 0, 1)]
    [step] = h.store.events(RolloutStepV1)
    assert step.payload.rollout_id == canary.rollout_id
    assert step.payload.champion_version == "1"


async def test_steps_advance_after_bake_time_and_passing_intervals_then_promote() -> None:
    h = harness(CanaryPolicy.model_validate(POLICY.model_dump() | {"bake_s": 25}))
    await running(h)

    await healthy_interval(h)
    await healthy_interval(h)
    assert h.store.only("2").traffic_percent == 10  # passed twice, baked 20 s of 25
    await healthy_interval(h)
    assert steps(h) == [(10, 0, 1), (50, 10, 2)]
    for _ in range(3):
        await healthy_interval(h)

    canary = h.store.only("2")
    assert canary.state is CanaryState.PROMOTED
    assert steps(h) == [(10, 0, 1), (50, 10, 2), (100, 50, 3)]
    assert canary.reasons == ["every step passed (last 50%)"]
    assert [c.action for c in h.store.state.checks] == [
        Action.HOLD,
        Action.HOLD,
        Action.ADVANCE,
        Action.HOLD,
        Action.HOLD,
        Action.PROMOTE,
    ]
    assert h.registry.aliases == {"champion": "2"}
    assert h.registry.tags["2"]["canary.verdict"] == "promoted"
    assert h.registry.tags["1"]["canary.replaced_by"] == "2"
    [verdict] = h.store.events(CanaryVerdictV1)
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED
    assert verdict.payload.metrics["candidate_requests"] == 30
    # The old champion keeps serving until the BFF had time to switch.
    assert h.serving.loaded == ["1", "2"]
    await h.later(5)
    assert h.serving.loaded == ["2"]
    assert h.store.only("2").finalized_at is not None


async def test_intervals_under_min_requests_count_neither_way() -> None:
    h = harness()
    await running(h)

    await h.serve("2", 5, ok=False)
    await h.serve("1", 60)
    await h.later(POLICY.interval_s)

    [check] = h.store.state.checks
    assert check.status is CheckStatus.INCONCLUSIVE
    assert not check.counted
    assert check.candidate.requests == 5
    canary = h.store.only("2")
    assert (canary.failed_checks, canary.passed_in_step, canary.traffic_percent) == (0, 0, 10)
    await healthy_interval(h)
    assert h.store.only("2").traffic_percent == 50


async def test_a_check_is_made_once_per_interval_on_that_interval_alone() -> None:
    h = harness()
    await running(h)

    await h.serve("2", 30, ok=False)
    await h.serve("1", 60)
    await h.later(POLICY.interval_s - 1)
    assert h.store.state.checks == []
    await h.later(1)
    await h.later(0)

    [check] = h.store.state.checks
    assert check.status is CheckStatus.FAILED
    assert check.interval_index == 0
    assert check.started_at == h.store.only("2").started_at
    assert h.store.only("2").interval_index == 1


# --- rollback ---------------------------------------------------------------------------------


async def test_failed_checks_reaching_the_threshold_roll_back_to_the_champion() -> None:
    h = harness()
    await running(h)

    await h.serve("2", 30, ok=False)
    await h.serve("1", 60)
    await h.later(POLICY.interval_s)
    assert h.store.only("2").failed_checks == 1
    assert h.store.only("2").state is CanaryState.RUNNING
    await h.serve("2", 30, latency_ms=400)
    await h.serve("1", 60)
    await h.later(POLICY.interval_s)

    canary = h.store.only("2")
    assert canary.state is CanaryState.ROLLED_BACK
    assert steps(h) == [(10, 0, 1), (0, 10, 2)]
    assert canary.reasons[0] == "2 failed checks reached the threshold"
    assert any(r.startswith("candidate latency p95") for r in canary.reasons)
    [verdict] = h.store.events(CanaryVerdictV1)
    assert verdict.payload.verdict is CanaryOutcome.ROLLED_BACK
    assert verdict.payload.reasons == canary.reasons
    assert "challenger" not in h.registry.aliases
    assert h.registry.aliases["champion"] == "1"
    tags = h.registry.tags["2"]
    assert tags["canary.verdict"] == "rolled_back"
    assert tags["canary.reasons"].splitlines() == canary.reasons
    assert h.serving.loaded == ["1", "2"]  # draining
    await h.later(5)
    assert h.serving.loaded == ["1"]


async def test_an_outage_of_both_versions_is_recorded_and_not_held_against_the_candidate() -> None:
    h = harness()
    await running(h)

    for version, n in (("2", 30), ("1", 60)):
        await h.serve(version, n, ok=False, error_code="dependency_unavailable")
    await h.later(POLICY.interval_s)

    [check] = h.store.state.checks
    assert check.status is CheckStatus.OUTAGE
    assert not check.counted
    assert check.reasons[0].startswith("outage: 100% of candidate and 100% of champion")
    assert h.store.only("2").failed_checks == 0
    entries = await h.rollout.timeline(LINE, None, 50)
    assert "check 0 at 10%: outage; check outage: not counted" in [e.summary for e in entries]


async def test_a_candidate_that_cannot_be_loaded_is_rolled_back_before_any_traffic() -> None:
    h = harness()
    h.serving.broken["2"] = InvalidInputError("Triton could not load model: bad graph")
    h.registry.aliases |= {"champion": "1", "challenger": "2"}

    await h.rollout.model_validated(validated("2", champion="1"))
    await h.settle()

    canary = h.store.only("2")
    assert canary.state is CanaryState.ROLLED_BACK
    assert canary.reasons == [
        "candidate could not be loaded: Triton could not load model: bad graph"
    ]
    assert h.store.events(RolloutStepV1) == []
    [verdict] = h.store.events(CanaryVerdictV1)
    assert verdict.payload.verdict is CanaryOutcome.ROLLED_BACK
    assert "challenger" not in h.registry.aliases
    # It never had traffic, so nothing drains: the line is back to its champion at once.
    assert h.serving.loaded == ["1"]
    assert h.store.only("2").finalized_at is not None


async def test_serving_outages_hold_the_start_until_triton_is_back() -> None:
    h = harness()
    h.serving.down = True
    h.registry.aliases |= {"champion": "1", "challenger": "2"}

    await h.rollout.model_validated(validated("2", champion="1"))
    await h.settle()
    assert h.store.only("2").state is CanaryState.STARTING
    h.serving.down = False
    await h.later(1)

    assert h.store.only("2").state is CanaryState.RUNNING


async def test_versions_a_restarted_triton_forgot_are_loaded_again_before_the_check() -> None:
    h = harness()
    await running(h)
    h.serving.loaded = []

    await healthy_interval(h)

    assert h.serving.loaded == ["1", "2"]
    [check] = h.store.state.checks
    assert check.status is CheckStatus.PASSED


async def test_checks_go_on_while_triton_is_away_and_judge_the_outage() -> None:
    h = harness()
    await running(h)
    h.serving.down = True

    for version, n in (("2", 30), ("1", 60)):
        await h.serve(version, n, ok=False, error_code="dependency_unavailable")
    await h.later(POLICY.interval_s)

    [check] = h.store.state.checks
    assert check.status is CheckStatus.OUTAGE
    assert h.store.only("2").state is CanaryState.RUNNING


@pytest.mark.parametrize(
    ("marked", "status"), [(True, CheckStatus.PASSED), (False, CheckStatus.FAILED)]
)
async def test_requests_that_never_reached_triton_are_left_out_of_the_check_and_recorded(
    marked: bool, status: CheckStatus
) -> None:
    # Triton went away for part of the interval. Marked by the BFF, those requests say nothing
    # about either version; the same errors unmarked are the candidate's: 33 % against 10 %.
    h = harness()
    await running(h)

    for version, ok, failed in (("2", 30, 15), ("1", 90, 10)):
        await h.serve(version, ok)
        await h.serve(
            version,
            failed,
            ok=False,
            error_code="inference_unavailable",
            serving_unavailable=marked,
        )
    await h.later(POLICY.interval_s)

    [check] = h.store.state.checks
    assert check.status is status
    assert check.counted
    assert (check.candidate.unavailable_errors, check.champion.unavailable_errors) == (
        (15, 10) if marked else (0, 0)
    )
    noted = [r for r in check.reasons if r.startswith("serving unavailable")]
    assert noted == (
        [
            "serving unavailable: 15 candidate and 10 champion requests never reached a model "
            "(inference server unreachable); left out of the error rates, not counted against "
            "the candidate"
        ]
        if marked
        else []
    )
    assert h.store.only("2").failed_checks == (0 if marked else 1)


# --- operator actions -------------------------------------------------------------------------


async def test_pause_holds_the_weights_and_resume_starts_a_fresh_interval() -> None:
    h = harness()
    await running(h)

    paused = await h.rollout.pause(LINE, "alice", "looking at dashboards")
    await h.serve("2", 30, ok=False)
    await h.serve("1", 60)
    await h.later(POLICY.interval_s * 3)
    assert h.store.state.checks == []
    resumed = await h.rollout.resume(LINE, "alice")
    await healthy_interval(h)

    assert paused.state is CanaryState.PAUSED
    assert resumed.interval_index == 1
    [check] = h.store.state.checks
    assert check.status is CheckStatus.PASSED
    assert h.store.only("2").traffic_percent == 50
    with pytest.raises(CanaryStateError):
        await h.rollout.resume(LINE, "alice")
    summaries = [e.summary for e in await h.rollout.timeline(LINE, None, 50)]
    assert "paused at 10% by alice: looking at dashboards" in summaries
    assert "resumed at 10% by alice" in summaries


async def test_an_operator_promotes_now_through_the_registry_first() -> None:
    h = harness()
    await running(h)

    decided = await h.rollout.promote(LINE, "bob", "business deadline")
    assert decided.state is CanaryState.PROMOTING
    await h.settle()

    canary = h.store.only("2")
    assert canary.state is CanaryState.PROMOTED
    assert canary.decided_by == "bob"
    assert canary.reasons == ["promoted by bob: business deadline"]
    assert h.registry.aliases == {"champion": "2"}
    assert steps(h) == [(10, 0, 1), (100, 10, 2)]
    with pytest.raises(CanaryNotFoundError):
        await h.rollout.current(LINE)


async def test_an_operator_rolls_back_at_once_and_the_registry_is_tidied_next() -> None:
    h = harness()
    await running(h)

    canary = await h.rollout.rollback(LINE, "carol", "labelers complain")

    assert canary.state is CanaryState.ROLLED_BACK
    assert steps(h) == [(10, 0, 1), (0, 10, 2)]
    [verdict] = h.store.events(CanaryVerdictV1)
    assert verdict.payload.reasons == ["rolled back by carol: labelers complain"]
    await h.settle()
    assert "challenger" not in h.registry.aliases
    assert h.registry.tags["2"]["canary.verdict"] == "rolled_back"
    kinds = [e.kind for e in await h.rollout.timeline(LINE, None, 50)]
    assert kinds[-2:] == ["operator.rollback", "canary.verdict"]
    with pytest.raises(CanaryNotFoundError):
        await h.rollout.rollback(LINE, "carol")


async def test_a_decided_promotion_cannot_be_rolled_back() -> None:
    h = harness()
    await running(h)
    h.registry.down = True

    await h.rollout.promote(LINE, "bob")
    await h.settle()
    with pytest.raises(CanaryStateError, match="promoting"):
        await h.rollout.rollback(LINE, "carol")
    h.registry.down = False
    await h.later(1)

    assert h.store.only("2").state is CanaryState.PROMOTED
    assert h.registry.aliases["champion"] == "2"


async def test_a_rollback_after_a_promotion_that_never_committed_restores_the_champion() -> None:
    h = harness()
    await running(h)
    h.registry.aliases["champion"] = "2"  # moved by a promotion that crashed before its commit

    await h.rollout.rollback(LINE, "carol")
    await h.settle()

    assert h.registry.aliases == {"champion": "1"}


# --- freeze, waiting, superseding -------------------------------------------------------------


async def test_a_frozen_line_refuses_new_versions_and_unfreezing_lets_waiting_ones_start() -> None:
    h = harness()
    h.registry.aliases["champion"] = "1"
    await h.rollout.model_validated(validated("2", champion="1"))
    control = await h.rollout.freeze(LINE, "dave", "incident 42")
    await h.rollout.model_validated(validated("3", champion="1"))
    await h.settle()

    assert control.frozen
    assert h.store.only("3").state is CanaryState.REFUSED
    assert h.store.only("3").reasons == [f"model line {LINE} is frozen by dave: incident 42"]
    assert h.store.only("2").state is CanaryState.WAITING
    assert h.registry.tags["3"]["canary.verdict"] == "refused"
    await h.rollout.unfreeze(LINE, "dave")
    await h.settle()
    assert h.store.only("2").state is CanaryState.RUNNING
    assert (await h.rollout.freeze(LINE, "dave")).frozen
    assert (await h.rollout.freeze(LINE, "erin")).changed_by == "dave"
    kinds = [e.kind for e in await h.rollout.timeline(LINE, None, 50)]
    assert kinds.count("operator.freeze") == 2
    assert kinds.count("operator.unfreeze") == 1
    assert "canary.refused" in kinds


async def test_a_newer_version_waits_for_the_line_and_starts_against_the_new_champion() -> None:
    h = harness()
    await running(h)
    await h.rollout.model_validated(validated("3", champion="1"))
    await h.rollout.model_validated(validated("4", champion="1"))
    await h.settle()

    status = await h.rollout.line(LINE)
    assert status.current is not None
    assert status.current.candidate_version == "2"
    assert [c.candidate_version for c in status.waiting] == ["3", "4"]
    await h.rollout.promote(LINE, "bob")
    await h.settle()

    three = h.store.only("3")
    assert three.state is CanaryState.RUNNING
    assert three.champion_version == "2"
    assert h.serving.loaded == ["1", "2", "3"]  # 1 still draining
    assert h.store.only("4").state is CanaryState.WAITING
    await h.later(5)
    assert h.serving.loaded == ["2", "3"]


async def test_by_policy_a_newer_version_supersedes_the_waiting_one() -> None:
    h = harness(CanaryPolicy.model_validate(POLICY.model_dump() | {"waiting": "supersede"}))
    await running(h)
    await h.rollout.model_validated(validated("3", champion="1"))
    await h.rollout.model_validated(validated("4", champion="1"))
    await h.settle()

    three = h.store.only("3")
    assert three.state is CanaryState.SUPERSEDED
    assert three.reasons == ["superseded by version 4"]
    assert h.store.only("4").state is CanaryState.WAITING
    assert h.registry.tags["3"]["canary.verdict"] == "superseded"


async def test_a_validated_champion_is_refused() -> None:
    h = harness()
    h.registry.aliases["champion"] = "2"

    await h.rollout.model_validated(validated("2", champion="1"))
    await h.settle()

    assert h.store.only("2").state is CanaryState.REFUSED
    assert h.store.only("2").reasons == ["version is the champion already"]


# --- signals ----------------------------------------------------------------------------------


async def test_labelers_correcting_the_candidate_more_often_fail_its_checks() -> None:
    h = harness()
    await running(h)

    await h.rollout.labels_saved(labels([("2", True)] * 4 + [("2", False)] * 2))
    await h.rollout.labels_saved(labels([("1", False)] * 6 + [("9", True)]))
    await healthy_interval(h)

    [check] = h.store.state.checks
    assert check.status is CheckStatus.FAILED
    correction = next(r for r in check.results if r.name == "correction_rate")
    assert (correction.candidate, correction.champion) == (pytest.approx(4 / 6), 0.0)
    assert check.candidate_feedback.prefilled == 6


async def test_feedback_locks_the_versions_windows_in_one_order_whatever_the_batch_order() -> None:
    h = harness()
    await running(h)

    h.store.state.window_locks.clear()
    await h.rollout.labels_saved(labels([("2", True), ("1", False), ("2", False)]))
    await h.rollout.labels_saved(labels([("1", True), ("2", False)]))

    assert h.store.state.window_locks == ["1", "2", "1", "2"]
    await healthy_interval(h)
    [check] = h.store.state.checks
    assert (check.candidate_feedback.prefilled, check.candidate_feedback.corrected) == (3, 1)
    assert (check.champion_feedback.prefilled, check.champion_feedback.corrected) == (2, 1)


async def test_versions_disagreeing_on_shared_inputs_fail_the_agreement_check() -> None:
    h = harness()
    await running(h)

    await h.serve("1", 60, predicted_class="3")
    await h.serve("2", 30, predicted_class="8")
    await h.later(POLICY.interval_s)

    [check] = h.store.state.checks
    agreement = next(r for r in check.results if r.name == "agreement")
    assert agreement.passed is False
    assert check.candidate.disagreements == 30


async def test_logs_of_other_lines_or_versions_do_not_count() -> None:
    h = harness()
    await running(h)

    assert not await h.rollout.inference_logged(logged("7"))
    assert not await h.rollout.inference_logged(logged("2", line="other-line"))
    event = logged("2")
    assert await h.rollout.inference_logged(event)
    assert not await h.rollout.inference_logged(event)

    [window] = h.store.state.windows.values()
    assert window.requests == 1


# --- delivery, restart, republication, timeline -----------------------------------------------


async def test_a_redelivered_model_validated_does_nothing_twice() -> None:
    h = harness()
    event = validated("2", champion="1")

    first = await h.rollout.model_validated(event)
    again = await h.rollout.model_validated(event)

    assert first is not None
    assert again is None
    assert len(h.store.state.canaries) == 1


async def test_a_new_instance_on_the_same_state_resumes_the_canary() -> None:
    h = harness()
    await running(h)
    await healthy_interval(h)

    restarted = Rollout(
        h.store,
        h.registry,
        h.serving,
        h.bus,
        default_policy=POLICY,
        drain_s=5.0,
        live_cache_s=0.0,
        clock=h.clock,
    )
    await restarted.recover()
    for _ in range(2):
        for version, n in (("2", 30), ("1", 60)):
            for index in range(n):
                await restarted.inference_logged(logged(version, index=index))
        h.clock.advance(POLICY.interval_s)
        for _ in range(3):
            await restarted.tick()

    assert h.store.only("2").state is CanaryState.PROMOTED
    assert steps(h) == [(10, 0, 1), (50, 10, 2), (100, 50, 3)]


async def test_republication_repeats_each_lines_latest_weights_with_their_sequence() -> None:
    h = harness()
    await running(h)
    await healthy_interval(h)

    assert await h.rollout.republish() == 1

    [again] = h.bus.published
    [_, latest] = h.store.events(RolloutStepV1)
    assert isinstance(again, RolloutStepV1)
    assert again.payload == latest.payload
    assert again.occurred_at == latest.occurred_at
    assert again.event_id != latest.event_id
    assert again.causation_id == latest.event_id


async def test_the_timeline_links_labels_to_verdict_through_the_correlation_id() -> None:
    h = harness()
    h.registry.aliases["champion"] = "1"
    chain = uuid.uuid4()
    await h.rollout.labels_saved(labels(correlation_id=chain))
    await h.rollout.threshold_reached(threshold(chain))
    await h.rollout.model_trained(trained("2", chain))
    await h.rollout.model_validated(validated("2", champion="1", correlation_id=chain))
    await h.settle()
    await h.rollout.rollback(LINE, "carol")
    await h.rollout.labels_saved(labels())

    entries = await h.rollout.timeline(LINE, chain, 50)

    kinds = [e.kind for e in entries]
    assert kinds[:6] == [
        "labels.saved",
        "threshold.reached",
        "model.trained",
        "model.validated",
        "canary.queued",
        "rollout.step",
    ]
    assert {"operator.rollback", "canary.verdict"} <= set(kinds)
    assert [e.actor for e in entries[:4]] == [
        "labeling",
        "data-monitor",
        "trainer-dispatch",
        "validator",
    ]
    assert all(e.model_line == LINE for e in entries)
    everything = await h.rollout.timeline(LINE, None, 100)
    assert len(everything) == len(entries) + 1
    assert (await h.rollout.timeline(LINE, None, 2))[-1] == everything[-1]


async def test_reading_unknown_canaries_says_so() -> None:
    h = harness()

    with pytest.raises(CanaryNotFoundError):
        await h.rollout.canary(uuid.uuid4())
    with pytest.raises(CanaryNotFoundError):
        await h.rollout.checks(uuid.uuid4())
    with pytest.raises(CanaryNotFoundError):
        await h.rollout.pause(LINE, "alice")
