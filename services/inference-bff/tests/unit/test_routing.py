import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from flywheel_contracts import CanaryVerdictV1, RolloutStepV1
from flywheel_inference_bff.routing import (
    BUCKETS,
    LineRoute,
    RoutingTable,
    bucket_for_id,
    bucket_for_key,
    route_from_step,
    route_from_verdict,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LINE = "digits-classifier"
ROLLOUT = uuid.UUID(int=7)


def step(
    percent: int, *, at: datetime = T0, sequence: int = 1, candidate: str = "2"
) -> RolloutStepV1:
    return RolloutStepV1.model_validate(
        {
            "occurred_at": at,
            "payload": {
                "rollout_id": ROLLOUT,
                "project_id": "digits",
                "model_line": LINE,
                "registered_model": LINE,
                "candidate_version": candidate,
                "champion_version": "1",
                "step": 1,
                "traffic_percent": percent,
                "previous_percent": 0,
                "sequence": sequence,
            },
        }
    )


def verdict(outcome: str, *, at: datetime = T0) -> CanaryVerdictV1:
    return CanaryVerdictV1.model_validate(
        {
            "occurred_at": at,
            "payload": {
                "rollout_id": ROLLOUT,
                "project_id": "digits",
                "model_line": LINE,
                "registered_model": LINE,
                "candidate_version": "2",
                "champion_version": "1",
                "verdict": outcome,
            },
        }
    )


def share(route: LineRoute, buckets: list[int], version: str) -> float:
    return sum(route.version_for(b) == version for b in buckets) / len(buckets)


def test_a_ninety_ten_split_gives_the_candidate_its_share_of_many_keys() -> None:
    route = route_from_step(step(10))
    n = 20_000
    buckets = [bucket_for_key(LINE, f"user-{i}") for i in range(n)]

    candidate = share(route, buckets, "2")

    # Binomial standard deviation at p=0.1 over 20 000 keys is 0.0021; 4 sigma of tolerance.
    assert candidate == pytest.approx(0.10, abs=4 * math.sqrt(0.1 * 0.9 / n))
    assert share(route, buckets, "1") == pytest.approx(1 - candidate)


def test_random_prediction_ids_split_like_keys() -> None:
    route = route_from_step(step(50))
    n = 20_000
    buckets = [bucket_for_id(uuid.uuid4()) for _ in range(n)]

    assert share(route, buckets, "2") == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / n))


def test_a_sticky_key_keeps_its_version_and_moves_only_one_way_as_the_canary_grows() -> None:
    keys = [f"session-{i}" for i in range(2000)]
    at_10 = route_from_step(step(10))
    at_50 = route_from_step(step(50, sequence=2))

    first = {k: at_10.version_for(bucket_for_key(LINE, k)) for k in keys}
    again = {k: at_10.version_for(bucket_for_key(LINE, k)) for k in keys}
    later = {k: at_50.version_for(bucket_for_key(LINE, k)) for k in keys}

    assert first == again
    # A key on the candidate at 10 % stays there at 50 %: buckets only ever join the candidate.
    assert all(later[k] == "2" for k in keys if first[k] == "2")
    assert bucket_for_key(LINE, "a") == bucket_for_key(LINE, "a")
    assert all(0 <= bucket_for_key(LINE, k) < BUCKETS for k in keys)


def test_zero_and_hundred_percent_send_everything_one_way() -> None:
    buckets = list(range(BUCKETS))

    assert share(route_from_step(step(0)), buckets, "1") == 1.0
    assert share(route_from_step(step(100)), buckets, "2") == 1.0


def test_only_a_newer_event_replaces_the_weights() -> None:
    table = RoutingTable()

    assert table.apply(route_from_step(step(10, at=T0, sequence=1)))
    assert table.apply(route_from_step(step(50, at=T0, sequence=2)))  # same instant, later step
    assert not table.apply(route_from_step(step(10, at=T0, sequence=1)))  # redelivered, stale
    assert not table.apply(route_from_step(step(50, at=T0, sequence=2)))  # the same again
    assert not table.apply(route_from_step(step(90, at=T0 - timedelta(seconds=1), sequence=9)))
    route = table.get(LINE)
    assert route is not None
    assert route.candidate_percent == 50
    assert table.apply(route_from_step(step(90, at=T0 + timedelta(seconds=1), sequence=0)))
    newest = table.get(LINE)
    assert newest is not None
    assert newest.candidate_percent == 90


def test_a_promotion_sends_everything_to_the_candidate_and_outranks_steps_of_its_instant() -> None:
    table = RoutingTable()
    table.apply(route_from_step(step(50, sequence=3)))

    assert table.apply(route_from_verdict(verdict("promoted")))
    assert not table.apply(route_from_step(step(50, sequence=3)))  # a late republication

    route = table.get(LINE)
    assert route is not None
    assert (route.champion_version, route.candidate_version) == ("2", None)
    assert share(route, list(range(BUCKETS)), "2") == 1.0


def test_a_rollback_sends_everything_to_the_champion() -> None:
    table = RoutingTable()
    table.apply(route_from_step(step(50)))

    assert table.apply(route_from_verdict(verdict("rolled_back", at=T0 + timedelta(minutes=1))))

    route = table.get(LINE)
    assert route is not None
    assert share(route, list(range(BUCKETS)), "1") == 1.0


def test_an_old_verdict_does_not_undo_a_newer_rollout() -> None:
    table = RoutingTable()
    table.apply(route_from_step(step(10, at=T0 + timedelta(hours=1), candidate="3")))

    assert not table.apply(route_from_verdict(verdict("rolled_back")))

    route = table.get(LINE)
    assert route is not None
    assert route.candidate_version == "3"
