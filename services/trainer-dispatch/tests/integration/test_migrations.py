import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from flywheel_runtime.db import Database
from flywheel_runtime.migrations import migrate
from flywheel_runtime.outbox import runtime_metadata
from flywheel_trainer_dispatch.adapters.tables import metadata
from flywheel_trainer_dispatch.main import MIGRATIONS

pytestmark = pytest.mark.integration

RUNTIME_TABLES = {*runtime_metadata.tables, "flywheel_runtime_version", "alembic_version"}


async def test_migrations_create_exactly_the_tables_the_code_uses(database_url: str) -> None:
    schema = f"td_{uuid.uuid4().hex[:10]}"
    await migrate(database_url, schema, MIGRATIONS)
    await migrate(database_url, schema, MIGRATIONS)  # a second start finds nothing to do
    db = Database(database_url, schema)

    def differences(connection: Connection) -> list[tuple[object, ...]]:
        context = MigrationContext.configure(connection)
        return [
            diff
            for diff in compare_metadata(context, metadata)
            if not (diff[0] in ("remove_table", "remove_index") and _runtime(diff[1]))
        ]

    try:
        async with db.engine.connect() as connection:
            found = await connection.run_sync(differences)
    finally:
        await db.dispose()

    assert found == []


def _runtime(item: object) -> bool:
    table = getattr(item, "table", item)
    return getattr(table, "name", None) in RUNTIME_TABLES
