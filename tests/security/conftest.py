"""Every HTTP service of the platform, built by its own create_app with authentication on and
known secret values, running its lifespan on the real servers.

``Services.start`` builds the apps in one place, so the route matrix and the log scan see
exactly what a deployment would: a service whose settings cannot turn authentication on shows
up as such, it is not patched into shape here.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, SecretStr

from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_inference_bff.logworker.main import create_app as create_log_worker
from flywheel_inference_bff.logworker.settings import LogWorkerSettings
from flywheel_inference_bff.main import create_app as create_bff
from flywheel_inference_bff.settings import BffSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_rollout.main import create_app as create_rollout
from flywheel_rollout.settings import RolloutSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import close_within
from flywheel_trainer_dispatch.main import create_app as create_trainer_dispatch
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings
from flywheel_validator.main import create_app as create_validator
from flywheel_validator.settings import ValidatorSettings
from flywheel_workspaces.main import create_app as create_workspaces
from flywheel_workspaces.settings import WorkspacesSettings

SERVICES = (
    "labeling",
    "data-monitor",
    "trainer-dispatch",
    "validator",
    "inference-bff",
    "inference-bff-logworker",
    "rollout",
    "workspaces",
)


def with_password(url: str, password: str, *, address: str | None = None) -> str:
    """``url`` with its user's password replaced, and its ``host:port`` if ``address`` is
    given (the local PostgreSQL trusts local users, so any password connects, and a known one
    can be looked for in the logs)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    if address is None:
        address = (parts.hostname or "127.0.0.1") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{address}"))


def _auth(settings: type[BaseModel], auth: AuthSettings) -> dict[str, Any]:
    """``auth`` for a settings class that has the block; nothing for one that has not yet
    (the route matrix then shows that service's routes open)."""
    return {"auth": auth} if "auth" in settings.model_fields else {}


@dataclass
class Secrets:
    """Every secret value the services are given, so that logs can be searched for them."""

    signing_key: str = field(default_factory=lambda: generate_dev_key("EC"))
    db_password: str = field(default_factory=lambda: f"dbpw-{secrets.token_urlsafe(18)}")
    webhook_secret: str = field(default_factory=lambda: f"whsec-{secrets.token_urlsafe(18)}")
    label_studio_password: str = field(default_factory=lambda: f"lspw-{secrets.token_urlsafe(18)}")
    s3_secret_key: str = ""
    rabbit_password: str = ""

    def needles(self) -> dict[str, str]:
        """What must never be printed: each secret, and each line of the PEM key's body."""
        found = {
            "db_password": self.db_password,
            "webhook_secret": self.webhook_secret,
            "label_studio_password": self.label_studio_password,
            "s3_secret_key": self.s3_secret_key,
            # The broker's password is the well-known 'guest' here: look for it as a URL
            # leaks it, not for the bare word, which is also the user name.
            "rabbit_password_in_url": f":{self.rabbit_password}@",
            "signing_key_pem": self.signing_key.strip(),
        }
        body = [line for line in self.signing_key.splitlines() if not line.startswith("-----")]
        found |= {f"signing_key_line_{n}": line for n, line in enumerate(body) if len(line) >= 16}
        return {name: value for name, value in found.items() if value}


@dataclass
class Services:
    """The built apps of one test, their in-process clients, and the stack their lifespans
    run on."""

    platform: PlatformSettings
    topology: Topology
    secrets: Secrets
    bucket: str
    workdir: Path
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    apps: dict[str, FastAPI] = field(default_factory=dict)
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def schema(self, service: str) -> str:
        return f"{service.replace('-', '_')}_{self.suffix}"

    def token(
        self, subject: str, *roles: str, key: str | None = None, expires_in: int = 600
    ) -> str:
        return issue_dev_token(
            key or self.secrets.signing_key, subject=subject, roles=roles, expires_in=expires_in
        )

    def bearer(self, subject: str, *roles: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(subject, *roles)}"}

    def build(self, service: str) -> FastAPI:
        """``service``'s app from its own factory, authentication on wherever it can be."""
        auth = AuthSettings(dev_signing_key=SecretStr(self.secrets.signing_key))
        common: dict[str, Any] = {
            "platform": self.platform,
            "namespace": self.topology.namespace,
            "db_schema": self.schema(service),
        }
        match service:
            case "labeling":
                return create_labeling(
                    LabelingSettings(
                        **common,
                        auth=auth,
                        data_bucket=self.bucket,
                        webhook_secret=SecretStr(self.secrets.webhook_secret),
                    )
                )
            case "data-monitor":
                return create_data_monitor(
                    DataMonitorSettings(
                        **common, **_auth(DataMonitorSettings, auth), data_bucket=self.bucket
                    )
                )
            case "trainer-dispatch":
                return create_trainer_dispatch(
                    TrainerDispatchSettings(
                        **common, auth=auth, data_bucket=self.bucket, runs_dir=self.workdir / "runs"
                    )
                )
            case "validator":
                return create_validator(
                    ValidatorSettings(
                        **common, **_auth(ValidatorSettings, auth), data_bucket=self.bucket
                    )
                )
            case "inference-bff":
                return create_bff(
                    BffSettings(
                        **common,
                        auth=auth,
                        data_bucket=self.bucket,
                        results_bucket=self.bucket,
                        label_studio_password=SecretStr(self.secrets.label_studio_password),
                    )
                )
            case "inference-bff-logworker":
                return create_log_worker(
                    LogWorkerSettings(
                        platform=self.platform,
                        namespace=self.topology.namespace,
                        logs_bucket=self.bucket,
                    )
                )
            case "rollout":
                return create_rollout(
                    RolloutSettings(**common, auth=auth, repository_dir=self.workdir / "repository")
                )
            case "workspaces":
                return create_workspaces(
                    WorkspacesSettings(**common, auth=auth, local_root=self.workdir / "workspaces")
                )
        raise ValueError(f"unknown service {service!r}")

    async def start(self, *services: str, built: Callable[[], None] = lambda: None) -> None:
        """Build ``services``, call ``built`` (each create_app configures logging anew), then
        run their lifespans until the test ends."""
        apps = {service: self.build(service) for service in services}
        built()
        for service, app in apps.items():
            await self.stack.enter_async_context(app.router.lifespan_context(app))
            self.apps[service] = app
            self.clients[service] = await self.stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30
                )
            )


@pytest.fixture
def known_secrets(rabbit_url: str, s3_server: S3Server) -> Secrets:
    return Secrets(
        s3_secret_key=s3_server.secret_key, rabbit_password=urlsplit(rabbit_url).password or ""
    )


@pytest.fixture
async def services(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    topology: Topology,
    unique_bucket: str,
    known_secrets: Secrets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Services]:
    # No MLflow runs here: a route that looks a model up must fail at once, not back off for
    # minutes (auth has answered by then; these calls only show that it let the caller in).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(with_password(database_url, known_secrets.db_password)),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        delivery_limit=topology.delivery_limit,
        log_json=False,
    )
    built = Services(platform, topology, known_secrets, unique_bucket, tmp_path)
    yield built
    await close_within(built.stack, 60)
    queues = {q for app in built.apps.values() for q in app.state.runtime.topology.queue_names}
    await delete_names(rabbit_url, sorted(queues), [])
