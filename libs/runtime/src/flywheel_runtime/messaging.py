"""Broker factory and the one middleware that turns errors into acknowledgements.

Handlers never catch to decide delivery: a retryable error is nacked with requeue (the quorum
queue's delivery limit bounds the retries), anything else — a payload that fails validation
included — is rejected at once into the dead-letter queue.

A retryable failure waits before its requeue, doubling from ``retry_delay_s`` up to
``retry_delay_max_s``: requeued at once, a good event would spend its whole delivery limit
within the first second of a database restart and land in the dead-letter queue. Only the
failing message waits; the consumer's other prefetched messages flow meanwhile.

A message that goes to the dead-letter queue carries why: the middleware publishes it there
itself (publisher confirm, ``mandatory``) with ``x-flywheel-*`` headers naming the reason, the
error and the queue, and only then acknowledges it. RabbitMQ's own dead-lettering, which
records no error, is the fallback when that publish fails, and remains the broker's guard for
the delivery limit. A message larger than ``max_message_bytes`` is dead-lettered unread.

Classic queues (a replica's exclusive queue) neither count deliveries nor enforce a delivery
limit: the middleware counts their deliveries itself (``DeliveryCounter``) and dead-letters a
retryable failure at ``delivery_limit`` all the same.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

import structlog
from faststream import BaseMiddleware
from faststream.exceptions import AckMessage, HandlerException, NackMessage, RejectMessage
from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
from opentelemetry import context as otel_context
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from flywheel_contracts import Event
from flywheel_contracts.topology import (
    DEATHS_HEADER,
    DELIVERIES_HEADER,
    ERROR_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
)
from flywheel_runtime.db import is_transaction_conflict
from flywheel_runtime.errors import FlywheelError
from flywheel_runtime.failpoints import failpoint
from flywheel_runtime.telemetry import TRACE_CONTEXTS
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    OperationalError,
    InterfaceError,
)
"""Errors of the infrastructure that a later delivery may not meet again."""


ERROR_HEADER_CHARS = 1000


class MessageTooLargeError(FlywheelError):
    """A message above the consumer's size limit: dead-lettered without being parsed."""

    code = "message_too_large"


def check_size(body: bytes, limit: int | None) -> None:
    """Raise ``MessageTooLargeError`` when ``body`` is over ``limit`` (None: no limit)."""
    if limit is not None and len(body) > limit:
        raise MessageTooLargeError(
            f"message of {len(body)} bytes exceeds the limit of {limit} bytes"
        )


def delivery_count(headers: dict[str, Any] | None) -> int:
    """Which delivery of its message this is, from the quorum queue's ``x-delivery-count``."""
    count = (headers or {}).get("x-delivery-count", 0)
    return int(count) + 1 if isinstance(count, int) else 1


DeliveryKey = tuple[str, str]
"""A message on one queue: the queue's name and the message's id (or its body's digest)."""


class DeliveryCounter:
    """Deliveries of the messages of queues that count none themselves.

    RabbitMQ counts deliveries (``x-delivery-count``) on quorum queues only; a classic queue
    just flags a redelivery. On an exclusive queue this process is the one consumer, so its
    own count is exact: it starts at a message's first delivery and is forgotten once the
    message is settled. At most ``capacity`` unsettled messages are remembered, oldest
    forgotten first (one forgotten counts as a second delivery when it comes back).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._counts: OrderedDict[DeliveryKey, int] = OrderedDict()

    def delivered(self, key: DeliveryKey, *, redelivered: bool) -> int:
        """Count one delivery of ``key``'s message; returns which delivery this is."""
        count = self._counts.get(key, 1) + 1 if redelivered else 1
        self._counts[key] = count
        self._counts.move_to_end(key)
        while len(self._counts) > self._capacity:
            self._counts.popitem(last=False)
        return count

    def settled(self, key: DeliveryKey) -> None:
        """``key``'s message was acked or dead-lettered: it will not come back."""
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)


def dead_letter_headers(
    headers: dict[str, Any], *, reason: str, error: BaseException, queue: str, deliveries: int
) -> dict[str, Any]:
    """``headers`` with this dead-lettering's reason, error, queue and count added."""
    previous = headers.get(DEATHS_HEADER, 0)
    deaths = previous if isinstance(previous, int) else 0
    described = f"{type(error).__name__}: {error}"[:ERROR_HEADER_CHARS]
    kept = {k: v for k, v in headers.items() if k != "x-delivery-count"}
    return kept | {
        REASON_HEADER: reason,
        ERROR_HEADER: described,
        QUEUE_HEADER: queue,
        DELIVERIES_HEADER: deliveries,
        DEATHS_HEADER: deaths + 1,
    }


