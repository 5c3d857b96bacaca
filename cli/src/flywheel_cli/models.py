"""A model line's MLflow runs and registered versions, and registering an experiment run.

MLflow's REST API is called directly with the CLI's short timeouts (as ``registry.py`` does).
``register_run`` makes a version from a run that logged a model without registering it (an
experiment: ``python -m flywheel_vision.train --no-register``, or a notebook that logged the
same files) and announces it with ``model.trained``, built as trainer-dispatch builds it and
published to the same exchange, so the validator judges it and rollout canaries it like a
retrained version. The version and the event are derived from the run, so registering the
same run twice makes no second version and the validator sees the same event again (and
ignores it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import httpx
from pydantic import BaseModel, ConfigDict, Field

from flywheel_contracts import ModelTrainedPayload, ModelTrainedV1
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.topology import Topology

ARTIFACT_PATH: Final = "model"
REQUIRED_FILES: Final = ("model.onnx", "labels.json")
NO_BASE: Final = "none"
BACKEND: Final = "registered"
"""``backend`` of the model.trained of a registered run: it trained outside trainer-dispatch."""

_NAMESPACE = uuid.UUID("0f1b5c3e-2b7e-4f0a-9a55-3c7d1e8b6a21")


class RegistrationError(RuntimeError):
    """The run cannot become a version (no model files, no snapshot, unknown run)."""


class RunRow(BaseModel):
    """One MLflow run of a model line, as ``flywheel runs`` shows it."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    name: str | None = None
    status: str
    started_at: datetime | None = None
    entry_point: str | None = None
    training_run_id: str | None = None
    snapshot_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    versions: list[str] = Field(default_factory=list)
    """Versions registered from the run (none for an experiment)."""


class VersionRow(BaseModel):
    """One registered version of a model line, as ``flywheel models list`` shows it."""

    model_config = ConfigDict(frozen=True)

    version: str
    aliases: list[str] = Field(default_factory=list)
    run_id: str | None = None
    created_at: datetime | None = None
    entry_point: str | None = None
    verdict: str | None = None
    accuracy: float | None = None


class Registration(BaseModel):
    """What ``register_run`` did."""

    model_config = ConfigDict(frozen=True)

    registered_model: str
    version: str
    created: bool
    """False when the run had been registered before (the same version is announced again)."""
    event_id: uuid.UUID
    training_run_id: uuid.UUID
    model_line: str
    project_id: str
    snapshot_id: str


