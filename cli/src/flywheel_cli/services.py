"""HTTP calls the CLI makes to the stack's services, and the views it reads their answers into.

The CLI never imports a service's code: services are deployed on their own, and their APIs are
the contract. Each view keeps only the fields the CLI shows and ignores the rest, so a service
adding fields never breaks the CLI.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from flywheel_cli.settings import CliSettings
from flywheel_cli.tokens import ADMIN, LABELER, OPERATOR, PREDICT, bearer

Action = Literal["promote", "rollback", "pause", "resume", "freeze", "unfreeze"]
ACTIONS: tuple[Action, ...] = ("promote", "rollback", "pause", "resume", "freeze", "unfreeze")


class View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class RunView(View):
    """A training run as trainer-dispatch lists it."""

    run_id: uuid.UUID
    state: str
    project_id: str
    model_line: str
    reason: str = ""
    model_version: str | None = None
    base_model_version: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_reason: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    registered_model: str | None = None
    mlflow_run_id: str | None = None
    entry_point: str | None = None
    queue_position: int | None = None
    log_tail: str = ""
    """Only in a single run's view (``GET /v1/runs/{id}``)."""


class CanaryView(View):
    """One validated version's canary as rollout reports it."""

    rollout_id: uuid.UUID
    model_line: str
    state: str
    candidate_version: str
    champion_version: str | None = None
    traffic_percent: int = 0
    step: int = 0
    checks: int = 0
    failed_checks: int = 0
    direct: bool = False
    """Promoted without a canary: there was no champion to compare with."""
    reasons: list[str] = Field(default_factory=list)
    created_at: datetime | None = None
    finished_at: datetime | None = None


class TimelineEntry(View):
    """One entry of a line's audit timeline."""

    at: datetime
    kind: str
    """The event type, ``check``, or ``operator.<action>``."""
    actor: str
    summary: str
    correlation_id: uuid.UUID | None = None


class ServiceError(RuntimeError):
    """A service answered with an error; carries its code and message."""

    def __init__(self, service: str, status: int, code: str, message: str) -> None:
        super().__init__(f"{service} answered {status} {code}: {message}")
        self.service = service
        self.status = status
        self.code = code


def raise_for(service: str, response: httpx.Response) -> None:
    """Turn a service's ``{"error": {...}}`` answer into a ``ServiceError``."""
    if response.is_success:
        return
    code, message = "http_error", response.text[:300]
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    if isinstance(error, Mapping):
        code = str(error.get("code", code))
        message = str(error.get("message", message))
    raise ServiceError(service, response.status_code, code, message)