def is_retryable(error: BaseException) -> bool:
    """Whether handling the same message again may succeed."""
    if isinstance(error, FlywheelError):
        return error.retryable
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, TRANSIENT_ERRORS) or is_transaction_conflict(error)


class ErrorToAckMiddleware(BaseMiddleware):
    """Maps a handler's exception to nack-requeue (retryable) or reject (to the DLQ)."""

    retry_delay_s: float = 0.2
    """Wait before the first requeue; doubled on each later delivery."""
    retry_delay_max_s: float = 5.0
    """Longest wait before a requeue."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest message body a consumer reads; a larger one is dead-lettered unread."""
    delivery_limit: int | None = None
    """The queues' delivery limit: the last delivery a retryable failure may have is
    dead-lettered here, with its error, instead of by the broker without one (on a classic
    queue, which has no limit of its own, only here)."""
    deliveries: ClassVar[DeliveryCounter] = DeliveryCounter()
    """Delivery counts of classic queues' messages, one counter per broker."""

    @classmethod
    def with_delays(
        cls,
        retry_delay_s: float,
        retry_delay_max_s: float,
        *,
        max_message_bytes: int = max_message_bytes,
        delivery_limit: int | None = None,
    ) -> type[ErrorToAckMiddleware]:
        """This middleware with other settings (FastStream instantiates it per message)."""
        return type(
            cls.__name__,
            (cls,),
            {
                "retry_delay_s": retry_delay_s,
                "retry_delay_max_s": retry_delay_max_s,
                "max_message_bytes": max_message_bytes,
                "delivery_limit": delivery_limit,
                "deliveries": DeliveryCounter(),
            },
        )

    async def consume_scope(
        self,
        call_next: Callable[[StreamMessage[Any]], Awaitable[Any]],
        msg: StreamMessage[Any],
    ) -> Any:
        uncounted = self._uncounted(msg)
        delivery = (
            _delivery_count(msg)
            if uncounted is None
            else self.deliveries.delivered(
                uncounted, redelivered=bool(getattr(msg.raw_message, "redelivered", False))
            )
        )
        requeued = False
        try:
            check_size(msg.body, self.max_message_bytes)
            result = await call_next(msg)
            failpoint("handler.done", (msg.raw_message.routing_key or "",))
            return result
        except HandlerException:
            raise
        except Exception as error:
            retry = is_retryable(error)
            last = self.delivery_limit is not None and delivery > self.delivery_limit
            log.error(
                "message handling failed",
                message_id=msg.message_id,
                correlation_id=msg.correlation_id,
                routing_key=msg.raw_message.routing_key,
                delivery=delivery,
                action="requeue" if retry and not last else "dead-letter",
                exc_info=error,
            )
            if retry and not last:
                requeued = True
                await asyncio.sleep(
                    min(self.retry_delay_s * 2 ** (delivery - 1), self.retry_delay_max_s)
                )
                raise NackMessage(requeue=True) from error
            if isinstance(error, MessageTooLargeError):
                reason = "too_large"
            else:
                reason = "delivery_limit" if retry else "rejected"
            if await self._dead_letter(msg, error, reason=reason, delivery=delivery):
                raise AckMessage() from error
            raise RejectMessage(requeue=False) from error
        finally:
            if uncounted is not None and not requeued:
                self.deliveries.settled(uncounted)

    def _uncounted(self, msg: StreamMessage[Any]) -> DeliveryKey | None:
        """The message's key when its queue counts no deliveries (a classic queue), else
        None: the broker's ``x-delivery-count`` says which delivery it is."""
        queue = getattr(self.context.get_local("handler_"), "queue", None)
        arguments = getattr(queue, "arguments", None) or {}
        if queue is None or arguments.get("x-queue-type", "classic") != "classic":
            return None
        identity = msg.raw_message.message_id or hashlib.sha256(msg.body).hexdigest()
        return (str(queue.name), str(identity))

    async def _dead_letter(
        self, msg: StreamMessage[Any], error: BaseException, *, reason: str, delivery: int
    ) -> bool:
        """Publish ``msg`` into its queue's dead-letter queue with why; False when it could
        not (the caller then lets the broker dead-letter it)."""
        queue = getattr(self.context.get_local("handler_"), "queue", None)
        arguments = getattr(queue, "arguments", None) or {}
        exchange = arguments.get("x-dead-letter-exchange")
        routing_key = arguments.get("x-dead-letter-routing-key")
        broker = self.context.get("broker")
        if not (exchange and routing_key and broker is not None and queue is not None):
            return False
        raw = msg.raw_message
        headers = dead_letter_headers(
            dict(raw.headers or {}),
            reason=reason,
            error=error,
            queue=queue.name,
            deliveries=delivery,
        )
        try:
            await broker.publish(
                msg.body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                message_id=raw.message_id,
                correlation_id=raw.correlation_id,
                message_type=raw.type,
                content_type=raw.content_type,
                content_encoding=raw.content_encoding,
                timestamp=raw.timestamp,
                persist=True,
                mandatory=True,
            )
        except Exception as failure:  # any failure: the broker's dead-lettering instead
            log.warning("dead-letter publish failed; rejecting instead", error=repr(failure))
            return False
        return True


