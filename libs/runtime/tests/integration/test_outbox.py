import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from faststream.rabbit import RabbitBroker
from sqlalchemy import select

from flywheel_contracts import LabelsSavedV1
from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import claim
from flywheel_runtime.messaging import create_broker, start_broker
from flywheel_runtime.migrations import migrate
from flywheel_runtime.outbox import BrokerOutboxPublisher, OutboxRelay, add_event, outbox
from flywheel_runtime.topology import Topology
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, schema=f"svc_{uuid.uuid4().hex[:8]}")
    await migrate(database_url, database.schema)
    yield database
    await database.dispose()


@pytest.fixture
async def rabbit_proxy(rabbit_url: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy("127.0.0.1", 5672 if "5672" in rabbit_url else _port(rabbit_url))
    await proxy.start()
    yield proxy
    await proxy.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


class DedupConsumer:
    """A consumer that records every delivery and applies each event once."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.deliveries: Counter[uuid.UUID] = Counter()
        self.applied: list[uuid.UUID] = []

    async def handle(self, event: LabelsSavedV1) -> None:
        self.deliveries[event.event_id] += 1
        async with self.db.transaction() as session:
            if await claim(session, "consumer", event.event_id):
                self.applied.append(event.event_id)


async def _write(db: Database, n: int) -> list[uuid.UUID]:
    ids = []
    for _ in range(n):
        event = LabelsSavedV1(payload=LabelsSavedV1.example().payload)
        async with db.transaction() as session:
            await add_event(session, event)
        ids.append(event.event_id)
    return ids


async def _pending(db: Database) -> int:
    async with db.transaction() as session:
        rows = await session.execute(select(outbox.c.id).where(outbox.c.published_at.is_(None)))
        return len(rows.all())


async def test_relay_publishes_committed_events(
    db: Database, topology: Topology, rabbit_url: str
) -> None:
    consumer_broker = create_broker(rabbit_url, app_id="consumer")
    consumer = DedupConsumer(db)
    consumer_broker.subscriber(
        topology.queue("consumer", LabelsSavedV1), topology.exchange_for(LabelsSavedV1)
    )(consumer.handle)
    await start_broker(consumer_broker, topology)
    relay = OutboxRelay(db, BrokerOutboxPublisher(consumer_broker, topology), poll_interval_s=5)
    relay.start()
    try:
        written = await _write(db, 5)

        async def all_applied() -> bool:
            return sorted(consumer.applied) == sorted(written)

        # The poll interval is long: delivery this fast proves the commit woke the relay.
        await wait_for(all_applied, timeout=4, message="events applied")
        assert await _pending(db) == 0
    finally:
        await relay.stop()
        await consumer_broker.stop()


async def test_rows_written_while_broker_unreachable_are_published_once_it_is_back(
    db: Database, topology: Topology, rabbit_url: str, rabbit_proxy: TcpProxy
) -> None:
    consumer_broker = create_broker(rabbit_url, app_id="consumer")
    consumer = DedupConsumer(db)
    consumer_broker.subscriber(
        topology.queue("consumer", LabelsSavedV1), topology.exchange_for(LabelsSavedV1)
    )(consumer.handle)
    await start_broker(consumer_broker, topology)

    relay_broker: RabbitBroker = create_broker(
        f"amqp://guest:guest@127.0.0.1:{rabbit_proxy.port}/", app_id="relay"
    )
    relay_broker._connection_kwargs["reconnect_interval"] = 0.5
    await relay_broker.connect()
    relay = OutboxRelay(
        db,
        BrokerOutboxPublisher(relay_broker, topology, timeout_s=1),
        poll_interval_s=0.1,
        max_backoff_s=0.5,
    )
    relay.start()
    try:
        await rabbit_proxy.stop()
        written = await _write(db, 50)

        async def attempted() -> bool:
            async with db.transaction() as session:
                rows = await session.execute(select(outbox.c.attempts))
                return all(a > 0 for (a,) in rows.all())

        await wait_for(attempted, timeout=10, message="relay tried while broker away")
        assert await _pending(db) == 50
        assert consumer.applied == []

        await rabbit_proxy.start()

        async def all_applied() -> bool:
            return sorted(consumer.applied) == sorted(written)

        await wait_for(all_applied, timeout=30, message="events applied after broker returned")
        assert await _pending(db) == 0
        assert len(consumer.applied) == len(set(consumer.applied)) == 50
    finally:
        await relay.stop()
        await relay_broker.stop()
        await consumer_broker.stop()
