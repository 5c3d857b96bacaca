"""``Serving`` on Triton: rebuild the model's repository folder, then have Triton reload it.

The repository names exactly the versions to serve, so one reload loads a new candidate, or
unloads a rolled-back one or a retired champion, while the versions that stay keep serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flywheel_clients.registry import ModelRegistry
from flywheel_runtime.errors import InvalidInputError
from flywheel_serving.errors import ModelLoadError
from flywheel_serving.repository import ServingOptions, sync_from_registry
from flywheel_serving.triton import TritonControl


class TritonServing:
    """Serves registered versions from a local repository folder that Triton reads."""

    def __init__(
        self,
        registry: ModelRegistry,
        control: TritonControl,
        repository: Path,
        options: ServingOptions,
    ) -> None:
        self._registry = registry
        self._control = control
        self._repository = repository
        self._options = options

    async def serve(self, registered_model: str, versions: Sequence[str]) -> None:
        self._repository.mkdir(parents=True, exist_ok=True)
        await sync_from_registry(
            self._registry,
            registered_model,
            self._repository,
            self._options,
            versions=list(versions),
        )
        try:
            await self._control.load(registered_model)
        except ModelLoadError as error:
            # Triton refused the files of a version: the version's fault, not an outage.
            raise InvalidInputError(
                error.message, details=error.details | {"versions": list(versions)}
            ) from error

    async def ready(self, registered_model: str, version: str) -> bool:
        return await self._control.model_ready(registered_model, version)
