import os
import uuid

import pytest

from flywheel_inference_bff.adapters.cache import RedisPredictionCache
from flywheel_inference_bff.metrics import BffMetrics

from ..fakes import counter

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("FLYWHEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def test_probabilities_round_trip_exactly_through_redis() -> None:
    metrics = BffMetrics.create()
    cache = RedisPredictionCache(REDIS_URL, metrics, ttl_s=60, timeout_s=1.0)
    key = f"digits:{uuid.uuid4().hex}:{'a' * 64}"
    probabilities = [0.1, 0.2, 0.30000000000000004, 0.4]

    await cache.ping()
    missing = await cache.get([key])
    await cache.put({key: probabilities})
    found = await cache.get([key, key + "-other"])
    await cache.close()

    assert missing == [None]
    assert found == [probabilities, None]
    assert counter(metrics, "flywheel_bff_cache_lookups_total", result="hit") == 1
    assert counter(metrics, "flywheel_bff_cache_lookups_total", result="miss") == 2
