"""The validator's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, PositiveInt
from pydantic_settings import SettingsConfigDict

from flywheel_clients.registry import CHALLENGER, CHAMPION
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.drift_reference import DEFAULT_PREFIX
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET
from flywheel_serving.repository import ServingOptions
from flywheel_validator.gates import Gates
from flywheel_validator.performance import PerformanceGate

SERVICE = "validator"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


class PerformanceSettings(PerformanceGate):
    """The performance gate: candidate and champion measured on one Triton, in one run."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    enabled: bool = False
    """Measure and compare serving performance; off, verdicts carry no performance line."""

    triton_url: str | None = None
    """Triton HTTP endpoint (``host:port``) both versions are loaded into, with explicit model
    control; unset, the gate reports itself skipped. A Triton of the validator's own (a
    sidecar) keeps live traffic out of the figures and the figures out of live traffic."""

    repository_dir: Path = Path("validator-model-repository")
    """Model repository folder this service writes the two versions into; that Triton must
    read the same folder."""

    serving: ServingOptions = Field(default_factory=ServingOptions)
    """How a version is served when it carries no golden configuration (a golden one replaces
    batch size, queue delay and instances). The Triton bundled with ``nvidia-pytriton`` needs
    ``FLYWHEEL_VALIDATOR_PERFORMANCE__SERVING__FLAVOUR=python``."""

    concurrencies: list[PositiveInt] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    """Requests in flight at each measured level (JSON list)."""

    requests_per_level: int = Field(default=400, ge=1)
    """Requests of one model at one level in one round (with fewer, two identical models
    measured on two shared cores came out a third apart)."""

    rounds: int = Field(default=3, ge=1)
    """Times every level is measured for each model, the two taking turns (figures are the
    medians of the rounds)."""

    images: int = Field(default=64, ge=1)
    """Test images the requests cycle through."""

    load_timeout_s: float = Field(default=120.0, gt=0)
    """Longest a version may take to load in Triton."""


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

    drift_reference: bool = True
    """Write each scored candidate's drift reference (its predictions, embeddings and image
    statistics on the held-out TEST and VALIDATION splits) to the data bucket, for
    data-monitor's drift checks."""

    drift_reference_prefix: str = Field(default=DEFAULT_PREFIX, min_length=1)
    """Data-bucket prefix of the drift references (``<prefix>/<model line>/<version>.npz``);
    data-monitor must read the same one."""

    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    """The performance gate (``FLYWHEEL_VALIDATOR_PERFORMANCE__ENABLED=true`` …)."""
