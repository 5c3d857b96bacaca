"""What the use cases need from the outside world, and the records that cross those ports.

``Registry`` is the MLflow model registry (``flywheel_clients.registry.ModelRegistry`` implements
it as is). ``Serving`` makes a set of versions of a model loaded (Triton today, KServe later).
``Bus`` publishes an event straight away, for republications that change no state. ``Store`` is
the service's PostgreSQL schema, with ``transaction()`` for the unit of work in which an event is
claimed, canaries locked and changed, and outgoing events queued in the outbox, all committed
together.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from flywheel_clients.registry import ModelVersionInfo
from flywheel_contracts import Event
from flywheel_rollout.analysis import CheckStatus, MetricResult, Window
from flywheel_rollout.machine import Action
from flywheel_rollout.policy import CanaryPolicy


class CanaryState(StrEnum):
    WAITING = "waiting"
    """Validated; waits for its line to be free (and unfrozen)."""
    STARTING = "starting"
    """Chosen to run; the candidate is being loaded."""
    RUNNING = "running"
    PAUSED = "paused"
    """Weights held, no checks, until an operator resumes it."""
    PROMOTING = "promoting"
    """Promotion decided; the registry is being told."""
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"
    """Replaced, while it waited, by a newer version of its line."""
    REFUSED = "refused"
    """Never run: its line was frozen, or it already is the champion."""

    @property
    def active(self) -> bool:
        """At most one canary per line is active."""
        return self in ACTIVE_STATES

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


ACTIVE_STATES = frozenset(
    {CanaryState.STARTING, CanaryState.RUNNING, CanaryState.PAUSED, CanaryState.PROMOTING}
)
TERMINAL_STATES = frozenset(
    {
        CanaryState.PROMOTED,
        CanaryState.ROLLED_BACK,
        CanaryState.SUPERSEDED,
        CanaryState.REFUSED,
    }
)


class Canary(BaseModel):
    """One validated version's way to (or back from) full traffic; the source of truth."""

    model_config = ConfigDict(validate_assignment=True)

    rollout_id: uuid.UUID
    validated_event_id: uuid.UUID
    """The model.validated that asked for it (one canary per event)."""
    correlation_id: uuid.UUID
    project_id: str
    model_line: str
    registered_model: str
    candidate_version: str
    champion_version: str | None = None
    """The version it is compared with; set when it starts, None when there was none."""
    state: CanaryState
    policy: CanaryPolicy
    step: int = 0
    """Index of the step in ``policy.steps`` (``len(steps)`` once promoted)."""
    traffic_percent: int = 0
    """Share of the traffic the candidate gets now."""
    sequence: int = 0
    """Weight changes published so far; each ``rollout.step`` carries the new count."""
    interval_index: int = 0
    """The open analysis interval: inference logs arriving now count in it."""
    interval_started_at: datetime | None = None
    step_started_at: datetime | None = None
    passed_in_step: int = 0
    failed_checks: int = 0
    checks: int = 0
    """Checks made so far, counted or not."""
    direct: bool = False
    """Promoted without a canary: there was no champion to compare with."""
    reasons: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    """The latest check's numbers."""
    last_step: dict[str, Any] | None = None
    """The latest ``rollout.step`` as sent, republished as is so a BFF can catch up."""
    decided_by: str | None = None
    """Operator who promoted, rolled back or paused it; None for the service's own moves."""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    tidied: bool = False
    """The registry knows how it ended (aliases moved or removed, tags set)."""
    cleanup_at: datetime | None = None
    """From when the versions it no longer needs are unloaded and the registry tidied."""
    finalized_at: datetime | None = None
    """When that clean-up was done."""


class Check(BaseModel):
    """One analysis interval judged: its inputs, its result and what the canary did next."""

    model_config = ConfigDict(frozen=True)

    check_id: uuid.UUID
    rollout_id: uuid.UUID
    interval_index: int
    step: int
    traffic_percent: int
    started_at: datetime
    ended_at: datetime
    status: CheckStatus
    counted: bool
    """Whether it counted towards the step or the threshold (not for too little traffic or an
    outage)."""
    action: Action
    candidate: Window
    champion: Window
    candidate_feedback: Window
    """Feedback on the candidate's pre-fills over the whole canary so far."""
    champion_feedback: Window
    results: list[MetricResult]
    reasons: list[str]
    metrics: dict[str, float]


class TimelineEntry(BaseModel):
    """One thing that happened to a model line, from labels to verdict, in order of writing."""

    model_config = ConfigDict(frozen=True)

    entry_id: int | None = None
    """Assigned by the store; orders the timeline."""
    model_line: str | None
    """None while the project's line is not known yet; filled in once it is."""
    project_id: str | None
    rollout_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    """Links labels → trigger → run → validation → steps → verdict."""
    event_id: uuid.UUID | None = None
    kind: str
    """The event type (``labels.saved`` … ``canary.verdict``), ``check``, or
    ``operator.<action>``."""
    actor: str
    """``rollout`` for the service's own moves, the event's type for what it heard, the
    operator's name for actions."""
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)
    at: datetime


class LineControl(BaseModel):
    """What an operator set on a model line."""

    model_config = ConfigDict(validate_assignment=True)

    model_line: str
    frozen: bool = False
    """No new canary starts; validated versions are recorded and refused."""
    changed_by: str | None = None
    changed_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class CanaryFilter:
    model_line: str | None = None
    states: frozenset[CanaryState] = frozenset()
    """Any of these; empty: every state."""
    limit: int = 50


