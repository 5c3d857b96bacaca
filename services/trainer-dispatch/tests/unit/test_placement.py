import pytest

from flywheel_trainer_dispatch.placement import (
    Budget,
    PlacementOption,
    PlacementRequest,
    Pool,
    place,
    queue_delay,
)

HOUR = 3600.0


def _request(
    *,
    burstable: bool = True,
    budget: Budget = Budget.HIGH,
    deadline_s: float | None = None,
    expected_run_s: float = HOUR,
    burst_after_s: float = 900.0,
) -> PlacementRequest:
    return PlacementRequest(
        burstable=burstable,
        budget=budget,
        deadline_s=deadline_s,
        expected_run_s=expected_run_s,
        burst_after_s=burst_after_s,
    )


def _option(
    cluster: str,
    delay: float | None,
    *,
    pool: Pool = Pool.PRIVATE,
    cost: Budget = Budget.LOW,
    flavor: str = "default",
    unavailable: str | None = None,
) -> PlacementOption:
    return PlacementOption(
        cluster=cluster,
        flavor=flavor,
        pool=pool,
        cost=cost,
        queue_delay_s=delay,
        unavailable=unavailable,
    )


def test_a_private_pool_that_starts_in_time_wins_over_a_faster_public_one() -> None:
    decision = place(
        _request(),
        [_option("cloud", 0, pool=Pool.PUBLIC, cost=Budget.STANDARD), _option("onprem", 600)],
    )

    assert decision is not None
    assert (decision.cluster, decision.pool, decision.on_time) == ("onprem", Pool.PRIVATE, True)
    assert decision.reason == "private pool starts in time"


def test_among_private_pools_the_soonest_then_the_first_listed() -> None:
    options = [_option("a", 300), _option("b", 60), _option("c", 60)]

    decision = place(_request(), options)

    assert decision is not None
    assert decision.cluster == "b"


def test_a_burstable_run_bursts_when_private_pools_queue_too_long() -> None:
    options = [
        _option("onprem", 2 * HOUR),
        _option("cloud-a", 120, pool=Pool.PUBLIC, cost=Budget.HIGH),
        _option("cloud-b", 600, pool=Pool.PUBLIC, cost=Budget.STANDARD),
    ]

    decision = place(_request(), options)

    assert decision is not None
    assert decision.cluster == "cloud-b"  # cheapest public option that starts in time
    assert decision.on_time
    assert decision.reason.startswith("burst")


def test_a_run_that_may_not_burst_waits_for_the_private_pool() -> None:
    options = [_option("onprem", 2 * HOUR), _option("cloud", 0, pool=Pool.PUBLIC)]

    decision = place(_request(burstable=False), options)

    assert decision is not None
    assert decision.cluster == "onprem"
    assert not decision.on_time


def test_the_budget_keeps_a_run_off_dear_flavors() -> None:
    options = [
        _option("onprem", 0, flavor="h100", cost=Budget.HIGH),
        _option("onprem", 0, flavor="t4", cost=Budget.LOW),
    ]

    decision = place(_request(budget=Budget.LOW), options)

    assert decision is not None
    assert decision.flavor == "t4"
    assert place(_request(budget=Budget.LOW), options[:1]) is None


def test_a_deadline_sets_how_long_a_run_may_queue() -> None:
    options = [_option("onprem", 1800), _option("cloud", 0, pool=Pool.PUBLIC)]

    relaxed = place(_request(deadline_s=3 * HOUR), options)
    tight = place(_request(deadline_s=HOUR + 600), options)

    assert relaxed is not None
    assert relaxed.cluster == "onprem"
    assert tight is not None
    assert tight.cluster == "cloud"


def test_when_nothing_is_in_time_the_soonest_private_pool_is_preferred() -> None:
    options = [
        _option("cloud", 5 * HOUR, pool=Pool.PUBLIC),
        _option("onprem-b", 5 * HOUR),
        _option("onprem-a", 9 * HOUR),
    ]

    decision = place(_request(deadline_s=HOUR), options)

    assert decision is not None
    assert decision.cluster == "onprem-b"
    assert not decision.on_time
    assert decision.reason.startswith("no option starts within")


def test_clusters_that_did_not_answer_are_left_out() -> None:
    options = [
        _option("onprem", None, unavailable="the API server did not answer"),
        _option("other", 30, unavailable="LocalQueue missing"),
        _option("cloud", 0, pool=Pool.PUBLIC),
    ]

    decision = place(_request(burstable=True), options)

    assert decision is not None
    assert decision.cluster == "cloud"
    assert place(_request(burstable=False), options) is None
    assert place(_request(), []) is None


@pytest.mark.parametrize(
    ("pending", "admitted", "slots", "delay"),
    [
        (0, 0, 1, 0.0),
        (0, 1, 2, 0.0),
        (0, 1, 1, HOUR),
        (3, 1, 1, 4 * HOUR),
        (0, 2, 2, HOUR / 2),
        (4, 2, 2, 5 * HOUR / 2),
    ],
)
def test_the_queue_delay_spreads_the_runs_ahead_over_the_slots(
    pending: int, admitted: int, slots: int, delay: float
) -> None:
    assert queue_delay(pending, admitted, slots, HOUR) == delay
