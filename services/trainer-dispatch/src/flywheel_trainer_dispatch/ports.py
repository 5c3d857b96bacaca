"""What the use cases need from the outside world, and the records that cross those ports.

``RunStore`` is the service's PostgreSQL schema, the source of truth for every run: reads
outside any lock, and ``transaction()`` for a unit of work in which runs are locked, the
triggering event claimed and outgoing events queued in the outbox, all committed together.
``TrainingBackend`` is where training actually happens (a local subprocess, or a Kubernetes
Job or PyTorchJob): it launches a run, reports on it, cancels it, and after a restart tells
what became of a run it launched before.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from flywheel_contracts import Event
from flywheel_trainer_dispatch.scheduler import Priority, Waiting


class RunState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    """Chosen to start by an instance that is launching it."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    """Replaced, while it waited, by a newer trigger for its model line."""

    @property
    def active(self) -> bool:
        """Whether the run holds its model line's slot (it is starting or running)."""
        return self in (RunState.STARTING, RunState.RUNNING)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.SUPERSEDED}
)
ACTIVE_STATES = frozenset({RunState.STARTING, RunState.RUNNING})

Source = Literal["threshold.reached", "api"]
"""What asked for the run: the event, or an operator through the API."""


class TrainingRun(BaseModel):
    """One training run: its trigger, its place in the queue, and what became of it."""

    run_id: uuid.UUID
    """Also the ``training_run_id`` of the events and of the MLflow run's tags."""
    trigger_event_id: uuid.UUID
    """threshold.reached event (or API request) that asked for the run; one run per trigger."""
    correlation_id: uuid.UUID
    """Carried over from the trigger to model.trained / training.failed."""
    causation_id: uuid.UUID | None = None
    """The triggering event, as the outcome event's cause; None for API-triggered runs."""
    source: Source
    project_id: str
    model_line: str
    snapshot_id: str
    registered_model: str
    reason: str
    """The trigger's reason: a ``ThresholdReason`` value, or ``scheduled`` / ``manual``."""
    decision_id: uuid.UUID | None = None
    """data-monitor's decision behind a threshold.reached trigger."""
    excluded_label_ids: list[uuid.UUID] = Field(default_factory=list)
    """Quarantined labels training must leave out."""
    requested_by: str | None = None
    """Operator who asked through the API (token subject), if any."""
    priority: Priority
    queue_position: int | None = None
    """Place in the queue (assigned by the database when the run is added)."""
    state: RunState = RunState.QUEUED
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    """When the instance running it last checked on it."""
    backend: str
    owner: str | None = None
    """Instance that started it and watches it."""
    handle: dict[str, Any] | None = None
    """The backend's handle (``RunHandle`` as JSON), to find the run again after a restart."""
    command: list[str] | None = None
    log_tail: str = ""
    exit_code: int | None = None
    """Exit status of the training process; negative: killed by that signal."""
    failure_reason: str | None = None
    retryable: bool | None = None
    superseded_by: uuid.UUID | None = None
    cancel_requested_at: datetime | None = None
    mlflow_run_id: str | None = None
    model_version: str | None = None
    base_model_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    entry_point: str | None = None
    """The entry point an operator asked for; None: the model line's (settings)."""
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    """Hyperparameters an operator asked for, over the line's."""
    nproc_per_node: int | None = None
    """Processes per node an operator asked for; None: the line's."""

    def waiting(self) -> Waiting:
        if self.queue_position is None:
            raise ValueError(f"run {self.run_id} has no place in the queue")
        return Waiting(self.run_id, self.model_line, self.priority, self.queue_position)


class RunFilter(BaseModel):
    """Which runs a listing returns, newest first."""

    model_config = ConfigDict(frozen=True)

    states: frozenset[RunState] = frozenset()
    """Any of these states; empty: any state."""
    project_id: str | None = None
    model_line: str | None = None
    limit: int = 50


