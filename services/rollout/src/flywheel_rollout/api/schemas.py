"""Request and response bodies of the operator API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flywheel_rollout.ports import Canary, Check, LineControl, TimelineEntry


class ActionIn(BaseModel):
    """Why an operator acts; recorded on the line's timeline."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


class CanariesOut(BaseModel):
    canaries: list[Canary]


class ChecksOut(BaseModel):
    rollout_id: str
    checks: list[Check]


class TimelineOut(BaseModel):
    model_line: str
    entries: list[TimelineEntry]


class LineOut(BaseModel):
    """A model line: its controls, its canary in progress and the versions waiting."""

    model_line: str
    control: LineControl
    current: Canary | None
    waiting: list[Canary]
