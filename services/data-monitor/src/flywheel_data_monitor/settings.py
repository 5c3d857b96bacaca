"""The data monitor's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from flywheel_contracts.events import RetrainPolicy
from flywheel_data_monitor.drift import DriftThresholds
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.drift_reference import DEFAULT_PREFIX
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET

SERVICE = "data-monitor"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


class DriftSettings(BaseModel):
    """Drift detection: recent production inferences against the champion's training data."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Keep drift features of inference logs and check them; off, inference logs are ignored."""

    thresholds: DriftThresholds = Field(default_factory=DriftThresholds)
    """When a test judges (sample sizes) and when it calls drift (p-value and effect sizes)."""

    window_s: float = Field(default=3600.0, gt=0)
    """Production window compared: the inferences of the last this many seconds."""

    window_samples: int = Field(default=1000, ge=1)
    """At most this many of the window's newest inferences are compared: a check judges what
    is served now, not diluted by an hour of what was served before."""

    check_interval_s: float = Field(default=600.0, gt=0)
    """Schedule: a model line with new inferences is checked at least this often."""

    check_every_samples: int = Field(default=1000, ge=1)
    """Volume: a model line is checked as soon as this many inferences arrived since its last
    check, whatever the schedule says."""

    min_fresh_labels: int = Field(default=100, ge=0)
    """Labels not yet trained on that a drift retrain needs; with fewer, labels are requested
    for the most drifted images instead."""

    max_label_requests: int = Field(default=50, ge=1, le=1000)
    """Images one labels.requested asks for (the most drifted first)."""

    cooldown_s: float = Field(default=3600.0, ge=0)
    """After a drift action for a model line, further drifted windows of the same champion are
    reported but trigger nothing for this long."""

    retention_s: float = Field(default=86400.0, gt=0)
    """Drift features older than this are deleted (the inference logs in S3 keep them)."""

    reference_prefix: str = DEFAULT_PREFIX
    """Data-bucket prefix of the training references (``<prefix>/<model line>/<version>.npz``)."""

    reports_prefix: str = "drift/reports"
    """Data-bucket prefix of the reports' plots (``<prefix>/<report id>/<feature>.png``)."""


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

    drift: DriftSettings = Field(default_factory=DriftSettings)
    """Drift detection (``FLYWHEEL_DATA_MONITOR_DRIFT__WINDOW_S=1800`` …)."""
