"""Queue depths of the stack: the RabbitMQ management API when enabled, else passive declares.

The management API lists every queue at once with its consumers. Without it, AMQP can only
ask about queues by name, so every ``<service>.<event>`` the services could subscribe to is
declared passively (a queue that does not exist closes the channel; a new one is opened).

A subscription with one queue per replica (``<service>.<event>.<replica>``, the BFF's routing
events) has no queue of its own, only its shared ``<service>.<event>.dlq``: it is shown as one
row under the subscription's name, its replicas' messages and consumers added up, so its dead
letters are listed like any other queue's.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit

import aio_pika
import httpx
from pydantic import BaseModel, ConfigDict

from flywheel_contracts import ALL_EVENTS
from flywheel_contracts.topology import DLQ_SUFFIX, dead_letter_queue_name, queue_name

SERVICE_QUEUE_PREFIXES = (
    "labeling",
    "data-monitor",
    "trainer-dispatch",
    "validator",
    "rollout",
    "inference-bff",
    "log-worker",
)
"""The service names queues start with (``<service>.<event>``)."""


class QueueDepth(BaseModel):
    """One subscription queue and its dead-letter queue."""

    model_config = ConfigDict(frozen=True)

    name: str
    messages: int
    consumers: int | None = None
    dlq_messages: int | None = None
    """None when the queue has no dead-letter queue."""


class QueueReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    """``management`` or ``amqp``."""
    queues: list[QueueDepth]


def is_stack_queue(name: str, namespace: str) -> bool:
    """Whether ``name`` is a service queue of the stack under ``namespace``."""
    if not name.startswith(namespace):
        return False
    rest = name[len(namespace) :]
    return rest.startswith(tuple(f"{prefix}." for prefix in SERVICE_QUEUE_PREFIXES))


def pair_dead_letters(depths: dict[str, tuple[int, int | None]]) -> list[QueueDepth]:
    """Fold each ``<queue>.dlq`` into its queue's row; sorted by name.

    A ``<queue>.dlq`` without a ``<queue>`` (a per-replica subscription, or a queue deleted
    since) makes a ``<queue>`` row of its own, into which the replica queues
    ``<queue>.<replica>`` fold.
    """
    subscriptions = {
        name.removesuffix(DLQ_SUFFIX)
        for name in depths
        if name.endswith(DLQ_SUFFIX) and name.removesuffix(DLQ_SUFFIX) not in depths
    }
    folded: dict[str, list[tuple[int, int | None]]] = {name: [] for name in subscriptions}
    rows = []
    for name, (messages, consumers) in sorted(depths.items()):
        if name.endswith(DLQ_SUFFIX):
            continue
        subscription = replica_of(name, subscriptions)
        if subscription is not None:
            folded[subscription].append((messages, consumers))
            continue
        dead = depths.get(dead_letter_queue_name(name))
        rows.append(
            QueueDepth(
                name=name,
                messages=messages,
                consumers=consumers,
                dlq_messages=None if dead is None else dead[0],
            )
        )
    for subscription, replicas in folded.items():
        counts = [c for _, c in replicas if c is not None]
        rows.append(
            QueueDepth(
                name=subscription,
                messages=sum(m for m, _ in replicas),
                consumers=sum(counts) if counts else None,
                dlq_messages=depths[dead_letter_queue_name(subscription)][0],
            )
        )
    return sorted(rows, key=lambda row: row.name)


def replica_of(name: str, subscriptions: set[str]) -> str | None:
    """The subscription ``name`` is a replica queue of (``<subscription>.<replica>``), if any;
    a replica id may hold dots itself."""
    parents = [s for s in subscriptions if name.startswith(f"{s}.") and len(name) > len(s) + 1]
    return max(parents, key=len, default=None)


async def from_management(
    management_url: str, rabbit_url: str, namespace: str, timeout_s: float = 3.0
) -> QueueReport:
    """Depths from ``GET /api/queues/<vhost>``; raises ``httpx.HTTPError`` when unavailable."""
    depths = await _management_depths(management_url, rabbit_url, timeout_s)
    stack = {name: depth for name, depth in depths.items() if is_stack_queue(name, namespace)}
    return QueueReport(source="management", queues=pair_dead_letters(stack))


async def replica_queues(
    management_url: str, rabbit_url: str, subscription: str, timeout_s: float = 3.0
) -> list[str]:
    """The live replica queues ``<subscription>.<replica>`` of a per-replica subscription, as
    the management API lists them; none when it does not answer (AMQP cannot list queues)."""
    try:
        depths = await _management_depths(management_url, rabbit_url, timeout_s)
    except (httpx.HTTPError, ValueError, KeyError):
        return []
    return sorted(
        name
        for name in depths
        if not name.endswith(DLQ_SUFFIX) and replica_of(name, {subscription}) is not None
    )


async def _management_depths(
    management_url: str, rabbit_url: str, timeout_s: float
) -> dict[str, tuple[int, int | None]]:
    parts = urlsplit(rabbit_url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    async with httpx.AsyncClient(timeout=timeout_s, auth=auth) as client:
        response = await client.get(
            f"{management_url}/api/queues/{quote(vhost, safe='')}",
            params={"columns": "name,messages,consumers"},
        )
        response.raise_for_status()
    return {
        item["name"]: (int(item.get("messages") or 0), item.get("consumers"))
        for item in response.json()
    }


def candidate_queues(namespace: str) -> list[str]:
    """Every ``<service>.<event>`` queue (and its dead-letter queue) a service could own."""
    names = []
    for service in SERVICE_QUEUE_PREFIXES:
        for event in ALL_EVENTS:
            name = namespace + queue_name(service, event.routing_key())
            names += [name, dead_letter_queue_name(name)]
    return names


async def from_amqp(rabbit_url: str, namespace: str, timeout_s: float = 10.0) -> QueueReport:
    """Depths by passively declaring every candidate queue name over AMQP."""
    depths: dict[str, tuple[int, int | None]] = {}
    connection = await aio_pika.connect(rabbit_url, timeout=timeout_s)
    try:
        channel = await connection.channel()
        for name in candidate_queues(namespace):
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                # A passive declare of a missing queue closes the channel: the queue is absent.
                channel = await connection.channel()
                continue
            result = queue.declaration_result
            depths[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
    finally:
        await connection.close()
    return QueueReport(source="amqp", queues=pair_dead_letters(depths))


async def queue_report(management_url: str, rabbit_url: str, namespace: str) -> QueueReport:
    """The management API's view when it answers, else the passive-declare one."""
    try:
        return await from_management(management_url, rabbit_url, namespace)
    except (httpx.HTTPError, ValueError, KeyError):
        return await from_amqp(rabbit_url, namespace)
