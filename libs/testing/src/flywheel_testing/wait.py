"""Waiting on conditions with a deadline: the only way tests here wait."""

from __future__ import annotations

import asyncio
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TypeVar

T = TypeVar("T")


class ConditionTimeoutError(AssertionError):
    """The condition did not hold before the deadline."""


async def wait_for(
    condition: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - polling until a deadline is this helper's purpose
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll an async condition until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise ConditionTimeoutError(f"{message} not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll a sync condition until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise ConditionTimeoutError(f"{message} not met within {timeout}s (last: {last!r})")
        time.sleep(interval)


async def close_within(stack: AsyncExitStack, seconds: float) -> None:
    """Close ``stack``; if it has not stopped within ``seconds``, warn and print where every task
    waits, then go on (a test's assertions are made by then; a hung shutdown must not hang the
    whole run, and must say where it hangs)."""
    try:
        async with asyncio.timeout(seconds):
            await stack.aclose()
    except TimeoutError:
        warnings.warn(f"the stack did not stop within {seconds:g}s", stacklevel=2)
        for task in asyncio.all_tasks():
            print(f"task {task.get_name()} still waiting:", file=sys.stderr)
            task.print_stack(limit=8, file=sys.stderr)
