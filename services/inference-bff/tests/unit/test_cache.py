from flywheel_inference_bff.adapters.cache import RedisPredictionCache
from flywheel_inference_bff.metrics import BffMetrics
from flywheel_testing.net import free_port

from ..fakes import counter


async def test_an_unreachable_redis_is_a_counted_miss_and_then_skipped() -> None:
    metrics = BffMetrics.create()
    now = [0.0]
    cache = RedisPredictionCache(
        f"redis://127.0.0.1:{free_port()}/0",
        metrics,
        timeout_s=0.2,
        backoff_s=5,
        clock=lambda: now[0],
    )

    first = await cache.get(["a", "b"])
    await cache.put({"a": [0.5, 0.5]})
    second = await cache.get(["a"])
    now[0] = 10.0
    third = await cache.get(["a"])
    await cache.close()

    assert first == [None, None]
    assert second == third == [None]
    assert counter(metrics, "flywheel_bff_cache_lookups_total", result="error") == 3
    assert counter(metrics, "flywheel_bff_cache_lookups_total", result="skipped") == 1
