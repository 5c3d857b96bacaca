"""``flywheel train submit``: a training run asked of trainer-dispatch, followed to its end.

The run goes through trainer-dispatch's API (``POST /v1/runs``) like any operator's run: queued
by priority, one run per model line at a time, started on the configured backend, and on
success announced with ``model.trained``, so the version it registers is validated and
canaried like a retrained one. ``follow`` polls the run until it ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import JsonValue

from flywheel_cli.services import RunView, Services

TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled", "superseded"})


class SubmitError(ValueError):
    """A hyperparameter or entry point the command line cannot send."""


def parse_hyperparameters(pairs: Sequence[str]) -> dict[str, JsonValue]:
    """``key=value`` pairs; a value that reads as JSON (``3``, ``0.01``, ``true``, ``[1, 2]``)
    is sent as such, anything else as text."""
    parsed: dict[str, JsonValue] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"hyperparameter {pair!r} is not key=value")
        try:
            value: JsonValue = json.loads(raw)
        except ValueError:
            value = raw
        parsed[key.strip()] = value
    return parsed


def entry_point_for(spec: str, cwd: Path | None = None) -> str:
    """A script that exists here is sent as an absolute path (a local stack runs it from its
    own folder); a callable, or a path only the training image has, is sent as given."""
    path = (cwd or Path.cwd()) / spec
    if ":" not in spec and path.is_file():
        return str(path.resolve())
    return spec


async def follow(
    services: Services,
    run_id: str,
    *,
    on_update: Callable[[RunView], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> RunView:
    """Poll the run until it ends (or ``timeout_s`` passes); ``on_update`` sees every poll."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        run = await services.training_run(run_id)
        on_update(run)
        if run.state in TERMINAL:
            return run
        if deadline is not None and time.monotonic() >= deadline:
            return run
        await asyncio.sleep(poll_s)


def request_body(
    *,
    project_id: str,
    model_line: str,
    snapshot_id: str,
    entry_point: str | None,
    hyperparameters: dict[str, JsonValue],
    nproc_per_node: int | None,
) -> dict[str, Any]:
    """The ``POST /v1/runs`` body; unset overrides are left to the model line's settings."""
    body: dict[str, Any] = {
        "project_id": project_id,
        "model_line": model_line,
        "snapshot_id": snapshot_id,
        "priority": "manual",
    }
    if entry_point is not None:
        body["entry_point"] = entry_point
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    if nproc_per_node is not None:
        body["nproc_per_node"] = nproc_per_node
    return body
