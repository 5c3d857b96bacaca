"""Dead-letter queues: list the non-empty ones, and replay one back into its queue.

Queues dead-letter through ``flywheel.dlx`` into ``<queue>.dlq``. A consumer that gives up on a
message puts it there itself with ``x-flywheel-*`` headers (the reason, the error, the queue);
what RabbitMQ dead-letters on its own carries only its ``x-death`` / ``x-first-death-*``
headers, which are read when the others are missing. A replay re-publishes each message
through the default exchange with the queue's own name as routing key: re-publishing to the
original topic exchange would hand the event again to every other service bound to it.

Nothing is lost on the way: each message is taken unacknowledged, re-published with publisher
confirms and ``mandatory`` (an unroutable message comes back as an error), and only then
acknowledged on the dead-letter queue. A failed publish puts the message back; an ack lost after
a confirmed publish leaves a copy in the dead-letter queue, which consumers, idempotent by
``event_id``, would do nothing with if replayed again.

A per-replica subscription (``<queue>.<replica>`` queues sharing ``<queue>.dlq``, no
``<queue>`` of its own) is replayed into every live replica's queue: each replica must see
every event, and a replica that failed on it earlier may have gone since. A message is
acknowledged once every replica queue confirmed it; the other replicas' copies of the same
event (same ``message_id``) are acknowledged without being sent again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPError
from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity
from pydantic import BaseModel, ConfigDict, Field

from flywheel_cli.queues import queue_report
from flywheel_contracts.topology import (
    DEAD_LETTER_HEADERS,
    DEATHS_HEADER,
    DLQ_SUFFIX,
    ERROR_HEADER,
    REASON_HEADER,
    dead_letter_queue_name,
)

DROPPED_HEADERS = frozenset({"x-delivery-count", *DEAD_LETTER_HEADERS})
"""Headers a replay leaves out: the quorum queue counts deliveries afresh, and a new failure
writes its own reason."""


class DlqError(Exception):
    """A replay that cannot go ahead; every dead letter stays where it was."""


class DeadLetter(BaseModel):
    """One message of a dead-letter queue, as an operator needs to see it."""

    model_config = ConfigDict(frozen=True)

    message_id: str | None
    correlation_id: str | None = None
    type: str | None = None
    reason: str | None = None
    """Why it was dead-lettered (``rejected``: a non-retryable failure; ``delivery_limit``:
    retried too often; ``too_large``: over the consumer's size limit)."""
    error: str | None = None
    """The consumer's error, when the consumer dead-lettered it."""
    deaths: int = 0
    """How many times it was dead-lettered from its queue (replays included)."""


class ReplayReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    queue: str
    dead_letter_queue: str
    dry_run: bool
    found: int
    """Messages in the dead-letter queue when the replay started."""
    moved: int
    """Messages re-published and acknowledged (0 on a dry run)."""
    messages: list[DeadLetter] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)
    """Where they go: ``queue`` itself, or each live replica queue of a per-replica one."""


def failure_reason(headers: dict[str, Any]) -> str | None:
    """The reason for the latest dead-lettering by a consumer, else the broker's for the first."""
    reason = headers.get(REASON_HEADER) or headers.get("x-first-death-reason")
    if reason is None:
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            reason = deaths[0].get("reason")
    return _text(reason)


def death_count(headers: dict[str, Any]) -> int:
    """Dead-letterings by consumers and by the broker."""
    by_consumers = headers.get(DEATHS_HEADER, 0)
    total = by_consumers if isinstance(by_consumers, int) else 0
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        total += sum(int(d.get("count", 1)) for d in deaths if isinstance(d, dict))
    return total


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = dict(message.headers or {})
    return DeadLetter(
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        reason=failure_reason(headers),
        error=_text(headers.get(ERROR_HEADER)),
        deaths=death_count(headers),
    )


