"""Canary routing: which version of a model line answers a request.

Rollout announces weights with ``rollout.step`` (the candidate gets ``traffic_percent``, the
champion the rest) and ends a canary with ``canary.verdict`` (promoted: the candidate serves
100 %; rolled back: the champion does). Events may arrive late, twice or out of order, so a
route carries the ``(occurred_at, sequence)`` of the event that set it and only a newer one
replaces it. A verdict ends its rollout, so it outranks a step stamped at the same instant.

A request falls into one of ``BUCKETS`` buckets: from its routing key when it has one (the same
key always lands on the same version while the weights hold), else from its random prediction
id. The candidate owns the lowest ``traffic_percent`` % of the buckets.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from flywheel_contracts import CanaryVerdictV1, RolloutStepV1
from flywheel_contracts.events import CanaryOutcome

BUCKETS: Final = 10_000
"""Granularity of a split: 0.01 % of the traffic per bucket."""

VERDICT_SEQUENCE: Final = 2**62
"""Sequence given to a verdict: after every step of its rollout stamped at the same instant."""


@dataclass(frozen=True)
class LineRoute:
    """The weights of one model line, as the newest routing event set them."""

    model_line: str
    registered_model: str
    champion_version: str | None
    """Version serving the traffic the candidate does not get; None: the registry's champion
    alias decides."""
    candidate_version: str | None
    candidate_percent: int
    occurred_at: datetime
    sequence: int
    rollout_id: uuid.UUID | None = None

    @property
    def stamp(self) -> tuple[datetime, int]:
        return (self.occurred_at, self.sequence)

    def newer_than(self, other: LineRoute | None) -> bool:
        return other is None or self.stamp > other.stamp

    def version_for(self, bucket: int) -> str | None:
        """The version of a request in ``bucket``; None means the champion alias."""
        if self.candidate_version is not None and bucket < self.candidate_percent * (
            BUCKETS // 100
        ):
            return self.candidate_version
        return self.champion_version


def route_from_step(event: RolloutStepV1) -> LineRoute:
    step = event.payload
    return LineRoute(
        model_line=step.model_line,
        registered_model=step.registered_model,
        champion_version=step.champion_version,
        candidate_version=step.candidate_version,
        candidate_percent=step.traffic_percent,
        occurred_at=event.occurred_at,
        sequence=step.sequence,
        rollout_id=step.rollout_id,
    )


def route_from_verdict(event: CanaryVerdictV1) -> LineRoute:
    verdict = event.payload
    promoted = verdict.verdict is CanaryOutcome.PROMOTED
    return LineRoute(
        model_line=verdict.model_line,
        registered_model=verdict.registered_model,
        champion_version=verdict.candidate_version if promoted else verdict.champion_version,
        candidate_version=None,
        candidate_percent=0,
        occurred_at=event.occurred_at,
        sequence=VERDICT_SEQUENCE,
        rollout_id=verdict.rollout_id,
    )


def bucket_for_key(model_line: str, key: str) -> int:
    """A stable bucket for a routing key: the same on every replica and after restarts."""
    digest = hashlib.sha256(f"{model_line}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def bucket_for_id(prediction_id: uuid.UUID) -> int:
    """A uniformly random bucket: a uuid4's bits are random."""
    return prediction_id.int % BUCKETS


class RoutingTable:
    """The routes this replica knows, newest event wins; lines without one use the champion."""

    def __init__(self) -> None:
        self._routes: dict[str, LineRoute] = {}

    def get(self, model_line: str) -> LineRoute | None:
        return self._routes.get(model_line)

    def apply(self, route: LineRoute) -> bool:
        """Take ``route`` if it is newer than the one held; False for a stale or repeated one."""
        if not route.newer_than(self._routes.get(route.model_line)):
            return False
        self._routes[route.model_line] = route
        return True

    def routes(self) -> list[LineRoute]:
        return sorted(self._routes.values(), key=lambda r: r.model_line)
