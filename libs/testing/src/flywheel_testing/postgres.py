"""PostgreSQL for tests: a throwaway database per session on a real server."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg

from flywheel_testing.containers import docker_available

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin DSN (asyncpg form): env, else a container, else the local server."""
    if url := os.environ.get("FLYWHEEL_TEST_POSTGRES_URL"):
        yield url
    elif docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        yield DEFAULT_ADMIN_URL


@contextlib.asynccontextmanager
async def throwaway_database(admin_url: str) -> AsyncIterator[str]:
    """Create a uniquely named database, yield its DSN, drop it afterwards."""
    name = f"flywheel_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def sqlalchemy_url(dsn: str) -> str:
    """The asyncpg DSN in SQLAlchemy's form."""
    scheme, _, rest = dsn.partition("://")
    return f"postgresql+asyncpg://{rest}" if scheme.startswith("postgres") else dsn
