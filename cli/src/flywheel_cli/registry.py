"""The MLflow registry as the CLI reads it: model lines, their aliases and version tags.

MLflow's REST API is called directly with short timeouts: the Python client retries a server
that is down for minutes, and ``status`` must answer at once.
"""

from __future__ import annotations

import httpx
from pydantic import BaseModel, ConfigDict

CHAMPION = "champion"
CHALLENGER = "challenger"
ACCURACY_TAG = "validation.accuracy"
"""Tag the validator writes on each version it judged: accuracy on the held-out split."""


class LineView(BaseModel):
    """One registered model (model line) and the versions its aliases point at."""

    model_config = ConfigDict(frozen=True)

    model_line: str
    champion_version: str | None = None
    champion_accuracy: float | None = None
    challenger_version: str | None = None
    latest_version: str | None = None
    versions: int = 0


class VersionView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    run_id: str | None = None
    tags: dict[str, str] = {}


class MlflowRegistry:
    """Read-only calls to one tracking server's registry."""

    def __init__(self, client: httpx.AsyncClient, tracking_uri: str) -> None:
        self._client = client
        self._api = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow"

    async def lines(self) -> list[LineView]:
        response = await self._client.get(
            f"{self._api}/registered-models/search", params={"max_results": 100}
        )
        response.raise_for_status()
        lines = []
        for model in response.json().get("registered_models", []):
            name = model["name"]
            aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
            versions = await self.versions(name)
            champion = aliases.get(CHAMPION)
            accuracy = None
            if champion is not None:
                tags = next((v.tags for v in versions if v.version == champion), {})
                accuracy = _float(tags.get(ACCURACY_TAG))
            lines.append(
                LineView(
                    model_line=name,
                    champion_version=champion,
                    champion_accuracy=accuracy,
                    challenger_version=aliases.get(CHALLENGER),
                    latest_version=max((v.version for v in versions), key=int, default=None),
                    versions=len(versions),
                )
            )
        return sorted(lines, key=lambda line: line.model_line)

    async def versions(self, name: str) -> list[VersionView]:
        response = await self._client.get(
            f"{self._api}/model-versions/search",
            params={"filter": f"name='{name}'", "max_results": 1000},
        )
        response.raise_for_status()
        return [_version(v) for v in response.json().get("model_versions", [])]

    async def alias(self, name: str, alias: str) -> VersionView | None:
        response = await self._client.get(
            f"{self._api}/registered-models/alias", params={"name": name, "alias": alias}
        )
        if response.status_code in (400, 404):  # MLflow answers a missing alias with either
            return None
        response.raise_for_status()
        return _version(response.json()["model_version"])


def _version(raw: dict[str, object]) -> VersionView:
    tags = raw.get("tags") or []
    return VersionView(
        name=str(raw["name"]),
        version=str(raw["version"]),
        run_id=str(raw["run_id"]) if raw.get("run_id") else None,
        tags={str(t["key"]): str(t["value"]) for t in tags if isinstance(t, dict)}
        if isinstance(tags, list)
        else {},
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