class Transaction(Protocol):
    """One unit of work on the service's schema; everything in it commits or nothing does."""

    async def claim(self, event_id: uuid.UUID) -> bool:
        """True the first time this event is handled (a redelivery gets False)."""
        ...

    async def lock_line(self, model_line: str) -> None:
        """Serialize admissions for one model line until commit."""
        ...

    async def try_lock_scheduler(self) -> bool:
        """Take the scheduling lock until commit; False when another instance holds it."""
        ...

    async def run_by_trigger(self, trigger_event_id: uuid.UUID) -> TrainingRun | None: ...

    async def waiting_run(self, model_line: str) -> TrainingRun | None:
        """The line's queued run, locked until commit."""
        ...

    async def waiting_runs(self) -> list[TrainingRun]:
        """Every queued run not locked by another transaction, locked until commit."""
        ...

    async def active_lines(self) -> list[str]:
        """The model line of every starting or running run (any instance)."""
        ...

    async def lock_run(self, run_id: uuid.UUID) -> TrainingRun | None:
        """The run, locked until commit; None when it does not exist."""
        ...

    async def add_run(self, run: TrainingRun) -> TrainingRun:
        """Insert a run; returns it with the database's queue position and creation time."""
        ...

    async def save_run(self, run: TrainingRun) -> None: ...

    async def heartbeat(self, owner: str, at: datetime) -> None:
        """Record that ``owner`` still watches every run in progress that it owns."""
        ...

    async def emit(self, event: Event[Any]) -> None:
        """Queue an event for publishing once the transaction commits (outbox)."""
        ...


class RunStore(Protocol):
    """The service's persistent state."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def run(self, run_id: uuid.UUID) -> TrainingRun | None: ...

    async def runs(self, where: RunFilter) -> list[TrainingRun]:
        """Newest first."""
        ...

    async def active_runs(self, owner: str) -> list[TrainingRun]:
        """Starting or running runs of one instance, oldest first."""
        ...

    async def stale_runs(self, owner: str, silent_since: datetime) -> list[TrainingRun]:
        """Runs in progress of other instances that have not reported since ``silent_since``."""
        ...


# --- the training backend -----------------------------------------------------------------------


class RunSpec(BaseModel):
    """What to train: everything a backend needs to launch one run."""

    model_config = ConfigDict(frozen=True)

    run_id: uuid.UUID
    project_id: str
    model_line: str
    snapshot_id: str
    registered_model: str
    correlation_id: uuid.UUID
    excluded_label_ids: tuple[uuid.UUID, ...] = ()
    priority: Priority | None = None
    """How urgent the run is; a backend that places runs (Kubernetes) decides by it."""
    entry_point: str | None = None
    """The run's own entry point; None: its model line's."""
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    """The run's own hyperparameters, over its model line's."""
    nproc_per_node: int | None = None
    """The run's own processes per node; None: its model line's."""


class RunHandle(BaseModel):
    """How a backend finds a run again, also after a restart; stored with the run."""

    model_config = ConfigDict(frozen=True)

    backend: str
    run_id: uuid.UUID
    command: list[str] = Field(default_factory=list)
    """What was started (no secrets: those travel in the environment)."""
    details: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific: process id and files for ``local``, object names for Kubernetes."""


class Phase(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    """Nothing runs any more and nothing says how it ended."""
    NOT_STARTED = "not_started"
    """The backend has no trace of the run: it was never launched."""


class TrainingOutput(BaseModel):
    """What a successful run reports: the fields of the training job's result file we use."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    run_id: str
    """MLflow run id."""
    model_name: str
    version: str
    base_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    world_size: int = 1
    training_run_id: str | None = None


class RunStatus(BaseModel):
    """Where a run stands, as its backend sees it."""

    model_config = ConfigDict(frozen=True)

    phase: Phase
    exit_code: int | None = None
    """Exit status when known; negative: killed by that signal."""
    output: TrainingOutput | None = None
    log_tail: str = ""
    handle: RunHandle | None = None
    """The handle to keep using: ``recover`` may complete one (a process found by its run id)."""


class TrainingBackend(Protocol):
    """Runs training jobs. Methods never raise for a job that failed: they report it."""

    name: str

    async def launch(self, spec: RunSpec) -> RunHandle:
        """Start the run; raises ``LaunchError`` when it cannot be started at all."""
        ...

    async def poll(self, handle: RunHandle) -> RunStatus:
        """Where a run launched by this instance (or re-attached by ``recover``) stands."""
        ...

    async def cancel(self, handle: RunHandle) -> None:
        """Stop the run and everything it started; returns once it is gone."""
        ...

    async def recover(self, handle: RunHandle) -> RunStatus:
        """After a restart: re-attach the run if it still runs and is really ours, or say how
        it ended. ``handle.details`` may be empty for a run that was being launched."""
        ...

    async def read_log(self, handle: RunHandle) -> str | None:
        """The run's whole log (bounded), or None when this instance cannot read it."""
        ...
