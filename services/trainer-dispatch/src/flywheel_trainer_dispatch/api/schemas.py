"""Request and response bodies of the operator API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from flywheel_contracts.events import SLUG
from flywheel_trainer_dispatch.ports import RunState, Source, TrainingRun
from flywheel_trainer_dispatch.scheduler import Priority
from flywheel_trainer_dispatch.settings import check_entry_point


class RunRequestIn(BaseModel):
    """A run asked for by an operator."""

    model_config = ConfigDict(extra="forbid")

    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    snapshot_id: str = Field(min_length=1, max_length=200)
    priority: Literal["manual", "scheduled"] = "manual"
    """``scheduled`` for runs a timer or pipeline asks for; both rank below event triggers."""
    excluded_label_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100_000)
    """Labels training must leave out."""
    entry_point: str | None = Field(default=None, max_length=1000)
    """Entry point of this run instead of the model line's: ``package.module:function`` or a
    script path where the training runs (see docs/bring-your-own-model.md)."""
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict, max_length=200)
    """Hyperparameters of this run, over the model line's."""
    nproc_per_node: int | None = Field(default=None, ge=1, le=64)
    """Training processes per node of this run instead of the model line's."""

    _entry_point_parses = field_validator("entry_point")(check_entry_point)


class RunOut(BaseModel):
    """A run: trigger, queue, timestamps, where it runs and how it ended."""

    run_id: uuid.UUID
    state: RunState
    project_id: str
    model_line: str
    snapshot_id: str
    registered_model: str
    source: Source
    reason: str
    priority: Priority
    queue_position: int | None
    trigger_event_id: uuid.UUID
    correlation_id: uuid.UUID
    decision_id: uuid.UUID | None
    requested_by: str | None
    excluded_label_count: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    backend: str
    owner: str | None
    """Instance that started and watches the run."""
    exit_code: int | None
    failure_reason: str | None
    retryable: bool | None
    superseded_by: uuid.UUID | None
    cancel_requested_at: datetime | None
    mlflow_run_id: str | None
    model_version: str | None
    base_model_version: str | None
    metrics: dict[str, float]
    entry_point: str | None
    """The entry point the operator asked for; None: the model line's (the command shows it)."""
    hyperparameters: dict[str, JsonValue]
    nproc_per_node: int | None

    @classmethod
    def build(cls, run: TrainingRun) -> RunOut:
        return cls.model_validate(
            run.model_dump() | {"excluded_label_count": len(run.excluded_label_ids)}
        )


class RunDetailOut(RunOut):
    """A run with the command it runs, where it was placed and the end of its log."""

    command: list[str] | None
    placement: dict[str, Any] | None = None
    """Kubernetes backend: the placement's inputs and decision (cluster, Kueue flavor, why)."""
    log_tail: str

    @classmethod
    def build(cls, run: TrainingRun) -> RunDetailOut:
        placement = ((run.handle or {}).get("details") or {}).get("placement")
        return cls.model_validate(
            run.model_dump()
            | {
                "excluded_label_count": len(run.excluded_label_ids),
                "placement": placement if isinstance(placement, dict) else None,
            }
        )


class RunsOut(BaseModel):
    runs: list[RunOut]
