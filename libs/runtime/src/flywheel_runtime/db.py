"""PostgreSQL access for one service: an async engine bound to the service's own schema.

Every connection sets ``search_path`` to the service schema, so the runtime's shared tables
(outbox, processed_messages) and the service's tables live side by side in that schema and
services never see each other's rows.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from flywheel_runtime.errors import DependencyUnavailableError

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
OUTBOX_DIRTY = "flywheel.outbox_dirty"
"""``session.info`` flag set by the outbox writer; committed transactions wake the relay."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # "terminating connection due to administrator command" and the like: a restart.
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.PostgresConnectionError,
    InterfaceError,
    OperationalError,
)


_CONFLICT_STATES = frozenset({"40001", "40P01"})
"""SQLSTATEs of a transaction PostgreSQL aborted to break a conflict (serialization failure,
deadlock): running the same transaction again is the documented remedy."""


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every cause and context below it, each once."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def is_transaction_conflict(error: BaseException) -> bool:
    """Whether ``error`` is a deadlock or serialization failure somewhere down its chain."""
    return any(getattr(link, "sqlstate", None) in _CONFLICT_STATES for link in _chain(error))


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means the database could not be reached (rather than a bad query).

    The driver's error may sit several links down the chain (SQLAlchemy wraps asyncpg, which
    wraps the socket's), so the whole chain of causes and contexts is looked at.
    """
    return any(
        (isinstance(link, DBAPIError) and link.connection_invalidated)
        or isinstance(link, _UNAVAILABLE)
        for link in _chain(error)
    )


class Database:
    """Engine and sessions of one service schema."""

    def __init__(
        self,
        url: str,
        schema: str,
        *,
        pool_size: int = 10,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        self.url = url
        self.schema = schema
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=pool_size,
            pool_pre_ping=True,
            connect_args={
                "server_settings": {"search_path": schema},
                "timeout": connect_timeout_s,
            },
        )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._on_outbox_commit: list[Callable[[], None]] = []

    def on_outbox_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each commit that wrote outbox rows (wakes the relay)."""
        self._on_outbox_commit.append(callback)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on success, roll back on error.

        An unreachable database becomes ``DependencyUnavailableError`` (HTTP 503, retryable on
        the broker) so callers never half-write and never report a bug for an outage.
        """
        try:
            async with self.sessions() as session, session.begin():
                yield session
        except Exception as error:
            if is_unavailable(error):
                raise DependencyUnavailableError("database unavailable") from error
            raise
        if session.info.pop(OUTBOX_DIRTY, False):
            for callback in self._on_outbox_commit:
                callback()

    async def ensure_schema(self) -> None:
        """Create the service schema if it does not exist."""
        async with self.engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))

    async def ping(self) -> None:
        """Raise ``DependencyUnavailableError`` unless the database answers."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as error:
            raise DependencyUnavailableError("database unavailable") from error

    async def dispose(self) -> None:
        await self.engine.dispose()
