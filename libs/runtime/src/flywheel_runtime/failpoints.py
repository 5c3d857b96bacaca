"""Failpoints: named places where a process can be told to die, to prove redelivery makes up
for it.

``FLYWHEEL_FAILPOINTS`` lists the armed points, comma-separated, each ``point`` or
``point:detail`` (``handler.done:labels.saved`` fires only after a ``labels.saved`` handler).
Reaching an armed point writes one line to stderr and kills the process with SIGKILL at once:
no shutdown hook, no acknowledgement, no flush, exactly what an OOM kill or a lost node does.
Unset (production), a failpoint is one environment lookup.

The points the platform has:

* ``handler.done:<routing key>``: a consumer's handler returned (its transaction committed,
  its outbox rows written), the message is not acknowledged yet;
* ``outbox.published:<event type>``: the relay's publish was confirmed by the broker, the row
  is not marked published yet;
* ``batch.written``: the log worker wrote a batch to S3 and has not acknowledged its messages.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from typing import Final

ENV: Final = "FLYWHEEL_FAILPOINTS"


def armed() -> frozenset[str]:
    """The points ``FLYWHEEL_FAILPOINTS`` arms in this process."""
    return frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())


def failpoint(point: str, details: Iterable[str] = ()) -> None:
    """Kill this process here when ``point`` (or ``point:<one of details>``) is armed."""
    points = armed()
    if not points:
        return
    hit = (
        point
        if point in points
        else next((f"{point}:{d}" for d in details if f"{point}:{d}" in points), None)
    )
    if hit is None:
        return
    # print, not the logger: the line must be out before the kill, whatever the log setup.
    print(f"failpoint {hit} reached: killing process {os.getpid()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
