"""``InferenceLog`` through a bounded in-process buffer, published in the background.

A prediction hands its ``inference.logged`` to ``offer``, which only appends to a queue and
returns: logging never waits for the broker and never fails a request. Background publishers
drain the queue with publisher confirms, each publish bounded by a timeout. Whatever cannot be
published is dropped and counted (``flywheel_bff_inference_logs_dropped_total{reason}``), never
silently: ``buffer_full`` while the broker is slower than the traffic or away, ``publish_failed``
when the broker refused or timed out, ``shutdown`` for what was still queued at stop.

``InferenceLogPublisher`` is the publish the service uses: one message per prediction is the
BFF's busiest broker traffic, so it skips FastStream's per-message middlewares.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractExchange
from faststream.rabbit import RabbitBroker

from flywheel_contracts import InferenceLoggedV1
from flywheel_inference_bff.metrics import BffMetrics
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)

Publish = Callable[[InferenceLoggedV1], Awaitable[None]]

WARN_EVERY_S = 10.0
"""Least time between two warnings about drops: an outage must not flood the logs."""


class InferenceLogPublisher:
    """Publishes one ``inference.logged`` on the service broker's channel and awaits the confirm.

    The message is the one ``publish_event`` sends (the event as JSON, persistent, its id,
    correlation id and type, the service as app id), written past FastStream's middlewares:
    the publishers run in background tasks outside any request's trace, so the telemetry
    middleware would open a span per prediction, each a trace of its own that nobody follows,
    and that plus the middlewares' metrics was half of what logging cost a request. Published
    and dropped logs are counted by ``BufferedInferenceLog`` instead.
    """

    def __init__(self, broker: RabbitBroker, topology: Topology, *, app_id: str) -> None:
        self._broker = broker
        self._exchange_spec = topology.exchange_for(InferenceLoggedV1)
        self._routing_key = InferenceLoggedV1.routing_key()
        self._app_id = app_id
        self._exchange: AbstractExchange | None = None

    async def __call__(self, event: InferenceLoggedV1) -> None:
        exchange = self._exchange
        if exchange is None:
            # Declared (passively known) by the topology at start; this only looks it up.
            exchange = self._exchange = await self._broker.declare_exchange(self._exchange_spec)
        await exchange.publish(
            Message(
                event.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=DeliveryMode.PERSISTENT,
                message_id=str(event.event_id),
                correlation_id=str(event.correlation_id),
                type=event.type,
                app_id=self._app_id,
                timestamp=event.occurred_at,
            ),
            routing_key=self._routing_key,
            mandatory=False,
        )


class DisabledInferenceLog:
    """Logging switched off (``log_enabled=false``), to measure what logging costs."""

    @property
    def enabled(self) -> bool:
        return False

    def offer(self, event: InferenceLoggedV1) -> None:  # noqa: ARG002 - logging is off
        return None


class BufferedInferenceLog:
    """A bounded queue of inference logs and the tasks that publish them."""

    def __init__(
        self,
        publish: Publish,
        metrics: BffMetrics,
        *,
        capacity: int = 10_000,
        publishers: int = 4,
        publish_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publish
        self._metrics = metrics
        self._queue: asyncio.Queue[InferenceLoggedV1] = asyncio.Queue(maxsize=capacity)
        self._publishers = publishers
        self._timeout_s = publish_timeout_s
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._warned_at: float | None = None

    @property
    def enabled(self) -> bool:
        return True

    @property
    def pending(self) -> int:
        """Logs waiting in the buffer."""
        return self._queue.qsize()

    def offer(self, event: InferenceLoggedV1) -> None:
        """Queue one log; drop and count it when the buffer is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._drop("buffer_full")

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._drain(), name=f"inference-log-publisher-{n}")
                for n in range(self._publishers)
            ]

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Publish what is queued for up to ``flush_timeout_s``, then drop (and count) the rest."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), flush_timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        left = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            left += 1
        if left:
            self._metrics.logs_dropped.labels("shutdown").inc(left)
            log.warning("inference logs dropped at shutdown", dropped=left)

    async def _drain(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                # A deadline on this task rather than wait_for, which would start a task per log.
                async with asyncio.timeout(self._timeout_s):
                    await self._publish(event)
            except asyncio.CancelledError:
                self._drop("shutdown")
                raise
            except Exception as error:  # any broker failure: counted here, never raised
                self._drop("publish_failed", error)
            else:
                self._metrics.logs_published.inc()
            finally:
                self._queue.task_done()

    def _drop(self, reason: str, error: BaseException | None = None) -> None:
        self._metrics.logs_dropped.labels(reason).inc()
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "inference logs are being dropped",
                reason=reason,
                error=None if error is None else type(error).__name__,
                pending=self._queue.qsize(),
            )
