"""Check that a service's committed AsyncAPI document matches what its code generates."""

from __future__ import annotations

import os
from pathlib import Path

from faststream.rabbit import RabbitBroker

from flywheel_runtime.asyncapi import drifted, render


def assert_asyncapi_committed(
    broker: RabbitBroker, committed: Path, *, title: str, version: str, description: str
) -> None:
    """Fail when ``committed`` is stale; with FLYWHEEL_WRITE_ASYNCAPI=1, rewrite it instead."""
    rendered = render(broker, title=title, version=version, description=description)
    if os.environ.get("FLYWHEEL_WRITE_ASYNCAPI") == "1":
        committed.write_text(rendered)
    assert not drifted(committed, rendered), (
        f"{committed} is stale: run `make asyncapi` and commit it"
    )