def replayed(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The same message, persistent, for its queue: body, ids, type and headers kept."""
    headers = {k: v for k, v in (message.headers or {}).items() if k not in DROPPED_HEADERS}
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


def queue_of(name: str) -> str:
    """The subscription queue a name refers to (``<queue>`` or ``<queue>.dlq``)."""
    return name.removesuffix(DLQ_SUFFIX)


async def replay(
    rabbit_url: str,
    queue: str,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    timeout_s: float = 10.0,
    replicas: Sequence[str] = (),
) -> ReplayReport:
    """Move up to ``limit`` messages of ``<queue>.dlq`` back into ``<queue>``, or, when there
    is no ``<queue>``, into each of ``replicas`` (its per-replica queues) that exists.

    Only the messages present when the replay starts are taken, so one that fails again and
    returns to the dead-letter queue meanwhile is not replayed twice in one run.
    """
    queue = queue_of(queue)
    dead_letter = dead_letter_queue_name(queue)
    try:
        connection = await aio_pika.connect(rabbit_url, timeout=timeout_s)
    except (AMQPError, OSError) as error:
        raise DlqError(
            f"RabbitMQ does not answer ({type(error).__name__}); nothing moved"
        ) from error
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        source = await _existing(
            channel, dead_letter, f"dead-letter queue {dead_letter} does not exist"
        )
        depth = int(source.declaration_result.message_count or 0)
        targets = await _targets(connection, queue, replicas)
        if not targets:
            raise DlqError(
                f"queue {queue} does not exist"
                + (" and none of its replica queues does" if replicas else "")
                + f"; its {depth} dead letter(s) stay in {dead_letter}"
            )
        wanted = depth if limit is None else min(limit, depth)
        if dry_run:
            seen = await _peek(source, wanted)
            return ReplayReport(
                queue=queue,
                dead_letter_queue=dead_letter,
                dry_run=True,
                found=depth,
                moved=0,
                messages=seen,
                targets=targets,
            )
        moved = await _move(channel, source, targets, wanted, once_per_event=targets != [queue])
    finally:
        await connection.close()
    return ReplayReport(
        queue=queue,
        dead_letter_queue=dead_letter,
        dry_run=False,
        found=depth,
        moved=len(moved),
        messages=moved,
        targets=targets,
    )


async def _targets(
    connection: AbstractConnection, queue: str, replicas: Sequence[str]
) -> list[str]:
    """``[queue]`` when it exists, else those of ``replicas`` that exist (none: nowhere)."""
    found = []
    for name in (queue, *replicas):
        # A passive declare of a missing queue closes its channel: one channel per look.
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except ChannelLockedResource:
            pass  # a replica's exclusive queue, held by its live connection: it exists
        except ChannelNotFoundEntity:
            continue
        finally:
            with contextlib.suppress(AMQPError, ConnectionError):
                await channel.close()
        if name == queue:
            return [queue]
        found.append(name)
    return found


async def _existing(channel: AbstractChannel, name: str, missing: str) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity as error:
        raise DlqError(missing) from error


async def _peek(source: AbstractQueue, wanted: int) -> list[DeadLetter]:
    """Look at up to ``wanted`` messages and hand every one back, in order."""
    held: list[AbstractIncomingMessage] = []
    try:
        while len(held) < wanted:
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
        return [describe(m) for m in held]
    finally:
        # A closed channel hands them back as well.
        with contextlib.suppress(AMQPError, ConnectionError):
            for message in reversed(held):
                await message.nack(requeue=True)


async def _move(
    channel: AbstractChannel,
    source: AbstractQueue,
    targets: Sequence[str],
    wanted: int,
    *,
    once_per_event: bool,
) -> list[DeadLetter]:
    """Move ``wanted`` messages of ``source`` into every one of ``targets``.

    ``once_per_event``: a message whose id was already moved in this run is only acked. Each
    replica that failed on an event dead-lettered its own copy; one copy reaches every replica.
    """
    moved: list[DeadLetter] = []
    sent: set[str] = set()
    dead_letter = source.name
    while len(moved) < wanted:
        message = await source.get(no_ack=False, fail=False)
        if message is None:
            break
        copy = once_per_event and message.message_id in sent
        if once_per_event and message.message_id:
            sent.add(message.message_id)
        try:
            for target in () if copy else targets:
                await channel.default_exchange.publish(
                    replayed(message), routing_key=target, mandatory=True
                )
        except Exception as error:
            # Unroutable, refused or cut off: hand it back (a closed channel does that too).
            with contextlib.suppress(AMQPError, ConnectionError):
                await message.nack(requeue=True)
            raise DlqError(
                f"re-publishing {message.message_id} to {', '.join(targets)} failed "
                f"({error!r}); it and every message not yet moved stay in {dead_letter} "
                f"({len(moved)} moved)"
            ) from error
        await message.ack()
        moved.append(describe(message))
    return moved


class DeadLetterDepth(BaseModel):
    model_config = ConfigDict(frozen=True)

    queue: str
    dead_letter_queue: str
    messages: int


async def non_empty(management_url: str, rabbit_url: str, namespace: str) -> list[DeadLetterDepth]:
    """Each stack queue whose dead-letter queue holds messages, with its depth."""
    report = await queue_report(management_url, rabbit_url, namespace)
    return [
        DeadLetterDepth(
            queue=row.name, dead_letter_queue=dead_letter_queue_name(row.name), messages=depth
        )
        for row in report.queues
        if (depth := row.dlq_messages)
    ]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
