"""The MLflow model registry, as Flywheel's services use it: aliases, version tags, model files.

``MlflowClient`` is blocking, so every call runs in a worker thread and the event loop keeps
serving. Its failures are translated into the platform's errors: a registry that does not answer
(or answers 5xx) becomes ``DependencyUnavailableError`` (retryable: the broker redelivers), a
missing model or version becomes ``NotFoundError``, anything else ``RegistryError``. Messages
name the model and version, never the server's address.

Aliases, not the deprecated stages: ``champion`` serves 100 %, ``challenger`` is validated and
in canary. An alias is read with ``get_model_version_by_alias``; search results do not reliably
carry aliases.

Every call names this client's own tracking and registry URI. MLflow's module-level helpers
(``models:/`` downloads included) would otherwise consult the process's defaults
(``MLFLOW_TRACKING_URI``, or a ``./mlflow.db`` they create) and talk to another registry.
"""

from __future__ import annotations

import asyncio
import functools
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

import urllib3
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from pydantic import BaseModel, ConfigDict, Field

from flywheel_runtime.errors import (
    DependencyUnavailableError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
)
from flywheel_runtime.settings import PlatformSettings

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "CONFIG_FILE",
    "LABELS_FILE",
    "MODEL_JSON_FILE",
    "ONNX_FILE",
    "STATE_DICT_FILE",
    "ModelFiles",
    "ModelRegistry",
    "ModelVersionInfo",
    "RegistryError",
]

CHAMPION: Final = "champion"
"""Alias of the version serving 100 % of the traffic."""

CHALLENGER: Final = "challenger"
"""Alias of the version that passed validation and is (or is about to be) in canary."""

ONNX_FILE: Final = "model.onnx"
LABELS_FILE: Final = "labels.json"
STATE_DICT_FILE: Final = "state_dict.pt"
CONFIG_FILE: Final = "config.pbtxt"
MODEL_JSON_FILE: Final = "model.json"
"""File names of a version's artifacts (the same as ``flywheel_vision.train`` logs)."""

_T = TypeVar("_T")

# Server-side trouble that a later attempt may not meet again (HTTP 5xx and 429 equivalents).
_TRANSIENT_CODES: Final = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
    }
)
# Raised without a server answer (default code), these only mean "unreachable" when the
# transport error is in the chain; checked separately.
_CLIENT_TRANSIENT_CODES: Final = _TRANSIENT_CODES - {"INTERNAL_ERROR"}
_NOT_FOUND_CODES: Final = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_SEARCH_PAGE: Final = 1000


class RegistryError(FlywheelError):
    """The registry refused a request for a reason that retrying will not change."""

    code = "registry_error"
    http_status = 502


