"""The inference BFF's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from flywheel_clients.registry import CHAMPION
from flywheel_contracts.events import SLUG
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET

SERVICE = "inference-bff"
"""Service name: queue prefix, telemetry resource, AMQP app id."""

MIB = 1024 * 1024


class BffSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_BFF_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_BFF_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8085
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    auth: AuthSettings = Field(default_factory=AuthSettings)
    """How bearer tokens are checked (JWKS of the identity provider, or a dev signing key for
    local runs)."""

    predict_role: str = "predict"
    """Role a bearer token needs for every prediction route."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    replica_id: str = Field(default="", pattern=r"^[A-Za-z0-9_.{}-]{0,64}$")
    """Suffix of this replica's routing queues; empty picks a random one at start-up."""

    db_schema: str = Field(default="inference_bff", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service (batch jobs, last routing weights)."""

    data_bucket: str = DATA_BUCKET
    """Bucket holding images (``s3_key`` inputs, snapshots) that labeling writes."""

    results_bucket: str = DATA_BUCKET
    """Bucket the batch jobs write their pseudo labels to."""

    results_prefix: str = "pseudo-labels/"
    """Key prefix of batch job results: ``<prefix><job id>/part-NNNNNN.jsonl``."""

    default_model_line: str = Field(default="digits-classifier", pattern=SLUG)
    """Model line of a request that names none."""

    registered_models: dict[str, str] = Field(default_factory=dict)
    """Registered model (and Triton model) of a model line when its name differs; a line not
    listed is served by the registered model of the same name."""

    project_ids: dict[str, Annotated[str, Field(pattern=SLUG)]] = Field(default_factory=dict)
    """Project of a model line, for inference logs; project.configured events add to it. A line
    known from neither is logged under its own name."""

    champion_alias: str = CHAMPION
    """Registry alias of the version that serves a line without routing weights."""

    champion_cache_s: float = Field(default=10.0, ge=0)
    """How long a champion read from the registry is trusted; a stale one is used while the
    registry is unreachable."""

    triton_protocol: Literal["http", "grpc"] = "http"
    """How the BFF talks to Triton: v2 HTTP (``FLYWHEEL_TRITON_URL``) or gRPC."""

    triton_grpc_url: str = "127.0.0.1:8001"
    """Triton's gRPC endpoint as ``host:port``, used when ``triton_protocol`` is ``grpc``."""

    inference_timeout_s: float = Field(default=5.0, gt=0)
    """Longest one Triton call may take before the request fails with ``inference_timeout``."""

    inference_chunk: int = Field(default=64, ge=1)
    """Most images sent to Triton in one call."""

    drift_features: bool = True
    """Log, with each answered request, the image's statistics and (for versions that declare
    one) the model's embedding: what data-monitor's drift checks compare."""

    keep_inputs: bool = True
    """Keep each answered online image in the data bucket (``images/``, content-addressed, as
    labeling keeps its own), so drift can ask labelers to label the images that drifted."""

    max_image_bytes: int = Field(default=10 * MIB, ge=1)
    """Largest image accepted, in bytes; larger ones get 413."""

    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest image accepted, in pixels, read from the header before decoding; larger ones
    get 413."""

    max_request_bytes: int = Field(default=64 * MIB, ge=1)
    """Largest request body read at all; larger ones get 413."""

    default_top_k: int = Field(default=3, ge=1)
    """Classes returned per image when a request names no ``top_k``."""

    max_batch_images: int = Field(default=256, ge=1)
    """Most images one inline ``/predict/batch`` request may carry."""

    job_chunk: int = Field(default=64, ge=1)
    """Images a batch job infers (and writes as one results part) at a time."""

    job_concurrency: int = Field(default=4, ge=1)
    """Chunks of one batch job in flight at once."""

    job_lease_s: float = Field(default=60.0, gt=0)
    """A running job whose replica has not reported progress for this long is taken over."""

    job_sweep_s: float = Field(default=10.0, gt=0)
    """How often a replica looks for queued or abandoned batch jobs."""

    job_retries: int = Field(default=5, ge=0)
    """Retries of a chunk while Triton, S3 or the registry is unavailable before the job fails."""

    job_slots: int = Field(default=1, ge=1)
    """Batch jobs one replica runs at once."""

    job_max_attempts: int = Field(default=3, ge=1)
    """Times a job may be taken up (its replica died or stalled) before it is failed."""

    log_enabled: bool = True
    """Publish inference.logged for every prediction; off only to measure what logging costs."""

    log_buffer: int = Field(default=10_000, ge=1)
    """Inference logs waiting for the broker; when full, new ones are dropped and counted."""

    log_publishers: int = Field(default=4, ge=1)
    """Background tasks publishing inference logs side by side."""

    log_publish_timeout_s: float = Field(default=2.0, gt=0)
    """Longest one inference log publish may take before it is dropped and counted."""

    redis_url: SecretStr | None = None
    """Redis URL of the prediction cache (``redis://127.0.0.1:6379/0``); unset disables it."""

    cache_ttl_s: int = Field(default=3600, ge=1)
    """How long a cached prediction lives."""

    cache_timeout_s: float = Field(default=0.05, gt=0)
    """Longest a cache read or write may take; a slower cache is skipped, never waited for."""

    label_studio_username: str = "label-studio"
    """User name Label Studio sends with HTTP basic auth to the ML backend routes."""

    label_studio_password: SecretStr = SecretStr("")
    """Basic-auth password of the Label Studio ML backend routes; empty accepts only bearer
    tokens with the predict role there."""

    label_studio_image_field: str = "image"
    """Key of the image in a Label Studio task's ``data`` when no label config names it."""
