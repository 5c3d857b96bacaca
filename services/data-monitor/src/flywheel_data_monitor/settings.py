"""The data monitor's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from flywheel_contracts.events import RetrainPolicy
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET

SERVICE = "data-monitor"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


class DataMonitorSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_DATA_MONITOR_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_DATA_MONITOR_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8082
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="data_monitor", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    auth: AuthSettings | None = None
    """Bearer-token checks of the read API; unset leaves it open (local runs only). When set,
    every route but the probes needs a valid token."""

    data_bucket: str = DATA_BUCKET
    """Bucket holding the dataset snapshots that labeling writes."""

    tick_interval_s: float = Field(default=5.0, gt=0)
    """How often the timer re-evaluates projects with pending labels (cooldown, max-wait)."""

    default_policy: RetrainPolicy = Field(default_factory=RetrainPolicy)
    """Retrain and quality policy of a project until its first project.configured arrives."""