class ModelVersionInfo(BaseModel):
    """One registered model version, as the registry describes it."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    source: str | None = None
    """Where its artifacts live (``<run artifact uri>/model`` for Flywheel's trainer)."""
    run_id: str | None = None
    status: str | None = None
    """``READY`` once the registry finished creating it."""
    aliases: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    description: str | None = None
    created_at: datetime | None = None


class ModelFiles(BaseModel):
    """What a version ships with: the ONNX graph, its class names, weights and Triton config."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    onnx: bytes
    labels: list[str]
    """Class names in output-index order (``labels.json``)."""
    state_dict: bytes | None = None
    """PyTorch weights (``torch.save`` of the state dict); None when the version has none."""
    config_pbtxt: str | None = None
    """Triton model configuration; None when the version has none."""
    model_json: bytes | None = None
    """The model's declaration (tensors and preprocessing, ``flywheel_vision.contract``);
    None for versions registered before models declared it (they are the MNIST reference)."""


class ModelRegistry:
    """Async facade over one MLflow tracking/registry server; safe to share across tasks."""

    def __init__(self, tracking_uri: str, *, registry_uri: str | None = None) -> None:
        self._tracking_uri = tracking_uri
        self._registry_uri = registry_uri or tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=self._registry_uri)

    @classmethod
    def from_settings(cls, platform: PlatformSettings) -> ModelRegistry:
        """The registry every service uses, from its platform settings."""
        return cls(platform.mlflow_uri)

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    async def ping(self) -> None:
        """Readiness check: the server answers a cheap authenticated request."""
        await self._run(lambda: self._client.search_experiments(max_results=1), "ping")

    async def get_version(self, name: str, version: str) -> ModelVersionInfo:
        """One version; ``NotFoundError`` if the model or the version does not exist."""
        found = await self._run(
            lambda: self._client.get_model_version(name, version), "get_version", name, version
        )
        return _info(found)

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """The version behind ``alias``; None when the alias (or the model) does not exist yet."""

        def call() -> ModelVersion | None:
            try:
                return self._client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                missing_model = exc.error_code in _NOT_FOUND_CODES
                # MLflow reports an unset alias as an invalid parameter "... not found".
                missing_alias = exc.error_code == "INVALID_PARAMETER_VALUE" and (
                    "not found" in exc.message.lower()
                )
                if missing_model or missing_alias:
                    return None
                raise

        found = await self._run(call, "get_alias", name, alias=alias)
        return None if found is None else _info(found)

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (moving it if it pointed elsewhere); idempotent."""
        await self._run(
            lambda: self._client.set_registered_model_alias(name, alias, version),
            "set_alias",
            name,
            version,
            alias=alias,
        )

    async def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias``; nothing happens when it is not set."""
        await self._run(
            lambda: self._client.delete_registered_model_alias(name, alias),
            "delete_alias",
            name,
            alias=alias,
        )

    async def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags on a version."""

        def call() -> None:
            for key, value in tags.items():
                self._client.set_model_version_tag(name, version, key, value)

        await self._run(call, "set_tags", name, version)

    async def log_version_artifacts(
        self, name: str, version: str, files: Mapping[str, bytes], *, artifact_path: str
    ) -> str:
        """Store ``files`` (file name → bytes) under ``artifact_path`` of the version's run;
        return that folder's URI. ``NotFoundError`` when the version has no run."""

        def call() -> str:
            run_id = self._client.get_model_version(name, version).run_id
            if not run_id:
                raise NotFoundError(
                    "model version has no run to log artifacts to",
                    details={"model": name, "version": version},
                )
            with tempfile.TemporaryDirectory(prefix="flywheel-artifacts-") as tmp:
                for file_name, data in files.items():
                    (Path(tmp) / Path(file_name).name).write_bytes(data)
                self._client.log_artifacts(run_id, tmp, artifact_path=artifact_path)
            root = self._client.get_run(run_id).info.artifact_uri.rstrip("/")
            return f"{root}/{artifact_path.strip('/')}"

        return await self._run(call, "log_version_artifacts", name, version)

    async def list_versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of a model, oldest first, each with its aliases."""

        def call() -> list[ModelVersionInfo]:
            aliases: dict[str, list[str]] = {}
            for alias, version in self._client.get_registered_model(name).aliases.items():
                aliases.setdefault(str(version), []).append(alias)
            quoted = name.replace("'", "\\'")
            found: list[ModelVersion] = []
            token: str | None = None
            while True:
                page = self._client.search_model_versions(
                    f"name = '{quoted}'", max_results=_SEARCH_PAGE, page_token=token
                )
                found += list(page)
                token = page.token
                if not token:
                    break
            versions = [
                _info(v).model_copy(update={"aliases": sorted(aliases.get(str(v.version), []))})
                for v in found
            ]
            return sorted(versions, key=lambda v: int(v.version) if v.version.isdigit() else 0)

        return await self._run(call, "list_versions", name)

    async def download_model_files(self, name: str, version: str) -> ModelFiles:
        """The files of a version, read through this client's own server.

        ``NotFoundError`` when the version does not exist or lacks ``model.onnx`` or
        ``labels.json``; ``InvalidInputError`` when ``labels.json`` is not a list of class names.
        A file that is listed but cannot be downloaded is an outage (retryable).
        """
        return await self._run(
            functools.partial(self._download, name, version), "download_model_files", name, version
        )

    async def download_labels(self, name: str, version: str) -> list[str]:
        """Only a version's class names (``labels.json``), without fetching its model files.

        Serving needs the names, not the weights (Triton has those). ``NotFoundError`` when the
        version or its ``labels.json`` does not exist; ``InvalidInputError`` when the file is
        not a list of class names.
        """
        return await self._run(
            functools.partial(self._download_labels, name, version),
            "download_labels",
            name,
            version,
        )

    async def download_serving_files(
        self, name: str, version: str
    ) -> tuple[list[str], bytes | None]:
        """A version's class names and its ``model.json`` (None when it has none): what
        serving needs to prepare images and name classes, without the weights."""
        return await self._run(
            functools.partial(self._download_serving, name, version),
            "download_serving_files",
            name,
            version,
        )

    def _download_labels(self, name: str, version: str) -> list[str]:
        labels, _ = self._download_small(name, version, with_model_json=False)
        return labels

    def _download_serving(self, name: str, version: str) -> tuple[list[str], bytes | None]:
        return self._download_small(name, version, with_model_json=True)

    def _download_small(
        self, name: str, version: str, *, with_model_json: bool
    ) -> tuple[list[str], bytes | None]:
        details = {"model": name, "version": version}
        optional = (MODEL_JSON_FILE,) if with_model_json else ()
        contents = self._fetch(name, version, (LABELS_FILE,), optional)
        return _labels(contents[LABELS_FILE], details), contents.get(MODEL_JSON_FILE)

    def _download(self, name: str, version: str) -> ModelFiles:
        details = {"model": name, "version": version}
        contents = self._fetch(
            name,
            version,
            (ONNX_FILE, LABELS_FILE),
            (STATE_DICT_FILE, CONFIG_FILE, MODEL_JSON_FILE),
        )
        config = contents.get(CONFIG_FILE)
        return ModelFiles(
            name=name,
            version=version,
            onnx=contents[ONNX_FILE],
            labels=_labels(contents[LABELS_FILE], details),
            state_dict=contents.get(STATE_DICT_FILE),
            config_pbtxt=None if config is None else config.decode("utf-8", errors="replace"),
            model_json=contents.get(MODEL_JSON_FILE),
        )

    def _fetch(
        self, name: str, version: str, required: Sequence[str], optional: Sequence[str]
    ) -> dict[str, bytes]:
        """The version's ``required`` artifacts (``NotFoundError`` naming a missing one) and
        those of ``optional`` it has, by file name."""
        source = self._client.get_model_version_download_uri(name, version)
        repository = get_artifact_repository(
            source, tracking_uri=self._tracking_uri, registry_uri=self._registry_uri
        )
        listed = {Path(item.path).name for item in repository.list_artifacts() if not item.is_dir}
        details = {"model": name, "version": version}
        for file_name in required:
            if file_name not in listed:
                raise NotFoundError(f"model version artifacts lack {file_name}", details=details)
        wanted = [*required, *(f for f in optional if f in listed)]
        contents: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
            for file_name in wanted:
                try:
                    local = download_artifacts(
                        artifact_uri=f"{source.rstrip('/')}/{file_name}",
                        dst_path=tmp,
                        tracking_uri=self._tracking_uri,
                        registry_uri=self._registry_uri,
                    )
                except MlflowException as exc:
                    # It was listed a moment ago, so failing to fetch it is the server's trouble.
                    raise DependencyUnavailableError(
                        "model registry could not serve an artifact",
                        details=details | {"file": file_name},
                    ) from exc
                contents[file_name] = Path(local).read_bytes()
        return contents

    async def _run(
        self,
        call: Callable[[], _T],
        operation: str,
        name: str | None = None,
        version: str | None = None,
        *,
        alias: str | None = None,
    ) -> _T:
        """Run a blocking client call in a thread and translate its failures into ours."""
        details = {
            key: value
            for key, value in (
                ("operation", operation),
                ("model", name),
                ("version", version),
                ("alias", alias),
            )
            if value is not None
        }
        try:
            return await asyncio.to_thread(call)
        except FlywheelError:
            raise
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND_CODES:
                raise NotFoundError(_not_found_message(version), details=details) from exc
            if _transient(exc):
                raise DependencyUnavailableError(
                    "model registry is unavailable", details=details
                ) from exc
            raise RegistryError("model registry refused the request", details=details) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            # requests' exceptions are OSErrors: unreachable, reset, timed out, 5xx after retries.
            raise DependencyUnavailableError(
                "model registry is unavailable", details=details
            ) from exc


def _not_found_message(version: str | None) -> str:
    return "model version not found" if version is not None else "registered model not found"


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transient(error: MlflowException) -> bool:
    """Whether a registry failure may heal by itself: no answer, or the server's own trouble."""
    for link in _chain(error):
        if isinstance(link, OSError | urllib3.exceptions.HTTPError):
            return True
        status = getattr(getattr(link, "response", None), "status_code", None)
        if isinstance(status, int):
            return status >= 500 or status == 429
    if isinstance(error, RestException):
        return error.error_code in _TRANSIENT_CODES
    return error.error_code in _CLIENT_TRANSIENT_CODES


def _labels(data: bytes, details: dict[str, str]) -> list[str]:
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError("labels.json is not JSON", details=details) from exc
    classes = parsed.get("classes") if isinstance(parsed, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InvalidInputError(
            "labels.json must hold {'classes': [str, ...]} with at least one class",
            details=details,
        )
    return classes


def _info(version: ModelVersion) -> ModelVersionInfo:
    created = version.creation_timestamp
    return ModelVersionInfo(
        name=str(version.name),
        version=str(version.version),
        source=version.source,
        run_id=version.run_id or None,
        status=version.status,
        aliases=sorted(str(a) for a in (version.aliases or [])),
        tags={str(k): str(v) for k, v in (version.tags or {}).items()},
        description=version.description or None,
        created_at=None if created is None else datetime.fromtimestamp(created / 1000, tz=UTC),
    )