class Services:
    """The stack's service APIs, with the tokens each call needs."""

    def __init__(
        self, settings: CliSettings, urls: Mapping[str, str], client: httpx.AsyncClient
    ) -> None:
        self.settings = settings
        self.urls = dict(urls)
        self.client = client

    def _url(self, service: str, path: str) -> str:
        return f"{self.urls[service].rstrip('/')}{path}"

    async def _get(
        self, service: str, path: str, *, roles: tuple[str, ...] = (), **params: Any
    ) -> Any:
        response = await self.client.get(
            self._url(service, path),
            params={k: v for k, v in params.items() if v is not None},
            headers=bearer(self.settings, roles),
        )
        raise_for(service, response)
        return response.json()

    # --- trainer-dispatch -------------------------------------------------------------------

    async def runs(self, limit: int = 10, model_line: str | None = None) -> list[RunView]:
        body = await self._get(
            "trainer-dispatch", "/v1/runs", roles=(OPERATOR,), limit=limit, model_line=model_line
        )
        return [RunView.model_validate(run) for run in body["runs"]]

    async def submit_run(
        self, body: Mapping[str, Any], idempotency_key: uuid.UUID | None = None
    ) -> RunView:
        """Queue a run as an operator; the same idempotency key returns the same run."""
        headers = bearer(self.settings, (OPERATOR,))
        if idempotency_key is not None:
            headers["Idempotency-Key"] = str(idempotency_key)
        response = await self.client.post(
            self._url("trainer-dispatch", "/v1/runs"), json=dict(body), headers=headers
        )
        raise_for("trainer-dispatch", response)
        return RunView.model_validate(response.json())

    async def training_run(self, run_id: str) -> RunView:
        body = await self._get("trainer-dispatch", f"/v1/runs/{run_id}", roles=(OPERATOR,))
        return RunView.model_validate(body)

    # --- rollout ----------------------------------------------------------------------------

    async def canaries(self, limit: int = 10) -> list[CanaryView]:
        """The newest canaries of every line."""
        body = await self._get("rollout", "/api/v1/canaries", roles=(OPERATOR,), limit=limit)
        return [CanaryView.model_validate(item) for item in body["canaries"]]

    async def act(self, model_line: str, action: Action, reason: str | None) -> dict[str, Any]:
        """Ask rollout to ``action`` the line's canary as an operator."""
        response = await self.client.post(
            self._url("rollout", f"/api/v1/lines/{model_line}/{action}"),
            json={"reason": reason} if reason else {},
            headers=bearer(self.settings, (OPERATOR,)),
        )
        raise_for("rollout", response)
        body: dict[str, Any] = response.json()
        return body

    async def timeline(self, model_line: str, limit: int = 200) -> list[TimelineEntry]:
        """The line's audit timeline, oldest first."""
        body = await self._get(
            "rollout", f"/api/v1/lines/{model_line}/timeline", roles=(OPERATOR,), limit=limit
        )
        return [TimelineEntry.model_validate(item) for item in body["entries"]]

    # --- labeling ---------------------------------------------------------------------------

    async def create_project(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Create a project (201), or return the existing one of the same id."""
        response = await self.client.post(
            self._url("labeling", "/v1/projects"),
            json=dict(spec),
            headers=bearer(self.settings, (ADMIN,)),
        )
        if response.status_code == 409:
            existing: dict[str, Any] = await self._get(
                "labeling", f"/v1/projects/{spec['project_id']}", roles=(ADMIN,)
            )
            return existing
        raise_for("labeling", response)
        body: dict[str, Any] = response.json()
        return body

    async def update_project(self, project_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        response = await self.client.put(
            self._url("labeling", f"/v1/projects/{project_id}"),
            json=dict(changes),
            headers=bearer(self.settings, (ADMIN,)),
        )
        raise_for("labeling", response)
        body: dict[str, Any] = response.json()
        return body

    async def external_ids(self, project_id: str) -> list[str | None]:
        """The labeling tool's id of every live label of a project, page by page."""
        ids: list[str | None] = []
        cursor: str | None = None
        while True:
            page = await self._get(
                "labeling",
                f"/v1/projects/{project_id}/labels",
                roles=(ADMIN,),
                limit=500,
                cursor=cursor,
            )
            ids += [item.get("external_id") for item in page["items"]]
            cursor = page.get("next_cursor")
            if not cursor:
                return ids

    async def post_batch(
        self, project_id: str, items: list[dict[str, Any]], *, labeler: str
    ) -> dict[str, Any]:
        response = await self.client.post(
            self._url("labeling", f"/v1/projects/{project_id}/labels:batch"),
            json={"items": items},
            headers=bearer(self.settings, (LABELER,), subject=labeler),
        )
        raise_for("labeling", response)
        body: dict[str, Any] = response.json()
        return body

    async def post_label(
        self,
        project_id: str,
        png: bytes,
        fields: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> dict[str, Any]:
        response = await self.client.post(
            self._url("labeling", f"/v1/projects/{project_id}/labels"),
            files={"image": ("digit.png", png, "image/png")},
            data=dict(fields),
            headers=dict(headers),
        )
        raise_for("labeling", response)
        body: dict[str, Any] = response.json()
        return body

    # --- inference-bff ----------------------------------------------------------------------

    async def predict(
        self, png: bytes, headers: Mapping[str, str], model_line: str | None = None
    ) -> dict[str, Any]:
        response = await self.client.post(
            self._url("inference-bff", "/predict"),
            files={"image": ("digit.png", png, "image/png")},
            data={"model_line": model_line} if model_line else {},
            headers=dict(headers),
        )
        raise_for("inference-bff", response)
        body: dict[str, Any] = response.json()
        return body


def predict_headers(settings: CliSettings, labeler: str) -> dict[str, str]:
    """One token a simulated labeling tool uses for pre-fills and labels alike."""
    return bearer(settings, (LABELER, PREDICT), subject=labeler)
