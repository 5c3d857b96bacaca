"""The servers the stack needs but does not start: RabbitMQ and PostgreSQL.

``up`` checks both answer before it starts anything, and says how to start them when they do
not; then it creates the databases and schemas the stack uses, so a fresh PostgreSQL works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from urllib.parse import urlsplit

import aio_pika
import psycopg2
from psycopg2 import sql
from sqlalchemy.engine import make_url

START_HINT = (
    "start the machine's servers with `./scripts/ensure-servers` (it starts installed but "
    "stopped PostgreSQL and RabbitMQ), or point FLYWHEEL_RABBIT_URL / FLYWHEEL_DATABASE_URL "
    "at running ones"
)


class InfraError(RuntimeError):
    """RabbitMQ or PostgreSQL does not answer; the message says how to fix it."""


def libpq_url(sqlalchemy_url: str, database: str | None = None) -> str:
    """A SQLAlchemy URL (any driver) as the libpq URL psycopg2 takes, optionally another DB."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def database_name(sqlalchemy_url: str) -> str:
    name = make_url(sqlalchemy_url).database
    if not name:
        raise InfraError(f"FLYWHEEL_DATABASE_URL names no database: {sqlalchemy_url}")
    return name


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True) if "://" in url else url


def check_rabbit(rabbit_url: str, timeout_s: float = 10.0) -> None:
    """Log in to RabbitMQ over AMQP; ``InfraError`` when it does not answer."""

    async def login() -> None:
        connection = await aio_pika.connect(rabbit_url, timeout=timeout_s)
        await connection.close()

    try:
        asyncio.run(login())
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as error:
        parts = urlsplit(rabbit_url)
        raise InfraError(
            f"RabbitMQ does not answer at {parts.hostname}:{parts.port or 5672} "
            f"({type(error).__name__}: {error}); {START_HINT}"
        ) from error


def check_postgres(database_url: str, timeout_s: int = 10) -> None:
    """Connect to PostgreSQL's maintenance database; ``InfraError`` when it does not answer."""
    admin = libpq_url(database_url, "postgres")
    try:
        psycopg2.connect(admin, connect_timeout=timeout_s).close()
    except psycopg2.OperationalError as error:
        raise InfraError(
            f"PostgreSQL does not answer at {redacted(admin)} ({str(error).strip()}); {START_HINT}"
        ) from error


def ensure_databases(database_url: str, databases: Iterable[str]) -> list[str]:
    """Create each database unless it exists; return the ones created."""
    created: list[str] = []
    connection = psycopg2.connect(libpq_url(database_url, "postgres"))
    try:
        # CREATE DATABASE cannot run inside a transaction block.
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in databases:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    finally:
        connection.close()
    return created


def ensure_schemas(database_url: str, schemas: Iterable[str]) -> None:
    """Create each schema unless it exists (services migrate their own tables into it)."""
    connection = psycopg2.connect(libpq_url(database_url))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in schemas:
                cursor.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name))
                )
    finally:
        connection.close()


def drop_database(database_url: str, name: str) -> None:
    """Drop a database and end its sessions (tests clean up what ``up`` created)."""
    connection = psycopg2.connect(libpq_url(database_url, "postgres"))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    finally:
        connection.close()
