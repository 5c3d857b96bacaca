from flywheel_contracts import RolloutStepV1
from flywheel_runtime.messaging import DeliveryCounter
from flywheel_runtime.topology import Topology


def test_each_replica_queue_is_its_own_and_dead_letters_into_the_subscriptions_one_dlq() -> None:
    topology = Topology(namespace="t1.")

    first = topology.replica_queue("inference-bff", RolloutStepV1, "r1")
    second = topology.replica_queue("inference-bff", RolloutStepV1, "r2")

    assert (first.name, second.name) == (
        "t1.inference-bff.rollout.step.r1",
        "t1.inference-bff.rollout.step.r2",
    )
    assert (first.exclusive, first.auto_delete, first.durable) == (True, True, False)
    assert first.arguments == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "t1.flywheel.dlx",
        "x-dead-letter-routing-key": "t1.inference-bff.rollout.step.dlq",
    }
    shared = topology.dead_letter_queue(first.name)
    assert topology.dead_letter_queue(second.name) is not shared
    assert topology.dead_letter_queue(second.name).name == shared.name
    assert (shared.durable, shared.exclusive, shared.auto_delete) == (True, False, False)
    assert shared.arguments["x-queue-type"] == "quorum"
    assert topology.queue_names == [first.name, shared.name, second.name]


def test_a_classic_queue_gets_no_delivery_limit_argument() -> None:
    queue = Topology(delivery_limit=3).replica_queue("svc", RolloutStepV1, "r1")

    assert "x-delivery-limit" not in (queue.arguments or {})


def test_deliveries_count_up_until_the_message_is_settled() -> None:
    counter = DeliveryCounter()
    key = ("q.r1", "event-1")

    counts = [counter.delivered(key, redelivered=n > 0) for n in range(4)]
    counter.settled(key)

    assert counts == [1, 2, 3, 4]
    assert len(counter) == 0
    assert counter.delivered(key, redelivered=False) == 1


def test_a_first_delivery_starts_afresh_and_a_forgotten_redelivery_counts_as_the_second() -> None:
    counter = DeliveryCounter(capacity=2)
    counter.delivered(("q", "a"), redelivered=False)
    counter.delivered(("q", "a"), redelivered=True)
    counter.delivered(("q", "b"), redelivered=False)
    counter.delivered(("q", "c"), redelivered=False)  # "a" is forgotten: the oldest

    assert len(counter) == 2
    assert counter.delivered(("q", "a"), redelivered=True) == 2
    assert counter.delivered(("q", "c"), redelivered=False) == 1
