"""The labeling service's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET

SERVICE = "labeling"
"""Service name: queue prefix, telemetry resource, AMQP app id."""

MIB = 1024 * 1024


class LabelingSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_LABELING_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_LABELING_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8081
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    auth: AuthSettings = Field(default_factory=AuthSettings)
    """How bearer tokens of the native API are checked (JWKS of the identity provider, or a
    dev signing key for local runs)."""

    webhook_secret: SecretStr = SecretStr("")
    """Shared secret Label Studio sends in ``X-Flywheel-Webhook-Secret``; empty disables the
    Label Studio webhook."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="labeling", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    data_bucket: str = DATA_BUCKET
    """Bucket holding images (by sha256) and dataset snapshot segments."""

    max_image_bytes: int = Field(default=10 * MIB, ge=1)
    """Largest image accepted, in bytes (uploads, base64, fetched URLs); larger ones get 413."""

    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest image accepted, in pixels, read from the header before decoding (decompression
    bombs); larger ones get 413."""

    max_batch_items: int = Field(default=500, ge=1)
    """Most items one ``labels:batch`` request may carry."""

    max_request_bytes: int = Field(default=64 * MIB, ge=1)
    """Largest request body read at all (a batch of base64 images); larger ones get 413."""

    image_fetch_allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts Label Studio task images may be fetched from over http(s). An exact name (or IP)
    is trusted whatever it resolves to; a ``*.example.com`` pattern admits subdomains only
    while they resolve to public addresses."""

    image_fetch_timeout_s: float = Field(default=10.0, gt=0)
    """Connect and read timeout of one image fetch, in seconds."""

    label_studio_image_field: str = "image"
    """Key of the image URL in a Label Studio task's ``data`` (the ``$image`` of the config)."""

    group_max_items: int = Field(default=1000, ge=1)
    """Most label changes committed together as one snapshot (group commit)."""

    group_linger_s: float = Field(default=0.002, ge=0)
    """How long a group waits for more requests of the same project before it commits."""

    prepare_concurrency: int = Field(default=16, ge=1)
    """Items of one batch request validated and uploaded at the same time."""

    project_cache_s: float = Field(default=30.0, ge=0)
    """How long a project's configuration read for validation is reused; class names only
    grow, and an unknown class is re-checked against the database before it is refused."""
