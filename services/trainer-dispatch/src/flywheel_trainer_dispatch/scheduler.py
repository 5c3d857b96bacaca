"""Which queued training runs start next: a pure object, no I/O, no clock.

The rules:

* at most one run per model line is in progress, and at most ``max_concurrent`` overall;
* waiting runs start by priority, drift > threshold (count, adaptive, max-wait) > scheduled
  > manual, and first come, first served within a priority;
* a model line has at most one waiting run: a newer trigger replaces it (the older run is
  superseded). The newer snapshot holds every label of the older one, so nothing is lost, and
  the replacement keeps the more urgent priority and the earlier place in the queue, so a
  stream of triggers never pushes a line back.

The database applies these decisions under its locks; this module only makes them, so they
can be tested on their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum

from flywheel_contracts.events import ThresholdReason


class Priority(StrEnum):
    """How urgently a run should start; declared most urgent first."""

    DRIFT = "drift"
    THRESHOLD = "threshold"
    SCHEDULED = "scheduled"
    MANUAL = "manual"

    @property
    def rank(self) -> int:
        """0 for the most urgent; lower ranks start first."""
        return list(Priority).index(self)

    def most_urgent(self, other: Priority) -> Priority:
        return self if self.rank <= other.rank else other


def priority_of(reason: ThresholdReason) -> Priority:
    """The priority of a run triggered by threshold.reached with this reason."""
    if reason is ThresholdReason.DRIFT:
        return Priority.DRIFT
    if reason is ThresholdReason.MANUAL:
        return Priority.MANUAL
    return Priority.THRESHOLD


@dataclass(frozen=True)
class Waiting:
    """A queued run as the scheduler sees it."""

    run_id: uuid.UUID
    model_line: str
    priority: Priority
    position: int
    """Place in the queue: lower came first (ties are broken by ``run_id``)."""

    @property
    def order(self) -> tuple[int, int, str]:
        return (self.priority.rank, self.position, str(self.run_id))


@dataclass(frozen=True)
class Admission:
    """How a new trigger enters the queue."""

    priority: Priority
    position: int | None
    """Place inherited from the run it supersedes; None takes the next place in the queue."""
    supersedes: uuid.UUID | None
    """The line's waiting run that the new one replaces, if any."""


@dataclass(frozen=True)
class Scheduler:
    """Decides admissions and starts; holds nothing but the global bound."""

    max_concurrent: int

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")

    def admit(self, waiting: Waiting | None, priority: Priority) -> Admission:
        """A new trigger for a line whose waiting run (if any) is ``waiting``."""
        if waiting is None:
            return Admission(priority=priority, position=None, supersedes=None)
        return Admission(
            priority=priority.most_urgent(waiting.priority),
            position=waiting.position,
            supersedes=waiting.run_id,
        )

    def pick(self, waiting: Iterable[Waiting], active_lines: Collection[str]) -> list[Waiting]:
        """The waiting runs to start now, in start order.

        ``active_lines`` holds the model line of every run in progress (one entry per run), so
        its length is what counts against the global bound.
        """
        free = self.max_concurrent - len(active_lines)
        busy = set(active_lines)
        chosen: list[Waiting] = []
        for candidate in sorted(waiting, key=lambda w: w.order):
            if len(chosen) >= free:
                break
            if candidate.model_line in busy:
                continue
            chosen.append(candidate)
            busy.add(candidate.model_line)
        return chosen
