"""Settings shared by every service.

``PlatformSettings`` reads the connection settings every service needs from ``FLYWHEEL_*``.
A service defines its own ``ServiceSettings`` subclass with its own ``env_prefix``
(``FLYWHEEL_LABELING_`` …) for what only it uses; the platform block is nested inside, so one
object carries everything and is built once, in the service's ``create_app``.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlatformSettings(BaseSettings):
    """Where the shared servers are. Every field reads ``FLYWHEEL_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

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

    environment: str = "local"
    """Deployment environment, recorded on traces and logs."""


class ServiceSettings(BaseSettings):
    """Base of a service's settings; subclasses set ``env_prefix`` and add their own fields."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_SERVICE_", extra="ignore")

    platform: PlatformSettings = Field(default_factory=PlatformSettings)
    """Connection settings shared by all services."""

    http_host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""

    http_port: int = 8080
    """Port of the service's HTTP server (API, health, metrics)."""

    http_workers: int = Field(default=1, ge=1)
    """Server processes sharing the port; each builds its own app from the environment."""
