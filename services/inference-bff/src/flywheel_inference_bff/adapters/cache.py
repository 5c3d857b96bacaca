"""``PredictionCache`` on Redis, or none at all.

A cached answer is the class probabilities of one image (by sha256) under one registered model
version: versions never change, so an entry is right for as long as it lives. The cache may only
ever save time: every Redis call is bounded by a short timeout, a failure is a miss (counted),
and after one the cache is skipped for ``backoff_s`` so a dead Redis does not add its timeout
to every request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flywheel_inference_bff.metrics import BffMetrics

log = structlog.get_logger(__name__)

PREFIX = "flywheel:bff:prediction:"


class RedisPredictionCache:
    """Probabilities as float64 bytes under ``PREFIX + <model>:<version>:<sha256>``."""

    def __init__(
        self,
        url: str,
        metrics: BffMetrics,
        *,
        ttl_s: int = 3600,
        timeout_s: float = 0.05,
        backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._backoff_s = backoff_s
        self._clock = clock
        self._skip_until = 0.0

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        await asyncio.wait_for(self._redis.ping(), self._timeout_s)

    async def get(self, keys: Sequence[str]) -> list[list[float] | None]:
        if not keys:
            return []
        if self._skipping():
            self._metrics.cache.labels("skipped").inc(len(keys))
            return [None] * len(keys)
        try:
            values = await asyncio.wait_for(
                self._redis.mget([PREFIX + key for key in keys]), self._timeout_s
            )
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            self._metrics.cache.labels("error").inc(len(keys))
            return [None] * len(keys)
        found: list[list[float] | None] = [_decode(value) for value in values]
        hits = sum(value is not None for value in found)
        self._metrics.cache.labels("hit").inc(hits)
        self._metrics.cache.labels("miss").inc(len(keys) - hits)
        return found

    async def put(self, entries: Mapping[str, list[float]]) -> None:
        if not entries or self._skipping():
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, probabilities in entries.items():
                    pipe.set(
                        PREFIX + key,
                        np.asarray(probabilities, dtype=np.float64).tobytes(),
                        ex=self._ttl_s,
                    )
                await asyncio.wait_for(pipe.execute(), self._timeout_s)
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)

    def _skipping(self) -> bool:
        return self._clock() < self._skip_until

    def _failed(self, error: BaseException) -> None:
        log.warning("prediction cache unavailable; skipped for a while", error=type(error).__name__)
        self._skip_until = self._clock() + self._backoff_s


def _decode(value: object) -> list[float] | None:
    if not isinstance(value, bytes) or not value or len(value) % 8:
        return None
    return [float(p) for p in np.frombuffer(value, dtype=np.float64)]
