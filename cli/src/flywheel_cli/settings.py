"""The CLI's settings: where the local stack lives, which ports it uses, how to authenticate.

Every field reads ``FLYWHEEL_CLI_<FIELD>`` (nested fields with ``__``, e.g.
``FLYWHEEL_CLI_PORTS__LABELING=9081``); the connection settings shared with the services come
from ``FLYWHEEL_*`` through the nested ``platform`` block, exactly as the services read them.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from flywheel_runtime.settings import PlatformSettings
from flywheel_serving.tuning import Constraints

DEV_KEY_FILE = "dev-signing-key.pem"
"""File under the base directory holding the local stack's token signing key."""


class Ports(BaseModel):
    """Ports of what ``flywheel up`` starts; services keep the ports they default to."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    labeling: int = 8081
    data_monitor: int = 8082
    trainer_dispatch: int = 8083
    validator: int = 8084
    inference_bff: int = 8085
    rollout: int = 8086
    logworker: int = 8087
    workspaces: int = 8088
    s3: int = 8333
    """SeaweedFS's S3 API; its internal ports are picked free at each start."""
    mlflow: int = 5000
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002


class DemoSettings(BaseModel):
    """Sizes and limits of ``flywheel demo``: small, so it runs in minutes on two CPU cores."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    project_id: str = Field(default="digits", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    model_line: str = Field(default="digits-classifier", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    bootstrap_labels: int = Field(default=2000, ge=100)
    """MNIST labels posted to train the first champion (10 % of them become its test split)."""
    retrain_labels: int = Field(default=300, ge=10)
    """Labels (confirmed or corrected pre-fills) that fire the demo's retrain."""
    poisoned_labels: int = Field(default=600, ge=10)
    """Size of the shuffled batch of the ``poisoned`` scenario (at least ``retrain_labels``)."""
    canary_feedback_labels: int = Field(default=200, ge=0)
    """Most labels posted while the canary runs, to rate each version by its corrections."""
    canary_pool: int = Field(default=20, ge=1)
    """Images predicted over and over during the canary, so both versions answer the same
    inputs (their agreement is a canary check)."""
    labelers: int = Field(default=4, ge=1)
    """Simulated labelers working at once."""
    label_rate: float = Field(default=10.0, gt=0)
    """Labels per second all labelers post together while the retrain threshold fills up."""
    canary_request_rate: float = Field(default=8.0, gt=0)
    """Predictions per second on the canary pool while the new version is in canary."""
    canary_label_rate: float = Field(default=2.0, gt=0)
    """Labeled pre-fills per second while the new version is in canary (rollout compares
    each version's corrections)."""
    test_images: int = Field(default=2000, ge=100)
    """First images of MNIST's test part: the frozen test set every version is scored on."""
    bootstrap_timeout_s: float = Field(default=900.0, gt=0)
    """Longest wait for the first champion (training, validation, promotion)."""
    loop_timeout_s: float = Field(default=900.0, gt=0)
    """Longest wait from the demo's retrain firing to the loop's verdict."""


class CliSettings(BaseSettings):
    """Everything the ``flywheel`` command needs; built once per invocation."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_CLI_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    platform: PlatformSettings = Field(default_factory=PlatformSettings)
    """RabbitMQ and PostgreSQL of the stack (``FLYWHEEL_RABBIT_URL``, ``FLYWHEEL_DATABASE_URL``)
    and the S3 keys SeaweedFS is started with."""

    base_dir: Path = Path(".flywheel")
    """Folder of the local stack: state file, logs, S3 data, Triton repository, signing key."""

    ports: Ports = Field(default_factory=Ports)
    """Ports of the servers and services ``flywheel up`` starts."""

    namespace: str = ""
    """Prefix of every exchange and queue the stack's services use; empty for a plain stack."""

    mlflow_database: str = "flywheel_mlflow"
    """PostgreSQL database of MLflow's tracking and registry store (created by ``up``)."""

    rabbit_management_url: str | None = None
    """RabbitMQ management API; unset: port 15672 on the broker's host. Queue depths fall back
    to passive declares over AMQP when it does not answer."""

    start_timeout_s: float = Field(default=240.0, gt=0)
    """How long ``up`` waits for one component to answer its readiness check."""

    stop_timeout_s: float = Field(default=20.0, gt=0)
    """How long ``down`` waits after SIGTERM before it sends SIGKILL."""

    http_timeout_s: float = Field(default=30.0, gt=0)
    """Timeout of one request to a service's API."""

    train_poll_s: float = Field(default=1.0, gt=0)
    """How often ``flywheel train submit`` asks trainer-dispatch how its run is doing."""

    dev_signing_key: SecretStr | None = None
    """PEM key tokens are signed with; unset: the key ``up`` wrote under the base directory."""

    demo: DemoSettings = Field(default_factory=DemoSettings)
    """What ``flywheel demo`` posts and how long it waits."""

    default_serving_constraints: Constraints = Field(default_factory=Constraints)
    """Serving limits ``flywheel tune`` selects under for projects without their own."""

    serving_constraints: dict[str, Constraints] = Field(default_factory=dict)
    """Per-project serving limits by project id (the version's ``project_id`` tag); limits a
    project leaves out keep the defaults, and ``tune``'s flags prevail over both
    (``FLYWHEEL_CLI_SERVING_CONSTRAINTS__<project>__MAX_P99_MS=50``, or JSON)."""

    token: SecretStr | None = None
    """A bearer token from a real identity provider; when set it is sent instead of a dev
    token (it needs the ``operator`` role for rollout actions)."""

    @property
    def dev_key_path(self) -> Path:
        return self.base_dir / DEV_KEY_FILE

    @property
    def state_path(self) -> Path:
        return self.base_dir / "state.json"

    @property
    def logs_dir(self) -> Path:
        return self.base_dir / "logs"

    def management_url(self) -> str:
        """The RabbitMQ management API base URL, derived from the AMQP URL when unset."""
        if self.rabbit_management_url:
            return self.rabbit_management_url.rstrip("/")
        host = urlsplit(self.platform.rabbit_url.get_secret_value()).hostname or "127.0.0.1"
        return f"http://{host}:15672"
