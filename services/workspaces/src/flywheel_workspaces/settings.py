"""The workspaces service's settings: one object, built once in ``create_app``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_workspaces.adapters.k8s_manifests import KubernetesOptions
from flywheel_workspaces.policy import Lifetime, Quota

SERVICE = "workspaces"
"""Service name: telemetry resource, log field, RabbitMQ user."""

_POOL = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}(/(mig-[1-7]g\.[0-9]+gb|time-sliced|mps))?$")


class WorkspacesSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_WORKSPACES_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_WORKSPACES_",
        env_nested_delimiter="__",
        # One nested variable changes one field of a block and keeps the others' defaults.
        nested_model_default_partial_update=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8088
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="workspaces", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    auth: AuthSettings | None = None
    """Bearer-token checks of the API; unset leaves it open (local runs only: every caller is
    ``anonymous`` and may do everything). When set, environments need the ``engineer`` role and
    the operator routes (all environments, usage report) the ``operator`` role."""

    backend: Literal["local", "kubernetes"] = "local"
    """Where environments run: ``local`` (a process with its own directory and venv on this
    machine, for laptops and tests) or ``kubernetes`` (a Pod with a home-directory PVC)."""

    kubernetes: KubernetesOptions = KubernetesOptions()
    """The ``kubernetes`` backend."""

    local_root: Path = Path("workspaces")
    """Directory of the local backend's environments, one folder per environment."""

    local_ide: Literal["auto", "code-server", "jupyter", "http-server"] = "auto"
    """IDE of local environments: ``auto`` takes the one asked for when installed, else
    code-server, else JupyterLab, else a file server of the home directory as a stand-in."""

    local_venv_pip: bool = False
    """Install pip into each local environment's venv (seconds per environment); without it
    ``python -m pip`` in the venv uses the system's pip and installs into the venv."""

    gpus: dict[str, int] = Field(default_factory=lambda: {"a100": 4})
    """Capacity of each GPU pool: ``<kind>`` for whole GPUs, ``<kind>/mig-<profile>`` for MIG
    slices, ``<kind>/time-sliced`` and ``<kind>/mps`` for shares (``{"a100": 8,
    "a100/mig-1g.10gb": 14, "t4/time-sliced": 16}``). Keep it equal to what the cluster has."""

    quota: Quota = Quota()
    """What each engineer may hold at once."""

    quota_overrides: dict[str, Quota] = Field(default_factory=dict)
    """Quotas of particular engineers, by token subject, instead of ``quota``."""

    lifetime: Lifetime = Lifetime()
    """TTLs, extensions and idle shutdown."""

    provision_timeout_s: float = Field(default=900.0, gt=0)
    """An environment not ready this long after it was admitted fails (its GPUs are freed)."""

    poll_interval_s: float = Field(default=2.0, gt=0)
    """How often queued environments are considered and the others checked on."""

    @field_validator("gpus")
    @classmethod
    def _pool_names(cls, gpus: dict[str, int]) -> dict[str, int]:
        for pool, count in gpus.items():
            if not _POOL.match(pool):
                raise ValueError(
                    f"GPU pool {pool!r} is not <kind>, <kind>/mig-<profile>, "
                    "<kind>/time-sliced or <kind>/mps"
                )
            if count < 0:
                raise ValueError(f"GPU pool {pool!r} has a negative capacity")
        return gpus

    def quota_of(self, owner: str) -> Quota:
        """The quota of one engineer (token subject)."""
        return self.quota_overrides.get(owner, self.quota)
