"""Check that a service's Alembic migrations build exactly the tables its code declares."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import processed_messages
from flywheel_runtime.migrations import RUNTIME_VERSION_TABLE, migrate
from flywheel_runtime.outbox import outbox

_RUNTIME_TABLES = {outbox.name, processed_messages.name, RUNTIME_VERSION_TABLE, "alembic_version"}


async def migration_drift(database_url: str, scripts: Path, metadata: MetaData) -> list[Any]:
    """Differences between a freshly migrated schema and ``metadata`` (empty when they agree).

    The schema is migrated twice, as a second replica or restart would; the runtime's own
    tables (outbox, processed_messages, version tables) are not the service's to declare.
    """
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    await migrate(database_url, schema, scripts)
    await migrate(database_url, schema, scripts)
    db = Database(database_url, schema)

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection)
        return [
            diff
            for diff in compare_metadata(context, metadata)
            if not (diff[0] in ("remove_table", "remove_index") and _is_runtime(diff[1]))
        ]

    try:
        async with db.engine.connect() as connection:
            return await connection.run_sync(differences)
    finally:
        await db.dispose()


def _is_runtime(item: object) -> bool:
    table = getattr(item, "table", item)
    return getattr(table, "name", None) in _RUNTIME_TABLES
