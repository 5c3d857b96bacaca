"""Alembic wiring every service reuses.

Each service keeps its own migration scripts; ``env.py`` is two lines calling ``run_env``.
The runtime ships its own scripts for the shared tables (outbox, processed_messages), tracked in
a separate version table, so ``migrate`` brings a service schema fully up to date.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

RUNTIME_SCRIPTS = Path(__file__).parent / "migrations"
RUNTIME_VERSION_TABLE = "flywheel_runtime_version"


def alembic_config(
    url: str, schema: str, script_location: Path | str, version_table: str = "alembic_version"
) -> Config:
    """An Alembic config for one schema; usable from the ``alembic`` CLI via ``-x``, too."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes.update(url=url, schema=schema, version_table=version_table)
    return config


def upgrade(
    url: str, schema: str, script_location: Path | str, version_table: str = "alembic_version"
) -> None:
    """Upgrade one schema to head (blocking; Alembic drives its own event loop)."""
    command.upgrade(alembic_config(url, schema, script_location, version_table), "head")


async def migrate(url: str, schema: str, service_scripts: Path | str | None = None) -> None:
    """Bring a service schema to head: runtime tables first, then the service's own."""
    await asyncio.to_thread(upgrade, url, schema, RUNTIME_SCRIPTS, RUNTIME_VERSION_TABLE)
    if service_scripts is not None:
        await asyncio.to_thread(upgrade, url, schema, service_scripts)


def run_env(target_metadata: MetaData) -> None:
    """Body of a service's ``migrations/env.py``: online migrations on the service schema."""
    config = context.config
    url: str = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or ""
    schema: str = (
        config.attributes.get("schema") or context.get_x_argument(as_dictionary=True)["schema"]
    )
    version_table: str = config.attributes.get("version_table", "alembic_version")

    def run(connection: Connection) -> None:
        # Replicas starting together would race on CREATE SCHEMA and on the version table;
        # the lock is held until this transaction commits.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"flywheel-migrate:{schema}"},
        )
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        connection.execute(text(f'SET search_path TO "{schema}"'))
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=version_table,
            version_table_schema=schema,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def main() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(run)
        finally:
            await engine.dispose()

    asyncio.run(main())
