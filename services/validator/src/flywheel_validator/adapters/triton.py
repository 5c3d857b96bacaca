"""``Benchmark`` on Triton: both versions served side by side, measured taking turns.

Each version becomes a Triton model of its own (``validator.<role>.<model>.<version>``) in the
repository folder Triton reads, under its golden configuration or the default options, and is
loaded through Triton's model-control API. Every round measures each concurrency level for
both (``flywheel_serving.tuning.measure``, which warms a model up before it counts), the order
flipping from level to level and round to round, so a burst of noise on the machine falls on
both alike. A level where every request failed counts as a point with only errors. Both are
unloaded and their folders removed afterwards, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

from flywheel_runtime.errors import InvalidInputError
from flywheel_serving.errors import ModelLoadError, TritonError
from flywheel_serving.repository import ServingOptions, build_model_repository
from flywheel_serving.triton import TritonControl
from flywheel_serving.tuning import LoadPoint, describe_hardware, measure, serving_spec
from flywheel_validator.errors import ServingRefusedError
from flywheel_validator.ports import LoadRun, ServedModel

Measure = Callable[..., Awaitable[list[LoadPoint]]]
"""``flywheel_serving.tuning.measure``'s signature."""

_NAME_LIMIT: Final = 128


class TritonBenchmark:
    """Measures two versions on one Triton; one comparison at a time per instance."""

    def __init__(
        self,
        control: TritonControl,
        repository: Path,
        options: ServingOptions,
        *,
        concurrencies: Sequence[int],
        requests_per_level: int,
        rounds: int,
        load_timeout_s: float = 120.0,
        measure_fn: Measure = measure,
    ) -> None:
        self._control = control
        self._repository = repository
        self._options = options
        self._concurrencies = list(concurrencies)
        self._requests = requests_per_level
        self._rounds = rounds
        self._load_timeout_s = load_timeout_s
        self._measure = measure_fn
        # Two comparisons at once would measure each other.
        self._lock = asyncio.Lock()

    async def compare(
        self, candidate: ServedModel, champion: ServedModel, images: Sequence[bytes]
    ) -> LoadRun:
        async with self._lock:
            names = {
                model.role: triton_name(model.role, model.files.name, model.files.version)
                for model in (candidate, champion)
            }
            served: list[str] = []
            try:
                for model in (candidate, champion):
                    served.append(names[model.role])
                    await self._serve(model, names[model.role])
                points = await self._run(
                    [(candidate, names[candidate.role]), (champion, names[champion.role])], images
                )
            finally:
                await self._retire(served)
        return LoadRun(
            candidate=points[candidate.role],
            champion=points[champion.role],
            hardware=await asyncio.to_thread(describe_hardware),
            description=self._description(candidate, champion),
        )

    async def _serve(self, model: ServedModel, name: str) -> None:
        options = self._options if model.config is None else model.config.apply(self._options)
        files = model.files.model_copy(update={"name": name})
        details = {"role": model.role, "version": model.files.version}
        self._repository.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(
                build_model_repository, self._repository, name, [files], options
            )
            await self._control.load(name)
        except (InvalidInputError, ModelLoadError) as error:
            raise ServingRefusedError(error.message, details=details) from error
        await self._control.wait_model_ready(
            name, model.files.version, timeout=self._load_timeout_s
        )

    async def _run(
        self, models: list[tuple[ServedModel, str]], images: Sequence[bytes]
    ) -> dict[str, list[LoadPoint]]:
        points: dict[str, list[LoadPoint]] = {model.role: [] for model, _ in models}
        for round_ in range(self._rounds):
            for index, level in enumerate(self._concurrencies):
                turn = models if (round_ + index) % 2 == 0 else models[::-1]
                for model, name in turn:
                    points[model.role] += await self._level(model, name, images, level)
        return points

    async def _level(
        self, model: ServedModel, name: str, images: Sequence[bytes], level: int
    ) -> list[LoadPoint]:
        try:
            return await self._measure(
                self._control.url,
                name,
                model.files.version,
                images,
                [level],
                requests_per_level=self._requests,
                rounds=1,
                spec=serving_spec(model.files),
            )
        except TritonError:
            # Every request failed. Triton gone is an outage (this raises, and the event is
            # redelivered); Triton answering is the model's doing.
            await self._control.server_ready()
            return [
                LoadPoint(
                    concurrency=level,
                    requests=self._requests,
                    errors=self._requests,
                    throughput_rps=0.0,
                    p50_ms=0.0,
                    p95_ms=0.0,
                    p99_ms=0.0,
                )
            ]

    async def _retire(self, names: Sequence[str]) -> None:
        for name in names:
            # Cleanup must not hide the comparison's own outcome; a leftover model is harmless
            # and the next comparison of that version overwrites it.
            with contextlib.suppress(Exception):
                await self._control.unload(name)
            await asyncio.to_thread(shutil.rmtree, self._repository / name, True)

    def _description(self, candidate: ServedModel, champion: ServedModel) -> str:
        def config(model: ServedModel) -> str:
            if model.config is None:
                return f"{model.role} default"
            knobs = model.config
            return (
                f"{model.role} golden (batch {knobs.max_batch_size}, queue delay "
                f"{knobs.max_queue_delay_microseconds} us, {knobs.instance_count} instances)"
            )

        levels = ", ".join(str(level) for level in self._concurrencies)
        return (
            f"Triton {self._control.url}, concurrency {levels}, {self._rounds} rounds x "
            f"{self._requests} requests per model and level; {config(candidate)}, "
            f"{config(champion)}"
        )


def triton_name(role: str, model: str, version: str) -> str:
    """The Triton model a version is measured under: readable, and short enough for Triton."""
    name = f"validator.{role}.{model}.{version}"
    if len(name) <= _NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: _NAME_LIMIT - len(digest) - 1]}-{digest}"
