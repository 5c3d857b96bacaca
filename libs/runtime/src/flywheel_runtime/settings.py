"""Settings shared by every service.

``PlatformSettings`` reads the connection settings every service needs from ``FLYWHEEL_*``.
A service defines its own ``ServiceSettings`` subclass with its own ``env_prefix``
(``FLYWHEEL_LABELING_`` …) for what only it uses; the platform block is nested inside, so one
object carries everything and is built once, in the service's ``create_app``.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlatformSettings(BaseSettings):
    """Where the shared servers are. Every field reads ``FLYWHEEL_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", extra="ignore", use_attribute_docstrings=True
    )

    rabbit_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    """AMQP URL of RabbitMQ, credentials included."""

    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5432/flywheel")
    """SQLAlchemy URL of PostgreSQL (asyncpg driver). Each service uses its own schema in it."""

    s3_endpoint: str = "127.0.0.1:8333"
    """S3 endpoint as ``host:port`` (MinIO, SeaweedFS or any S3)."""

    s3_access_key: SecretStr = SecretStr("flywheel")
    """S3 access key id."""

    s3_secret_key: SecretStr = SecretStr("flywheel-secret")
    """S3 secret access key."""

    s3_secure: bool = False
    """Use TLS towards S3."""

    s3_region: str = "us-east-1"
    """Region sent with S3 requests; most self-hosted servers ignore it."""

    mlflow_uri: str = "http://127.0.0.1:5000"
    """MLflow tracking and registry server."""

    triton_url: str = "127.0.0.1:8000"
    """Triton (or any KServe v2) HTTP endpoint as ``host:port``."""

    otel_endpoint: str | None = None
    """OTLP/HTTP collector base URL (``http://collector:4318``); unset disables export."""

    log_level: str = "INFO"
    """Root log level."""

    log_json: bool = True
    """JSON log lines (production) or coloured console lines (local)."""

    delivery_limit: int = Field(default=5, ge=1)
    """Deliveries of one message before its queue dead-letters it."""

    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest event body a consumer reads; a larger one goes to the dead-letter queue unread
    (events carry ids and summaries, never images)."""

    retry_delay_s: float = Field(default=0.2, ge=0)
    """Wait before requeueing a message whose handling failed for a retryable reason; doubled
    on each later delivery, so an outage of a few seconds does not use up the delivery limit."""

    retry_delay_max_s: float = Field(default=5.0, ge=0)
    """Longest wait before such a requeue."""

    environment: str = "local"
    """Deployment environment, recorded on traces and logs."""


class ServiceSettings(BaseSettings):
    """Base of a service's settings; subclasses set ``env_prefix`` and add their own fields."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_SERVICE_", extra="ignore", use_attribute_docstrings=True
    )

    platform: PlatformSettings = Field(default_factory=PlatformSettings)
    """Connection settings shared by all services."""

    http_host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""

    http_port: int = 8080
    """Port of the service's HTTP server (API, health, metrics)."""

    http_workers: int = Field(default=1, ge=1)
    """Server processes sharing the port; each builds its own app from the environment."""


def env_reference(settings: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """``(variable, default, description)`` for every field a settings class reads from env.

    Nested models are flattened with ``__``, the nested delimiter every service uses; the nested
    platform block is left out (it reads ``FLYWHEEL_*`` itself, see ``PlatformSettings``).
    """
    prefix = str(settings.model_config.get("env_prefix", ""))
    return _fields(settings, prefix)


def _fields(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        if field.annotation is PlatformSettings:
            continue
        variable = f"{prefix}{name.upper()}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _fields(annotation, f"{variable}__")
            continue
        rows.append((variable, _default(field), " ".join((field.description or "").split())))
    return rows


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        # pydantic-settings reads complex values as JSON; a tuple's repr would not parse back.
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        return json.dumps(value if isinstance(value, dict) else list(value))
    return str(value)
