import asyncio
import uuid
from datetime import UTC, datetime

from flywheel_contracts import InferenceLoggedV1
from flywheel_inference_bff.adapters.inference_log import BufferedInferenceLog
from flywheel_inference_bff.metrics import BffMetrics
from flywheel_testing.wait import wait_for

from ..fakes import counter


def event() -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": {
                "request_id": uuid.uuid4(),
                "project_id": "digits",
                "model_line": "digits-classifier",
                "registered_model": "digits-classifier",
                "model_version": "1",
                "input_sha256": "0" * 64,
                "latency_ms": 1.0,
                "status": "ok",
                "served_at": datetime.now(UTC),
            }
        }
    )


def dropped(metrics: BffMetrics, reason: str) -> float:
    return counter(metrics, "flywheel_bff_inference_logs_dropped_total", reason=reason)


async def test_a_full_buffer_drops_and_counts_without_blocking() -> None:
    metrics = BffMetrics.create()
    published: list[InferenceLoggedV1] = []

    async def publish(e: InferenceLoggedV1) -> None:
        published.append(e)

    buffer = BufferedInferenceLog(publish, metrics, capacity=3)

    for _ in range(5):
        buffer.offer(event())  # not started: nothing drains

    assert buffer.pending == 3
    assert dropped(metrics, "buffer_full") == 2
    buffer.start()
    await wait_for(lambda: _true(len(published) == 3), message="buffer drained")
    await buffer.stop()
    assert counter(metrics, "flywheel_bff_inference_logs_published_total") == 3


async def test_failed_and_timed_out_publishes_are_counted_and_the_drain_goes_on() -> None:
    metrics = BffMetrics.create()
    never = asyncio.Event()
    calls = 0

    async def publish(_: InferenceLoggedV1) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("broker gone")
        if calls == 2:
            await never.wait()  # hangs: the timeout must end it

    buffer = BufferedInferenceLog(publish, metrics, publishers=1, publish_timeout_s=0.05)
    buffer.start()
    for _ in range(3):
        buffer.offer(event())

    await wait_for(
        lambda: _true(counter(metrics, "flywheel_bff_inference_logs_published_total") == 1),
        message="third log published",
    )
    await buffer.stop()

    assert dropped(metrics, "publish_failed") == 2


async def test_what_is_left_at_stop_is_counted_as_dropped() -> None:
    metrics = BffMetrics.create()
    stuck = asyncio.Event()

    async def publish(_: InferenceLoggedV1) -> None:
        await stuck.wait()

    buffer = BufferedInferenceLog(publish, metrics, publishers=1, publish_timeout_s=60)
    buffer.start()
    for _ in range(4):
        buffer.offer(event())
    await asyncio.sleep(0)

    await buffer.stop(flush_timeout_s=0.05)

    # One was in flight (cancelled), three still queued: all four counted.
    assert dropped(metrics, "shutdown") == 4
    assert buffer.pending == 0


async def _true(value: bool) -> bool:
    return value
