"""The trainer dispatch's settings: one object, built once in ``create_app``."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET

SERVICE = "trainer-dispatch"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


class TrainerDispatchSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_TRAINER_DISPATCH_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_TRAINER_DISPATCH_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8083
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="trainer_dispatch", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    auth: AuthSettings | None = None
    """Bearer-token checks of the operator API; unset leaves the API open (local runs only).
    When set, reading needs any valid token and triggering or cancelling the ``operator``
    role."""

    backend: Literal["local"] = "local"
    """Where training runs: ``local`` (a subprocess or torchrun on this machine)."""

    instance_id: str = Field(default="", max_length=200)
    """This instance's name on the runs it starts; empty: the host name. After a restart an
    instance re-attaches the runs carrying its name, so it must stay the same across restarts
    (the host name does)."""

    runs_dir: Path = Path("trainer-dispatch-runs")
    """Directory of the local backend's per-run folders (log, result, excluded labels)."""

    data_bucket: str = DATA_BUCKET
    """Bucket holding the dataset snapshots that training reads."""

    registered_model_name: str = "{model_line}"
    """Registered model a run adds a version to; ``{model_line}`` and ``{project_id}`` are
    filled in. One registered model per model line."""

    max_concurrent_runs: int = Field(default=1, ge=1)
    """Runs in progress at once over all model lines and all instances; the rest wait."""

    nproc_per_node: int = Field(default=1, ge=1)
    """Training processes per run: above 1 the run is a torchrun DDP job."""

    threads_per_process: int | None = Field(default=None, ge=1)
    """Torch CPU threads of each training process; unset: the CPUs divided by the processes."""

    epochs: int = Field(default=3, ge=1)
    """Epochs of each training run."""

    batch_size: int = Field(default=128, ge=1)
    """Batch size per training process."""

    lr: float = Field(default=1e-3, gt=0)
    """Learning rate."""

    seed: int = 0
    """Seed of each run, so a retrain on the same snapshot repeats itself."""

    base_alias: str | None = "champion"
    """Registry alias of the version a run fine-tunes; unset trains every run from scratch."""

    timeout_s: float = Field(default=3600.0, gt=0)
    """Longest a run may take from its start; then its processes are killed and it fails."""

    kill_grace_s: float = Field(default=5.0, ge=0)
    """Time between SIGTERM and SIGKILL when a run is cancelled or timed out."""

    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often runs in progress are checked and queued ones considered."""

    lost_after_s: float = Field(default=300.0, gt=0)
    """A run whose instance has not reported on it for this long is marked failed (lost)."""

    log_tail_lines: int = Field(default=40, ge=1, le=1000)
    """Last lines of a run's log kept in its record (and in the API's run view)."""

    @field_validator("registered_model_name")
    @classmethod
    def _known_fields_only(cls, template: str) -> str:
        try:
            name = template.format(model_line="line", project_id="project")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                "registered_model_name may only use {model_line} and {project_id}"
            ) from error
        if not name:
            raise ValueError("registered_model_name must not be empty")
        return template

    def owner(self) -> str:
        """The name this instance puts on the runs it starts."""
        return self.instance_id or socket.gethostname()

    def registered_model(self, project_id: str, model_line: str) -> str:
        """The registered model of a model line."""
        return self.registered_model_name.format(model_line=model_line, project_id=project_id)
