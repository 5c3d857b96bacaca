"""Names of the RabbitMQ topology, shared by publishers, consumers and operators.

One durable topic exchange carries the control loop; inference logs have their own exchange so
their volume can never starve it. Every subscription is one quorum queue ``<service>.<event>``
that dead-letters through ``flywheel.dlx`` into ``<queue>.dlq``.

A subscription every replica must see on its own (the BFF's routing events) is one exclusive
queue per replica, ``<service>.<event>.<replica>``, gone with the replica; all of them
dead-letter into the subscription's one durable ``<service>.<event>.dlq``, which outlives them.
"""

from __future__ import annotations

EVENTS_EXCHANGE = "flywheel.events"
"""Topic exchange of the control loop (labels.saved … canary.verdict)."""

INFERENCE_EXCHANGE = "flywheel.inference"
"""Topic exchange of high-volume inference logs."""

DEAD_LETTER_EXCHANGE = "flywheel.dlx"
"""Direct exchange into which queues dead-letter; routing key is ``<queue>.dlq``."""

DLQ_SUFFIX = ".dlq"

REASON_HEADER = "x-flywheel-reason"
"""Why a consumer dead-lettered a message: ``rejected`` (it can never succeed),
``delivery_limit`` (it kept failing for a retryable reason) or ``too_large``."""

ERROR_HEADER = "x-flywheel-error"
"""The consumer's error, ``<type>: <message>``, cut to a thousand characters."""

QUEUE_HEADER = "x-flywheel-queue"
"""The queue the message was dead-lettered from."""

DELIVERIES_HEADER = "x-flywheel-deliveries"
"""Deliveries the message had when it was dead-lettered."""

DEATHS_HEADER = "x-flywheel-deaths"
"""Times a consumer dead-lettered this message (a replay keeps the count)."""

DEAD_LETTER_HEADERS = frozenset({REASON_HEADER, ERROR_HEADER, QUEUE_HEADER, DELIVERIES_HEADER})
"""The headers that describe one dead-lettering; a replay drops them (the deaths count stays)."""


def queue_name(service: str, routing_key: str) -> str:
    """Queue of one service's subscription to one event: ``<service>.<routing key>``."""
    return f"{service}.{routing_key}"


def replica_queue_name(subscription: str, replica: str) -> str:
    """One replica's own queue of a subscription: ``<service>.<event>.<replica>``."""
    return f"{subscription}.{replica}"


def dead_letter_queue_name(queue: str) -> str:
    """Dead-letter queue of ``queue``; also the routing key on the dead-letter exchange."""
    return f"{queue}{DLQ_SUFFIX}"
