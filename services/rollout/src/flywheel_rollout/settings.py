"""The rollout's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from flywheel_clients.kubernetes import KubeConnection
from flywheel_clients.registry import CHALLENGER, CHAMPION
from flywheel_rollout.policy import CanaryPolicy
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_serving.repository import ServingOptions

SERVICE = "rollout"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


class KServeSettings(BaseModel):
    """Where the ``InferenceService`` of each registered model lives and what it serves."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    connection: KubeConnection = Field(default_factory=KubeConnection)
    """How to reach the cluster's API server (in-cluster service account, kubeconfig, or a
    plain ``host``)."""

    namespace: str = Field(default="flywheel", pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    """Namespace of the InferenceServices."""

    services: dict[str, str] = Field(default_factory=dict)
    """InferenceService name per registered model (one registered model per model line);
    models not listed get ``name_template``."""

    name_template: str = "{registered_model}"
    """InferenceService name of a registered model not in ``services``."""

    storage_uri_template: str = "s3://flywheel-models/kserve/{registered_model}/{version}/"
    """``storageUri`` of one registered version: a Triton model repository holding
    ``<registered_model>/config.pbtxt`` and that version's folder. This service writes it from
    the registry (platform S3 credentials) before an InferenceService names it, unless
    ``publish_repositories`` is off."""

    publish_repositories: bool = True
    """Write each version's repository under its ``storageUri``; off when another process
    (a CI pipeline, say) publishes them."""

    serving: ServingOptions = Field(default_factory=ServingOptions)
    """How the published repositories' ``config.pbtxt`` serves a version (Triton's
    ``onnxruntime`` backend by default)."""

    readiness_timeout_s: float = Field(default=300.0, gt=0)
    """Longest a change may take to be ready (a revision scheduled, pulled and started)
    before the tick gives up and tries again later."""

    poll_s: float = Field(default=2.0, gt=0)
    """How often readiness is read while waiting for it."""

    model_format: Literal["triton", "onnx"] = "triton"
    """Model format of an InferenceService this service has to create."""

    runtime: str | None = None
    """ServingRuntime of a created InferenceService; unset: KServe picks one."""

    service_account: str | None = None
    """Service account (with the S3 credentials) of a created InferenceService."""

    min_replicas: int = Field(default=1, ge=0)
    """Smallest replica count of a created InferenceService."""

    cpu: str = "1"
    """CPU request and limit of a created InferenceService."""

    memory: str = "2Gi"
    """Memory request and limit of a created InferenceService."""

    gpus: int = Field(default=0, ge=0)
    """GPUs of a created InferenceService."""


class RolloutSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_ROLLOUT_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_ROLLOUT_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8086
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="rollout", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    auth: AuthSettings | None = None
    """Bearer-token checks of the operator API; unset leaves the API open (local runs only).
    When set, reading needs any valid token and every action the ``operator`` role."""

    champion_alias: str = CHAMPION
    """Registry alias of the version serving 100 %; moved on promotion."""

    challenger_alias: str = CHALLENGER
    """Registry alias of the version in canary; removed when its canary ends."""

    default_policy: CanaryPolicy = Field(default_factory=CanaryPolicy)
    """Canary policy of every project without an override."""

    project_policies: dict[str, CanaryPolicy] = Field(default_factory=dict)
    """Per-project overrides by project id; fields an override leaves out keep the defaults
    (``FLYWHEEL_ROLLOUT_PROJECT_POLICIES__<project>__INTERVAL_S=30``, or JSON)."""

    backend: Literal["triton", "kserve"] = "triton"
    """How versions are served and traffic split: ``triton`` (this service loads versions
    into Triton, the BFF splits traffic by the weights in ``rollout.step``) or ``kserve``
    (each step sets ``canaryTrafficPercent`` on the model's InferenceService, which splits the
    traffic itself; ``rollout.step`` is still published)."""

    kserve: KServeSettings = Field(default_factory=KServeSettings)
    """The InferenceServices of the ``kserve`` backend."""

    repository_dir: Path = Path("rollout-model-repository")
    """Triton model repository this service writes (Triton must read the same folder)."""

    serving: ServingOptions = Field(default_factory=ServingOptions)
    """How Triton serves the versions (backend flavour, batching, instances); the Triton
    bundled with ``nvidia-pytriton`` needs ``FLYWHEEL_ROLLOUT_SERVING__FLAVOUR=python``."""

    triton_timeout_s: float = Field(default=120.0, gt=0)
    """Longest one Triton control call (a model load included) may take."""

    tick_s: float = Field(default=1.0, gt=0)
    """How often canaries are looked at (checks due, steps, clean-ups); actions wake it."""

    republish_s: float = Field(default=30.0, gt=0)
    """How often each line's current weights are published again, so a BFF that restarted
    catches up."""

    drain_s: float = Field(default=10.0, ge=0)
    """Wait after the final weight change before unloading the version that lost its traffic,
    so requests in flight finish."""

    recent_per_version: int = Field(default=10_000, ge=1)
    """Inputs remembered per version and canary (input hash → class) to measure agreement."""

    outage_error_codes: list[str] = Field(
        default_factory=lambda: [
            "dependency_unavailable",
            "inference_unavailable",
            "inference_timeout",
            "model_not_ready",
        ]
    )
    """``error_code`` values of ``inference.logged`` that mean the serving stack, not the
    model, failed (the BFF's codes for Triton away, timing out, or not serving a version).
    They excuse an interval only when most requests of both versions failed with them."""

    log_prefetch: int = Field(default=8, ge=1)
    """``inference.logged`` messages handled at once (the AMQP prefetch of its queue). Each takes
    a database connection; unbounded, a burst of logs takes them all and the canaries' checks
    wait for one."""

    log_claims_s: float = Field(default=3600.0, gt=0)
    """How long the ids of handled ``inference.logged`` events are kept against redelivery."""