class Registry(Protocol):
    """The model registry: aliases and version tags."""

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """None when the alias is not set."""
        ...

    async def set_alias(self, name: str, alias: str, version: str) -> None: ...

    async def delete_alias(self, name: str, alias: str) -> None:
        """Nothing happens when the alias is not set."""
        ...

    async def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None: ...


class Serving(Protocol):
    """Where versions are loaded and answer requests."""

    async def serve(self, registered_model: str, versions: Sequence[str]) -> None:
        """Make exactly ``versions`` of the model loaded, loading and unloading as needed.

        ``DependencyUnavailableError`` while the server is away (try again later);
        ``NotFoundError`` or ``InvalidInputError`` when a version's files are missing or bad.
        """
        ...

    async def ready(self, registered_model: str, version: str) -> bool:
        """Whether the version answers requests; ``DependencyUnavailableError`` while the
        server is away."""
        ...


class Bus(Protocol):
    """Publishes at once, outside any transaction (republications change no state)."""

    async def publish(self, event: Event[Any]) -> None: ...


class Transaction(Protocol):
    """One unit of work on the rollout's schema; everything in it commits or nothing does."""

    async def claim(self, event_id: uuid.UUID) -> bool:
        """True the first time this control event is handled (a redelivery gets False)."""
        ...

    async def claim_log(self, event_id: uuid.UUID) -> bool:
        """The same for an inference log, whose claims are pruned after a while."""
        ...

    async def emit(self, event: Event[Any]) -> None:
        """Queue an event for publishing once the transaction commits (outbox)."""
        ...

    async def lock_line(self, model_line: str) -> None:
        """Serialize admissions and starts of one line until the transaction ends."""
        ...

    async def add_canary(self, canary: Canary) -> None: ...

    async def save_canary(self, canary: Canary) -> None: ...

    async def lock_canary(self, rollout_id: uuid.UUID) -> Canary | None: ...

    async def active_canary(self, model_line: str) -> Canary | None:
        """The line's active canary, locked."""
        ...

    async def waiting_canaries(self, model_line: str) -> list[Canary]:
        """The line's waiting canaries, oldest first, locked."""
        ...

    async def canary_by_event(self, validated_event_id: uuid.UUID) -> Canary | None: ...

    async def open_interval(self, rollout_id: uuid.UUID) -> int | None:
        """The interval a running canary's logs count in now (share-locked against its
        check); None unless it is running."""
        ...

    async def window(self, rollout_id: uuid.UUID, interval: int, version: str) -> Window:
        """One version's window, locked (empty when there is none yet)."""
        ...

    async def save_window(
        self, rollout_id: uuid.UUID, interval: int, version: str, window: Window
    ) -> None: ...

    async def windows(self, rollout_id: uuid.UUID, interval: int) -> dict[str, Window]:
        """Every version's window of one interval."""
        ...

    async def feedback(self, rollout_id: uuid.UUID) -> dict[str, Window]:
        """Every version's windows of the whole canary, added up."""
        ...

    async def recent_class(
        self, rollout_id: uuid.UUID, version: str, input_sha256: str
    ) -> str | None:
        """The class ``version`` last gave this input during the canary, if remembered."""
        ...

    async def remember(
        self,
        rollout_id: uuid.UUID,
        version: str,
        input_sha256: str,
        predicted_class: str,
        at: datetime,
    ) -> None: ...

    async def forget(self, rollout_id: uuid.UUID) -> None:
        """Drop the inputs remembered for a finished canary."""
        ...

    async def add_check(self, check: Check) -> None: ...

    async def record(self, entry: TimelineEntry) -> None:
        """Append to the timeline."""
        ...

    async def control(self, model_line: str) -> LineControl:
        """The line's controls, locked (defaults when none were ever set)."""
        ...

    async def save_control(self, control: LineControl) -> None: ...

    async def learn_line(self, project_id: str, model_line: str) -> None:
        """Remember that the project feeds the line; timeline entries of the project that
        lacked a line get it."""
        ...

    async def lines_of(self, project_id: str) -> list[str]: ...

    async def project_canaries(self, project_id: str) -> list[Canary]:
        """Running or paused canaries of the project (feedback counts for them)."""
        ...


class Store(Protocol):
    """The rollout's persistent state."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def canary(self, rollout_id: uuid.UUID) -> Canary | None: ...

    async def current(self, model_line: str) -> Canary | None:
        """The line's active canary."""
        ...

    async def canaries(self, where: CanaryFilter) -> list[Canary]:
        """Newest first."""
        ...

    async def checks(self, rollout_id: uuid.UUID) -> list[Check]:
        """In interval order."""
        ...

    async def timeline(
        self, model_line: str, correlation_id: uuid.UUID | None, limit: int
    ) -> list[TimelineEntry]:
        """The latest ``limit`` entries of the line, oldest first."""
        ...

    async def line_control(self, model_line: str) -> LineControl: ...

    async def frozen_lines(self) -> set[str]: ...

    async def unfinalized(self) -> list[Canary]:
        """Ended canaries whose clean-up is not done yet."""
        ...

    async def latest_steps(self) -> list[Canary]:
        """Per line, the canary whose weights were published last."""
        ...

    async def prune(self, *, keep_recent: int, log_claims_before: datetime) -> None:
        """Bound what grows with traffic: remembered inputs per version and canary, and the
        claims of inference logs too old to be redelivered."""
        ...
