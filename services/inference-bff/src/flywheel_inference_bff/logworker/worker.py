"""The batching loop: take deliveries, write full or old batches, then acknowledge them.

FastStream has no batch consumer for RabbitMQ, so the worker talks to aio-pika directly with
manual acknowledgements. Delivery rules, in the order they matter:

* a message that is not a valid ``InferenceLoggedV1`` is rejected at once, into ``<queue>.dlq``;
  it never waits in a batch nor blocks one;
* a batch is acknowledged only after every one of its files is written; while S3 fails the
  batch is written again with capped exponential backoff and its messages stay unacknowledged,
  and the prefetch limit stops the broker handing over more than the worker holds;
* a stop writes the pending batch; if it cannot within ``stop_timeout_s`` the messages stay
  unacknowledged and the broker delivers them again once the channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from faststream.rabbit import RabbitBroker, RabbitQueue
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.topology import dead_letter_queue_name
from flywheel_inference_bff.logworker.writer import WrittenBatch
from flywheel_runtime.errors import DependencyUnavailableError, FlywheelError
from flywheel_runtime.failpoints import failpoint
from flywheel_runtime.messaging import (
    MessageTooLargeError,
    check_size,
    dead_letter_headers,
    delivery_count,
)
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
"""Seconds on a monotonic scale; tests pass a fake one."""


class Delivery(Protocol):
    """What the worker needs of a broker message; aio-pika's ``IncomingMessage`` is one."""

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str | None: ...

    async def ack(self, multiple: bool = False) -> None: ...

    async def reject(self, requeue: bool = False) -> None: ...


DeadLetter = Callable[[Delivery, str, BaseException], Awaitable[bool]]
"""Puts a delivery into its dead-letter queue with the reason and error and acknowledges it;
False when it could not (the worker then rejects it, and the broker dead-letters it)."""


class BatchWriter(Protocol):
    async def write(self, events: Sequence[InferenceLoggedV1]) -> WrittenBatch: ...


@dataclass
class Batch:
    """Messages collected for one write, and the rule that says when to write them."""

    size: int
    """Messages that make the batch full."""
    max_wait_s: float
    """Age, from the first message, at which a batch is written however small."""
    events: list[InferenceLoggedV1] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    started_at: float | None = None
    """When the first message was received: a batch's age counts from there."""

    def __len__(self) -> int:
        return len(self.events)

    def add(self, event: InferenceLoggedV1, delivery: Delivery, received_at: float) -> None:
        if self.started_at is None:
            self.started_at = received_at
        self.events.append(event)
        self.deliveries.append(delivery)

    @property
    def full(self) -> bool:
        return len(self.events) >= self.size

    def time_left(self, now: float) -> float | None:
        """Seconds until the batch is due by age; None while it is empty (no deadline yet)."""
        if self.started_at is None:
            return None
        return self.started_at + self.max_wait_s - now

    def due(self, now: float) -> bool:
        left = self.time_left(now)
        return self.full or (left is not None and left <= 0)


@dataclass(frozen=True)
class WorkerMetrics:
    """Prometheus series of the worker, on the service's registry."""

    rows: Counter
    batches: Counter
    files: Counter
    failures: Counter
    rejected: Counter
    pending: Gauge
    batch_messages: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        prefix = "flywheel_logworker"
        return cls(
            rows=Counter(f"{prefix}_rows_written", "Rows written to S3.", registry=registry),
            batches=Counter(
                f"{prefix}_batches_written", "Batches written and acknowledged.", registry=registry
            ),
            files=Counter(f"{prefix}_files_written", "Parquet files written.", registry=registry),
            failures=Counter(
                f"{prefix}_write_failures", "Batch writes that failed.", registry=registry
            ),
            rejected=Counter(
                f"{prefix}_messages_rejected",
                "Malformed messages dead-lettered.",
                registry=registry,
            ),
            pending=Gauge(
                f"{prefix}_pending_messages",
                "Messages taken from the queue and not yet acknowledged.",
                registry=registry,
            ),
            batch_messages=Gauge(
                f"{prefix}_batch_messages",
                "Messages in the batch being filled.",
                registry=registry,
            ),
        )


