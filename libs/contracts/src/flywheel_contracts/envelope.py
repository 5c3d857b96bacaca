"""The versioned envelope every Flywheel event travels in.

An event class names its ``TYPE`` and ``VERSION`` and declares a frozen payload model. Payloads
carry ids (project, snapshot, run, model version), never copies of another service's state.
Within one version only optional fields may be added; a breaking change is a new class with a
new ``VERSION`` and therefore a new routing key.
"""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

P = TypeVar("P", bound="Payload")


EXAMPLE_EVENT_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
EXAMPLE_CORRELATION_ID = uuid.UUID("00000000-0000-4000-8000-0000000000c0")
EXAMPLE_TIME = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Payload(BaseModel):
    """Base of every event payload: immutable; unknown fields from newer producers are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)


class Event(BaseModel, Generic[P]):
    """Envelope: identity, causality and the typed payload."""

    # Consumers ignore unknown fields: within a version, producers may add optional ones.
    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    TYPE: ClassVar[str]
    VERSION: ClassVar[int]
    EXCHANGE: ClassVar[str]
    EXAMPLE: ClassVar[dict[str, Any]]
    """Payload of ``example()``."""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    """Idempotency key: a consumer handles one event_id once."""
    type: str = ""
    """Event type; equals the class's ``TYPE`` (filled in from it)."""
    schema_version: int = 0
    """Version of this event type's schema; equals the class's ``VERSION``."""
    occurred_at: datetime = Field(default_factory=utcnow)
    """When the fact happened (UTC)."""
    correlation_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    """Follows one batch of labels through the whole loop to its canary verdict."""
    causation_id: uuid.UUID | None = None
    """event_id of the event that caused this one; None for events caused by a request."""
    payload: P

    @model_validator(mode="before")
    @classmethod
    def _fill_type_and_version(cls, data: Any) -> Any:
        if isinstance(data, dict) and hasattr(cls, "TYPE"):
            data = dict(data)
            data.setdefault("type", cls.TYPE)
            data.setdefault("schema_version", cls.VERSION)
            # Checked before the payload, so a misrouted event says so instead of listing fields.
            if data["type"] != cls.TYPE or data["schema_version"] != cls.VERSION:
                msg = (
                    f"envelope says {data['type']} v{data['schema_version']}, "
                    f"expected {cls.TYPE} v{cls.VERSION}"
                )
                raise ValueError(msg)
        return data

    @classmethod
    def routing_key(cls) -> str:
        """Routing key of this class: the type, suffixed with the version from v2 on."""
        return cls.TYPE if cls.VERSION == 1 else f"{cls.TYPE}.v{cls.VERSION}"

    @classmethod
    def schema_name(cls) -> str:
        """File stem of this class's committed JSON Schema."""
        return f"{cls.TYPE}.v{cls.VERSION}"

    @classmethod
    def example(cls) -> Self:
        """A valid, deterministic instance, for docs, AsyncAPI and tests."""
        return cls.model_validate(
            {
                "event_id": EXAMPLE_EVENT_ID,
                "occurred_at": EXAMPLE_TIME,
                "correlation_id": EXAMPLE_CORRELATION_ID,
                "payload": cls.EXAMPLE,
            }
        )

    def caused(self, event_type: builtins.type[E], payload: Payload) -> E:
        """Build the next event in the chain, keeping the correlation and pointing back here."""
        return event_type.model_validate(
            {
                "correlation_id": self.correlation_id,
                "causation_id": self.event_id,
                "payload": payload,
            }
        )


E = TypeVar("E", bound=Event[Any])
