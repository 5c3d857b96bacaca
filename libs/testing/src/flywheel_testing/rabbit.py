"""RabbitMQ for tests: the machine's server, one named by env, or a container."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import aio_pika

from flywheel_testing.containers import docker_available

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@contextlib.contextmanager
def rabbit_server() -> Iterator[str]:
    """Yield an AMQP URL: ``FLYWHEEL_TEST_RABBIT_URL``, else a container, else the local one."""
    if url := os.environ.get("FLYWHEEL_TEST_RABBIT_URL"):
        yield url
    elif docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(container.port)
            yield f"amqp://guest:guest@{host}:{port}/"
    else:
        yield DEFAULT_URL


def unique_namespace() -> str:
    """A prefix for exchange and queue names that no other test run uses."""
    return f"test-{uuid.uuid4().hex[:10]}."


async def delete_names(url: str, queues: list[str], exchanges: list[str]) -> None:
    """Remove what a test declared, so the shared broker does not fill up."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


async def queue_depth(url: str, queue: str) -> int:
    """Messages ready in a queue (passive declare: fails if it does not exist)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


async def drain(
    url: str, queue: str, limit: int = 10_000
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (and ack) up to ``limit`` messages that are ready in a queue."""
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while len(taken) < limit:
            message = await declared.get(fail=False, no_ack=True)
            if message is None:
                break
            taken.append(message)
    return taken
