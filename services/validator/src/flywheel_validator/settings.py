"""The validator's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from flywheel_clients.registry import CHALLENGER, CHAMPION
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET
from flywheel_validator.gates import Gates

SERVICE = "validator"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


class ValidatorSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_VALIDATOR_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_VALIDATOR_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8084
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="validator", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    auth: AuthSettings | None = None
    """Bearer-token checks of the read API; unset leaves it open (local runs only). When set,
    every route but the probes needs a valid token."""

    data_bucket: str = DATA_BUCKET
    """Bucket holding the dataset snapshots and images that labeling writes."""

    champion_alias: str = CHAMPION
    """Registry alias of the version a candidate is compared against."""

    challenger_alias: str = CHALLENGER
    """Registry alias set on a candidate that passed."""

    default_gates: Gates = Field(default_factory=Gates)
    """Gates of every project without an override."""

    project_gates: dict[str, Gates] = Field(default_factory=dict)
    """Per-project overrides by project id; fields an override leaves out keep the defaults
    (``FLYWHEEL_VALIDATOR_PROJECT_GATES__<project>__MIN_ACCURACY=0.95``, or JSON)."""

    latency_images: int = Field(default=100, ge=1)
    """Single-image runs the latency percentiles are measured over."""

    parity_images: int = Field(default=16, ge=1)
    """Test images the export-parity check runs in PyTorch and onnxruntime."""

    eval_threads: int = Field(default=1, ge=1)
    """onnxruntime intra-op threads while scoring: one, like one serving instance per core."""

    fetch_concurrency: int = Field(default=8, ge=1)
    """Test images fetched from S3 at once."""