class LogWorker:
    """Turns deliveries into batches written by a ``BatchWriter``; one loop per process."""

    def __init__(
        self,
        writer: BatchWriter,
        metrics: WorkerMetrics,
        *,
        batch_size: int,
        max_wait_s: float,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        max_message_bytes: int | None = None,
        dead_letter: DeadLetter | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._writer = writer
        self._max_message_bytes = max_message_bytes
        self._dead_letter = dead_letter
        self._metrics = metrics
        self._batch_size = batch_size
        self._max_wait_s = max_wait_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._clock = clock
        # Events with their delivery and time of receipt; None is put by ``stop``: write what
        # is pending, then end.
        self._inbox: asyncio.Queue[tuple[InferenceLoggedV1, Delivery, float] | None] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None
        self._held = 0
        self._failing = False

    @property
    def pending(self) -> int:
        """Messages accepted and not yet acknowledged."""
        return self._held

    async def deliver(self, delivery: Delivery) -> None:
        """Consumer callback: queue a valid event for the next batch, dead-letter anything else."""
        try:
            check_size(delivery.body, self._max_message_bytes)
        except MessageTooLargeError as too_large:
            await self._refuse(delivery, "too_large", too_large)
            return
        try:
            event = InferenceLoggedV1.model_validate_json(delivery.body)
        except ValidationError as error:
            await self._refuse(delivery, "rejected", error)
            return
        self._hold(1)
        self._inbox.put_nowait((event, delivery, self._clock()))

    async def _refuse(self, delivery: Delivery, reason: str, error: Exception) -> None:
        self._metrics.rejected.inc()
        details = (
            error.errors(include_url=False, include_input=False)[:3]
            if isinstance(error, ValidationError)
            else str(error)
        )
        log.warning(
            "inference log dead-lettered",
            message_id=delivery.message_id,
            reason=reason,
            errors=details,
        )
        if self._dead_letter is None or not await self._dead_letter(delivery, reason, error):
            await delivery.reject(requeue=False)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="logworker")

    async def stop(self, timeout_s: float) -> None:
        """Write the pending batch and end; past ``timeout_s`` leave it for redelivery."""
        task, self._task = self._task, None
        if task is None:
            return
        self._inbox.put_nowait(None)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            log.warning(
                "pending batch not written before stop; the broker will deliver it again",
                messages=self._held,
                timeout_s=timeout_s,
            )
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def check(self) -> None:
        """Readiness: the loop runs and its last write did not fail."""
        if self._task is None or self._task.done():
            raise DependencyUnavailableError("log worker loop is not running")
        if self._failing:
            raise DependencyUnavailableError("writing inference logs to S3 fails")

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = Batch(self._batch_size, self._max_wait_s)
            stopping = await self._fill(batch)
            if batch:
                await self._flush(batch)

    async def _fill(self, batch: Batch) -> bool:
        """Add deliveries until the batch is due; True when a stop was asked for.

        Messages already received always join, up to the batch size, even once the batch is
        due by age: after a slow write the waiting ones are old, and writing them one batch
        each would only make many small files.
        """
        while not batch.full:
            try:
                item = self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                if batch.due(self._clock()):
                    return False
                try:
                    async with asyncio.timeout(batch.time_left(self._clock())):
                        item = await self._inbox.get()
                except TimeoutError:
                    return False
            if item is None:
                return True
            batch.add(*item)
            self._metrics.batch_messages.set(len(batch))
        return False

    async def _flush(self, batch: Batch) -> None:
        """Write until it succeeds, then acknowledge every message of the batch."""
        delay = self._retry_initial_s
        attempt = 1
        while True:
            try:
                written = await self._writer.write(batch.events)
            except Exception as error:
                # Whatever failed, the data is sound: keep it unacknowledged and try again.
                self._failing = True
                self._metrics.failures.inc()
                log.warning(
                    "writing inference logs failed; retrying",
                    attempt=attempt,
                    messages=len(batch),
                    retry_in_s=delay,
                    error=str(error),
                    error_type=type(error).__name__,
                    # Our own errors say enough; anything else needs its traceback.
                    exc_info=None if isinstance(error, FlywheelError) else error,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                attempt += 1
                continue
            break
        self._failing = False
        self._metrics.batch_messages.set(0)
        failpoint("batch.written")
        await self._settle(batch.deliveries, lambda d: d.ack())
        self._metrics.rows.inc(written.rows)
        self._metrics.batches.inc()
        self._metrics.files.inc(len(written.keys))
        log.info(
            "inference logs written",
            batch_id=written.batch_id,
            rows=written.rows,
            files=len(written.keys),
            attempts=attempt,
        )

    async def _settle(
        self, deliveries: Sequence[Delivery], action: Callable[[Delivery], Awaitable[None]]
    ) -> None:
        lost = 0
        for delivery in deliveries:
            try:
                await action(delivery)
            except (AMQPError, ChannelInvalidStateError, ConnectionError):
                # The channel closed since delivery: the broker hands these out again, and the
                # reader drops the repeated event ids.
                lost += 1
        self._hold(-len(deliveries))
        if lost:
            log.warning("acknowledgements lost with their channel", messages=lost)

    def _hold(self, change: int) -> None:
        self._held += change
        self._metrics.pending.set(self._held)


class QueueConsumer:
    """Feeds ``LogWorker.deliver`` from the worker's queue on a channel of its own.

    The queue and its binding are declared through the service's FastStream broker, so they
    carry the topology's delivery limit and dead-letter queue like every other subscription;
    the channel is separate so its prefetch limit applies to this consumer alone.
    """

    def __init__(
        self,
        broker: RabbitBroker,
        topology: Topology,
        queue: RabbitQueue,
        *,
        prefetch: int,
    ) -> None:
        self._broker = broker
        self._topology = topology
        self._spec = queue
        self._prefetch = prefetch
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, callback: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        connection = await self._broker.connect()
        exchange = await self._broker.declare_exchange(self._topology.inference_exchange)
        declared = await self._broker.declare_queue(self._spec)
        await declared.bind(exchange, routing_key=self._spec.routing_key)
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self._channel.get_queue(self._spec.name)
        self._tag = await self._queue.consume(callback)

    async def dead_letter(self, delivery: Delivery, reason: str, error: BaseException) -> bool:
        """Publish ``delivery`` into the queue's dead-letter queue with why (confirmed,
        ``mandatory``), then acknowledge it; False when the publish failed."""
        channel = self._channel
        if channel is None or channel.is_closed:
            return False
        headers = dead_letter_headers(
            dict(getattr(delivery, "headers", None) or {}),
            reason=reason,
            error=error,
            queue=self._spec.name,
            deliveries=delivery_count(getattr(delivery, "headers", None)),
        )
        message = aio_pika.Message(
            delivery.body,
            headers=headers,
            message_id=delivery.message_id,
            correlation_id=getattr(delivery, "correlation_id", None),
            type=getattr(delivery, "type", None),
            content_type=getattr(delivery, "content_type", None),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await channel.default_exchange.publish(
                message, routing_key=dead_letter_queue_name(self._spec.name), mandatory=True
            )
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as failure:
            log.warning("dead-letter publish failed; rejecting instead", error=repr(failure))
            return False
        # A lost ack leaves a copy behind, delivered and dead-lettered again: never lost.
        with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError):
            await delivery.ack()
        return True

    async def cancel(self) -> None:
        """Stop deliveries; messages already delivered stay ours to settle."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError):
                await self._queue.cancel(self._tag)
            self._tag = None

    async def close(self) -> None:
        """Close the channel; the broker requeues whatever is still unacknowledged."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None
