"""The log worker's settings: one object, built once in ``create_app``."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import LOGS_BUCKET

SERVICE = "log-worker"
"""Process name: queue prefix (``log-worker.inference.logged``), telemetry resource."""


class LogWorkerSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_LOGWORKER_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_LOGWORKER_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8087
    """Port of the worker's HTTP server (health, metrics); unique per process locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    logs_bucket: str = Field(default=LOGS_BUCKET, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    """Bucket the Parquet batches are written to; the first write creates it when missing."""

    batch_size: int = Field(default=1000, ge=1)
    """Messages that make a batch full: it is written at once."""

    max_wait_s: float = Field(default=10.0, gt=0)
    """Longest a message waits in an unfilled batch, counted from the batch's first message."""

    prefetch: int | None = Field(default=None, ge=1)
    """Unacknowledged messages the broker hands over at once; at least ``batch_size``, else a
    batch could never fill. Unset means twice ``batch_size``, so the next batch fills while
    one is being written."""

    retry_initial_s: float = Field(default=0.5, gt=0)
    """First pause before writing a failed batch again; it doubles after every failure."""

    retry_max_s: float = Field(default=30.0, gt=0)
    """Longest pause between two attempts: S3 coming back is noticed within this time."""

    stop_timeout_s: float = Field(default=10.0, gt=0)
    """How long a stop waits for the pending batch to be written. Past it the batch is left
    unacknowledged and the broker delivers it again to the next worker."""

    @model_validator(mode="after")
    def _prefetch_holds_a_batch(self) -> Self:
        if self.prefetch is not None and self.prefetch < self.batch_size:
            raise ValueError(f"prefetch {self.prefetch} is below batch_size {self.batch_size}")
        return self

    @property
    def prefetch_count(self) -> int:
        """The prefetch in effect."""
        return self.prefetch if self.prefetch is not None else 2 * self.batch_size
