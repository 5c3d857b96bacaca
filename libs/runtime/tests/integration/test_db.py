import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text

from flywheel_runtime.db import Database
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_runtime.idempotency import claim, processed_messages
from flywheel_runtime.migrations import migrate
from flywheel_testing.net import free_port

pytestmark = pytest.mark.integration

counters = Table(
    "counters",
    MetaData(),
    Column("name", String, primary_key=True),
    Column("value", Integer, nullable=False),
)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, schema=f"svc_{uuid.uuid4().hex[:8]}")
    await migrate(database_url, database.schema)
    async with database.engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE counters (name text primary key, value int not null)")
        )
        await conn.execute(text("INSERT INTO counters VALUES ('labels', 0)"))
    yield database
    await database.dispose()


async def _consume(db: Database, event_id: uuid.UUID) -> bool:
    async with db.transaction() as session:
        if not await claim(session, "data-monitor", event_id):
            return False
        await session.execute(
            counters.update().where(counters.c.name == "labels").values(value=counters.c.value + 1)
        )
        return True


async def _value(db: Database) -> int:
    async with db.transaction() as session:
        return int((await session.execute(select(counters.c.value))).scalar_one())


async def test_same_event_twice_changes_the_database_once(db: Database) -> None:
    event_id = uuid.uuid4()

    first = await _consume(db, event_id)
    second = await _consume(db, event_id)

    assert (first, second) == (True, False)
    assert await _value(db) == 1


async def test_racing_replicas_apply_one_event_once(db: Database) -> None:
    event_ids = [uuid.uuid4() for _ in range(20)]

    results = await asyncio.gather(*(_consume(db, e) for e in event_ids for _ in range(3)))

    assert sum(results) == 20
    assert await _value(db) == 20


async def test_a_failed_transaction_does_not_record_the_event(db: Database) -> None:
    event_id = uuid.uuid4()

    async def crash_after_claiming() -> None:
        async with db.transaction() as session:
            assert await claim(session, "data-monitor", event_id)
            raise RuntimeError("handler crashed after claiming")

    with pytest.raises(RuntimeError):
        await crash_after_claiming()

    assert await _consume(db, event_id) is True
    async with db.transaction() as session:
        rows = (await session.execute(select(processed_messages))).all()
    assert len(rows) == 1


async def test_schemas_keep_services_apart(database_url: str, db: Database) -> None:
    other = Database(database_url, schema=f"svc_{uuid.uuid4().hex[:8]}")
    await migrate(database_url, other.schema)
    try:
        async with other.transaction() as session:
            assert await claim(session, "data-monitor", uuid.UUID(int=1))
        async with db.transaction() as session:
            assert await claim(session, "data-monitor", uuid.UUID(int=1))
    finally:
        await other.dispose()


async def test_migrations_are_idempotent(database_url: str, db: Database) -> None:
    await migrate(database_url, db.schema)

    async with db.transaction() as session:
        version = (
            await session.execute(text("SELECT version_num FROM flywheel_runtime_version"))
        ).scalar_one()
    assert version == "0001"


async def test_unreachable_database_is_a_dependency_error() -> None:
    closed = Database(
        f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing",
        schema="svc",
        connect_timeout_s=1,
    )
    try:
        with pytest.raises(DependencyUnavailableError):
            async with closed.transaction() as session:
                await session.execute(text("SELECT 1"))
        with pytest.raises(DependencyUnavailableError):
            await closed.ping()
    finally:
        await closed.dispose()