class MlflowModels:
    """Runs and versions of model lines on one tracking server."""

    def __init__(self, client: httpx.AsyncClient, tracking_uri: str) -> None:
        self._client = client
        self._api = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow"

    async def _get(self, endpoint: str, **params: Any) -> dict[str, Any]:
        response = await self._client.get(f"{self._api}/{endpoint}", params=params)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def _post(self, endpoint: str, body: Mapping[str, Any]) -> httpx.Response:
        return await self._client.post(f"{self._api}/{endpoint}", json=dict(body))

    # --- reading ----------------------------------------------------------------------------

    async def runs(self, model_line: str, limit: int = 20) -> list[RunRow]:
        """The newest runs of the line's experiment (named after its registered model)."""
        response = await self._client.get(
            f"{self._api}/experiments/get-by-name", params={"experiment_name": model_line}
        )
        if response.status_code == 404:
            return []
        response.raise_for_status()
        experiment_id = response.json()["experiment"]["experiment_id"]
        found = await self._post(
            "runs/search",
            {
                "experiment_ids": [experiment_id],
                "max_results": limit,
                "order_by": ["attributes.start_time DESC"],
            },
        )
        found.raise_for_status()
        by_run: dict[str, list[str]] = {}
        for version in await self._versions(model_line):
            if version.get("run_id"):
                by_run.setdefault(str(version["run_id"]), []).append(str(version["version"]))
        return [_run_row(raw, by_run) for raw in found.json().get("runs", [])]

    async def versions(self, model_line: str) -> list[VersionRow]:
        """Every version of the line's registered model, oldest first, with its aliases."""
        response = await self._client.get(
            f"{self._api}/registered-models/get", params={"name": model_line}
        )
        if response.status_code == 404:
            return []
        response.raise_for_status()
        aliases: dict[str, list[str]] = {}
        for alias in response.json()["registered_model"].get("aliases", []):
            aliases.setdefault(str(alias["version"]), []).append(str(alias["alias"]))
        rows = [_version_row(raw, aliases) for raw in await self._versions(model_line)]
        return sorted(rows, key=lambda row: int(row.version))

    async def _versions(self, name: str, *, run_id: str | None = None) -> list[dict[str, Any]]:
        quoted = name.replace("'", "\\'")
        query = f"name = '{quoted}'" + (f" and run_id = '{run_id}'" if run_id else "")
        body = await self._get("model-versions/search", filter=query, max_results=1000)
        versions: list[dict[str, Any]] = body.get("model_versions", [])
        return versions

    # --- registering ------------------------------------------------------------------------

    async def register_run(
        self,
        run_id: str,
        *,
        model_line: str | None = None,
        project_id: str | None = None,
        snapshot_id: str | None = None,
        registered_model: str | None = None,
    ) -> tuple[Registration, ModelTrainedV1]:
        """Make (or find) the version of ``run_id`` and the model.trained announcing it.

        The run's tags fill in what is not given: ``model_line`` (else the experiment's name),
        ``project_id``, ``snapshot_id`` and ``base_version`` (the runner records them all).
        """
        response = await self._client.get(f"{self._api}/runs/get", params={"run_id": run_id})
        if response.status_code in (400, 404):
            raise RegistrationError(f"MLflow has no run {run_id}")
        response.raise_for_status()
        run = response.json()["run"]
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        experiment = await self._get("experiments/get", experiment_id=run["info"]["experiment_id"])
        line = model_line or tags.get("model_line") or experiment["experiment"]["name"]
        name = registered_model or line
        project = project_id or tags.get("project_id")
        snapshot = snapshot_id or tags.get("snapshot_id")
        if not project or not snapshot:
            raise RegistrationError(
                f"run {run_id} does not say its project and snapshot (tags project_id, "
                "snapshot_id): pass --project and --snapshot"
            )
        listed = await self._get("artifacts/list", run_id=run_id, path=ARTIFACT_PATH)
        names = {str(f["path"]).rsplit("/", 1)[-1] for f in listed.get("files", [])}
        missing = [f for f in REQUIRED_FILES if f not in names]
        if missing:
            raise RegistrationError(
                f"run {run_id} has no {', '.join(f'{ARTIFACT_PATH}/{f}' for f in missing)}: "
                "it logged no model to register"
            )
        existing = await self._versions(name, run_id=run_id)
        created = not existing
        if existing:
            version = str(max(existing, key=lambda v: int(v["version"]))["version"])
        else:
            version = await self._create_version(name, run, tags, line, project, snapshot)
        base = tags.get("base_version")
        training_run_id = uuid.uuid5(_NAMESPACE, run_id)
        metrics = {
            str(m["key"]): float(m["value"])
            for m in run["data"].get("metrics", [])
            if isinstance(m.get("value"), int | float)
        }
        event = ModelTrainedV1(
            event_id=uuid.uuid5(_NAMESPACE, f"{name}:{version}"),
            correlation_id=uuid.uuid5(_NAMESPACE, f"correlation:{run_id}"),
            payload=ModelTrainedPayload(
                project_id=project,
                model_line=line,
                snapshot_id=snapshot,
                training_run_id=training_run_id,
                mlflow_run_id=run_id,
                registered_model=name,
                model_version=version,
                base_model_version=None if base in (None, "", NO_BASE) else base,
                backend=BACKEND,
                metrics=metrics,
            ),
        )
        registration = Registration(
            registered_model=name,
            version=version,
            created=created,
            event_id=event.event_id,
            training_run_id=training_run_id,
            model_line=line,
            project_id=project,
            snapshot_id=snapshot,
        )
        return registration, event

    async def _create_version(
        self,
        name: str,
        run: dict[str, Any],
        tags: Mapping[str, str],
        model_line: str,
        project_id: str,
        snapshot_id: str,
    ) -> str:
        made = await self._post("registered-models/create", {"name": name})
        if made.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in made.text:
            made.raise_for_status()
        version_tags = {
            "project_id": project_id,
            "model_line": model_line,
            "snapshot_id": snapshot_id,
            "base_version": tags.get("base_version", NO_BASE),
            "training_run_id": tags.get("training_run_id", ""),
            "git_sha": tags.get("git_sha", "unknown"),
            "entry_point": tags.get("entry_point", ""),
            "registered_by": "flywheel models register",
        }
        source = f"{str(run['info']['artifact_uri']).rstrip('/')}/{ARTIFACT_PATH}"
        response = await self._post(
            "model-versions/create",
            {
                "name": name,
                "source": source,
                "run_id": run["info"]["run_id"],
                "tags": [{"key": k, "value": v} for k, v in version_tags.items()],
                "description": f"Registered from run {run['info']['run_id']} "
                f"(snapshot {snapshot_id}).",
            },
        )
        response.raise_for_status()
        return str(response.json()["model_version"]["version"])


async def publish_trained(rabbit_url: str, namespace: str, event: ModelTrainedV1) -> None:
    """Publish ``event`` with publisher confirms, as trainer-dispatch's outbox relay does."""
    broker = create_broker(rabbit_url, app_id="flywheel-cli")
    await broker.connect()
    try:
        await publish_event(broker, Topology(namespace=namespace), event)
    finally:
        await broker.stop()


def _when(millis: object) -> datetime | None:
    if not isinstance(millis, int | str) or not str(millis).isdigit():
        return None
    return datetime.fromtimestamp(int(millis) / 1000, tz=UTC)


def _run_row(raw: dict[str, Any], versions: Mapping[str, list[str]]) -> RunRow:
    info, data = raw["info"], raw.get("data", {})
    tags = {t["key"]: t["value"] for t in data.get("tags", [])}
    return RunRow(
        run_id=info["run_id"],
        name=info.get("run_name"),
        status=info.get("status", "UNKNOWN"),
        started_at=_when(info.get("start_time")),
        entry_point=tags.get("entry_point"),
        training_run_id=tags.get("training_run_id") or None,
        snapshot_id=tags.get("snapshot_id"),
        metrics={str(m["key"]): float(m["value"]) for m in data.get("metrics", [])},
        versions=sorted(versions.get(info["run_id"], []), key=int),
    )


def _version_row(raw: dict[str, Any], aliases: Mapping[str, list[str]]) -> VersionRow:
    tags = {t["key"]: t["value"] for t in raw.get("tags", [])}
    accuracy = tags.get("validation.accuracy")
    try:
        parsed = float(accuracy) if accuracy is not None else None
    except ValueError:
        parsed = None
    version = str(raw["version"])
    return VersionRow(
        version=version,
        aliases=sorted(aliases.get(version, [])),
        run_id=raw.get("run_id") or None,
        created_at=_when(raw.get("creation_timestamp")),
        entry_point=tags.get("entry_point") or None,
        verdict=tags.get("validation.verdict"),
        accuracy=parsed,
    )
