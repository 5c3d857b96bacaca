"""``flywheel tune``: profile a registered version in Triton and record its golden config.

The version's files come from the registry and are loaded into the stack's Triton (or any
Triton given by URL) under scratch names, so the served model is untouched. Constraints are
the project's (``FLYWHEEL_CLI_SERVING_CONSTRAINTS__<project>__MAX_P99_MS=…``; the project is
the version's ``project_id`` tag), with command-line limits prevailing.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from flywheel_cli.endpoints import stack_urls
from flywheel_cli.settings import CliSettings
from flywheel_cli.state import StateFile
from flywheel_clients.registry import CHAMPION, ModelRegistry
from flywheel_runtime.errors import FlywheelError, NotFoundError
from flywheel_serving.repository import ServingOptions
from flywheel_serving.tuning import (
    Constraints,
    MemoryProbe,
    TuningGrid,
    TuningResult,
    log_golden,
    metrics_memory_mb,
    tune,
)
from flywheel_vision.data import load_mnist, to_png

PROJECT_TAG = "project_id"
"""Version tag naming the project a version was trained for (the trainer sets it)."""


class TuneRequest(BaseModel):
    """What ``flywheel tune`` was asked for."""

    model_config = ConfigDict(frozen=True)

    model_line: str
    version: str | None = None
    triton_url: str | None = None
    metrics_url: str | None = None
    mlflow_uri: str | None = None
    limits: Constraints = Constraints()
    grid: TuningGrid = TuningGrid()
    base: ServingOptions = ServingOptions(flavour="python")
    images: int = 64
    log: bool = True


class TuneOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    result: TuningResult
    project_id: str | None
    artifacts_uri: str | None


class TuneError(FlywheelError):
    """``flywheel tune`` could not run (no such version, no Triton to load it into)."""

    code = "tune_failed"


def _bare(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://").rstrip("/")


def constraints_for(
    settings: CliSettings, project_id: str | None, limits: Constraints
) -> Constraints:
    """The defaults, the project's own limits over them, the command line's over both."""
    project = settings.serving_constraints.get(project_id or "", Constraints())
    return settings.default_serving_constraints.merged(project).merged(limits)


def sample_images(count: int) -> list[bytes]:
    """The first ``count`` MNIST test digits as PNGs: what the load sends."""
    images, _ = load_mnist("test", limit=count)
    return [to_png(image) for image in images]


async def run_tune(settings: CliSettings, request: TuneRequest) -> TuneOutcome:
    state = StateFile(settings.state_path).load()
    urls = stack_urls(settings, state)
    registry = ModelRegistry(request.mlflow_uri or urls["mlflow"])
    if request.version is not None:
        info = await registry.get_version(request.model_line, request.version)
    else:
        champion = await registry.get_alias(request.model_line, CHAMPION)
        versions = [] if champion is None else [champion]
        if not versions:
            versions = await registry.list_versions(request.model_line)
        if not versions:
            raise NotFoundError(
                "the model line has no version", details={"model": request.model_line}
            )
        info = versions[-1]
    project_id = info.tags.get(PROJECT_TAG)
    constraints = constraints_for(settings, project_id, request.limits)
    triton_url = _bare(request.triton_url or urls["triton"])
    probe: MemoryProbe | None = None
    metrics_url = request.metrics_url
    if metrics_url is None and request.triton_url is None:
        metrics_url = f"http://127.0.0.1:{settings.ports.triton_metrics}/metrics"
    if metrics_url:
        probe = metrics_memory_mb(metrics_url)
    files = await registry.download_model_files(request.model_line, info.version)
    result = await tune(
        triton_url,
        files,
        sample_images(request.images),
        base=request.base,
        grid=request.grid,
        constraints=constraints,
        memory_probe=probe,
    )
    uri = None
    if request.log and result.golden is not None:
        uri = await log_golden(registry, result)
    return TuneOutcome(result=result, project_id=project_id, artifacts_uri=uri)


def parse_ints(text: str | None, default: Sequence[int]) -> tuple[int, ...]:
    if text is None:
        return tuple(default)
    return tuple(int(part) for part in text.split(",") if part.strip())
