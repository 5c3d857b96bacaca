import itertools

import asyncpg
from sqlalchemy.exc import DBAPIError, ProgrammingError

from flywheel_runtime.db import is_transaction_conflict, is_unavailable
from flywheel_runtime.messaging import is_retryable


def _chained(*errors: BaseException) -> BaseException:
    """``errors[0]`` raised from ``errors[1]`` raised from … (as drivers wrap each other)."""
    for outer, inner in itertools.pairwise(errors):
        outer.__cause__ = inner
    return errors[0]


def test_a_restart_deep_in_the_chain_is_an_outage() -> None:
    shutting_down = asyncpg.exceptions.CannotConnectNowError("the database system is shutting down")
    adapted = RuntimeError("adapted")
    wrapped = _chained(DBAPIError("SELECT 1", None, adapted), adapted, shutting_down)
    terminated = _chained(
        RuntimeError("outer"),
        asyncpg.exceptions.AdminShutdownError("terminating connection: administrator command"),
    )

    assert is_unavailable(wrapped)
    assert is_unavailable(terminated)


def test_a_bad_query_is_not_an_outage() -> None:
    error = ProgrammingError("SELECT nope", None, asyncpg.exceptions.UndefinedColumnError("nope"))
    looping = RuntimeError("loop")
    looping.__cause__ = looping

    assert not is_unavailable(error)
    assert not is_unavailable(looping)


def test_a_deadlock_or_serialization_failure_is_retried_not_dead_lettered() -> None:
    deadlock = asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
    adapted = RuntimeError("deadlock detected")
    wrapped = _chained(DBAPIError("UPDATE windows", None, adapted), adapted, deadlock)
    serialization = _chained(
        RuntimeError("outer"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
    )
    constraint = _chained(
        DBAPIError("INSERT", None, RuntimeError("dup")),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
    )

    assert is_transaction_conflict(wrapped)
    assert is_retryable(wrapped)
    assert is_transaction_conflict(serialization)
    assert is_retryable(serialization)
    assert not is_transaction_conflict(constraint)
    assert not is_retryable(constraint)
    assert not is_unavailable(wrapped)