class LogContextMiddleware(BaseMiddleware):
    """Binds the message's event_id and correlation_id to every log line of its handling."""

    async def consume_scope(
        self,
        call_next: Callable[[StreamMessage[Any]], Awaitable[Any]],
        msg: StreamMessage[Any],
    ) -> Any:
        with structlog.contextvars.bound_contextvars(
            event_id=msg.message_id, correlation_id=msg.correlation_id
        ):
            return await call_next(msg)


class TraceMemoryMiddleware(BaseMiddleware):
    """Remembers the consumer span's context under the message's correlation id, so events
    a background loop emits later for the same correlation id continue its trace."""

    async def consume_scope(
        self,
        call_next: Callable[[StreamMessage[Any]], Awaitable[Any]],
        msg: StreamMessage[Any],
    ) -> Any:
        if msg.correlation_id:
            TRACE_CONTEXTS.remember(msg.correlation_id, otel_context.get_current())
        return await call_next(msg)


def _delivery_count(msg: StreamMessage[Any]) -> int:
    return delivery_count(msg.raw_message.headers)


def create_broker(
    url: str,
    *,
    app_id: str,
    tracer_provider: TracerProvider | None = None,
    metrics_registry: CollectorRegistry | None = None,
    extra_middlewares: Sequence[Any] = (),
    fail_fast: bool = True,
    retry_delay_s: float = ErrorToAckMiddleware.retry_delay_s,
    retry_delay_max_s: float = ErrorToAckMiddleware.retry_delay_max_s,
    max_message_bytes: int = ErrorToAckMiddleware.max_message_bytes,
    delivery_limit: int | None = None,
) -> RabbitBroker:
    """A RabbitMQ broker with publisher confirms, tracing, metrics and the error mapping.

    Middleware order matters: telemetry is outermost so a dead-lettered message still gets its
    span; the error mapping is innermost so it sees the handler's own exception.
    """
    middlewares: list[Any] = [
        RabbitTelemetryMiddleware(tracer_provider=tracer_provider),
        TraceMemoryMiddleware,
    ]
    if metrics_registry is not None:
        middlewares.append(RabbitPrometheusMiddleware(registry=metrics_registry, app_name=app_id))
    error_to_ack = ErrorToAckMiddleware.with_delays(
        retry_delay_s,
        retry_delay_max_s,
        max_message_bytes=max_message_bytes,
        delivery_limit=delivery_limit,
    )
    middlewares += [LogContextMiddleware, *extra_middlewares, error_to_ack]
    return RabbitBroker(
        url,
        app_id=app_id,
        middlewares=middlewares,
        fail_fast=fail_fast,
        graceful_timeout=15.0,
        # The AsyncAPI document names the broker by role, never by this process's address.
        specification_url="amqp://rabbitmq:5672/",
    )


async def start_broker(broker: RabbitBroker, topology: Topology) -> None:
    """Connect, declare the dead-letter side, then start consuming."""
    await broker.connect()
    await topology.declare(broker)
    await broker.start()


async def publish_event(broker: RabbitBroker, topology: Topology, event: Event[Any]) -> None:
    """Publish one event persistently and wait for the broker's confirm."""
    await broker.publish(
        event.model_dump(mode="json"),
        exchange=topology.exchange_for(type(event)),
        routing_key=event.routing_key(),
        message_id=str(event.event_id),
        correlation_id=str(event.correlation_id),
        message_type=event.type,
        persist=True,
        mandatory=False,
    )
