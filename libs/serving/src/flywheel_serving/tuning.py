"""Golden serving configuration: profile a model version under candidate Triton configurations
and pick the best one that meets the project's constraints.

``measure`` is the load generator: closed-loop clients over Triton's v2 HTTP API (the same
scheme as ``benchmarks/serving.py``), each sending one preprocessed image and the next as soon
as the answer is in, at rising concurrency. A level is split into rounds and every figure is
the median over rounds, so a short stall of a shared machine spoils one round, not the level.

``tune`` searches the grid of ``max_batch_size``, ``dynamic_batching.max_queue_delay`` and
``instance_group.count`` one knob at a time, starting from the deployed configuration (the
baseline). Each candidate is loaded into Triton beside the best configuration so far, under a
scratch model name with its config and files sent in the load request (nothing is written into
the model repository, the served model is untouched), and both are measured with their rounds
interleaved: noise from other work on the machine falls on both alike. A candidate replaces
the incumbent only when it serves ``min_gain`` more requests per second within the
constraints. Early stopping: concurrency stops rising once throughput stops growing or p99
exceeds the limit, and a knob stops moving in one direction at the first value that does not
help. The winner is confirmed head to head against the baseline before it becomes golden.

``log_golden`` stores the winning ``config.pbtxt``, ``golden.json`` and a throughput-vs-p99
plot in the version's run (``serving/``) and tags the version (``serving.golden_*``);
``sync_from_registry`` then builds the repository with the golden knobs.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import numpy as np
import numpy.typing as npt
import structlog
import tritonclient.http.aio as http_aio
from google.protobuf import json_format, text_format  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from flywheel_clients.registry import ModelFiles, ModelRegistry, ModelVersionInfo
from flywheel_runtime.errors import InvalidInputError
from flywheel_serving.errors import ModelLoadError, TritonError
from flywheel_serving.repository import (
    MODEL_PY_FILE,
    ServingOptions,
    python_backend_source,
    render_config,
)
from flywheel_serving.triton import TritonControl
from flywheel_vision.contract import ModelSignature, signature_or_reference
from flywheel_vision.export import LABELS_FILE, ONNX_FILE, labels_json
from flywheel_vision.preprocess import (
    INPUT_NAME,
    MNIST_PREPROCESS,
    OUTPUT_NAME,
    PreprocessSpec,
    preprocess,
)

__all__ = [
    "ARTIFACT_PATH",
    "GOLDEN_TAG",
    "TAG_PREFIX",
    "Constraints",
    "GoldenPoint",
    "LoadPoint",
    "MemoryProbe",
    "ServingConfig",
    "Trial",
    "TuningGrid",
    "TuningResult",
    "beats",
    "best_point",
    "config_json",
    "describe_hardware",
    "golden_config",
    "golden_options",
    "golden_pbtxt",
    "keep_raising",
    "log_golden",
    "measure",
    "metrics_memory_mb",
    "plot_png",
    "process_group_rss_mb",
    "search",
    "serving_spec",
    "tune",
]

GOLDEN_TAG: Final = "serving.golden"
"""Version tag holding the ``GoldenPoint`` as JSON; the repository builder (and the validator's
performance gate) read its ``config``."""
TAG_PREFIX: Final = "serving.golden_"
"""Prefix of the other tags of a tuned version (figures, ``config_pbtxt``, artifacts)."""
ARTIFACT_PATH: Final = "serving"
"""Folder of the version's run holding ``config.pbtxt``, ``golden.json`` and the plot."""
PLOT_FILE: Final = "throughput_vs_p99.png"
GOLDEN_FILE: Final = "golden.json"
PBTXT_FILE: Final = "config.pbtxt"
MAX_TAG_VALUE: Final = 5000

_log = structlog.get_logger(__name__)

MemoryProbe = Callable[[], Awaitable[float | None]]
"""Memory in MB the serving side holds now (None: unknown); a configuration's footprint is
the growth from before its load to after its warm-up."""

Knob = Literal["instance_count", "max_batch_size", "max_queue_delay_microseconds"]
# Free knobs first; instances cost memory and contend for cores, so they move last.
KNOBS: Final[tuple[Knob, ...]] = (
    "max_queue_delay_microseconds",
    "max_batch_size",
    "instance_count",
)


class ServingConfig(BaseModel):
    """The knobs the tuner turns (the rest of ``ServingOptions`` is kept as deployed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(ge=1)
    max_queue_delay_microseconds: int = Field(ge=0)
    instance_count: int = Field(ge=1)

    @classmethod
    def of(cls, options: ServingOptions) -> ServingConfig:
        """The knobs ``options`` has."""
        return cls(
            max_batch_size=options.max_batch_size,
            max_queue_delay_microseconds=options.max_queue_delay_microseconds,
            instance_count=options.instance_count,
        )

    def apply(self, base: ServingOptions) -> ServingOptions:
        """``base`` with these knobs (preferred batch sizes clipped to the batch size)."""
        return ServingOptions.model_validate(
            base.model_dump()
            | {
                "max_batch_size": self.max_batch_size,
                "max_queue_delay_microseconds": self.max_queue_delay_microseconds,
                "instance_count": self.instance_count,
                "preferred_batch_sizes": tuple(
                    size for size in base.preferred_batch_sizes if size <= self.max_batch_size
                ),
            }
        )

    @property
    def label(self) -> str:
        return (
            f"batch {self.max_batch_size}, delay {self.max_queue_delay_microseconds} us, "
            f"x{self.instance_count}"
        )


class LoadPoint(BaseModel):
    """What one concurrency level gave."""

    model_config = ConfigDict(frozen=True)

    concurrency: int
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


class Constraints(BaseModel):
    """A project's serving constraints (None: no limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_p99_ms: float | None = None
    min_throughput_rps: float | None = None
    max_memory_mb: float | None = None

    def merged(self, override: Constraints) -> Constraints:
        """These constraints with the limits ``override`` sets replacing them."""
        return self.model_copy(update=override.model_dump(exclude_unset=True, exclude_none=True))


class GoldenPoint(BaseModel):
    """The chosen configuration and the best load point it met the constraints at."""

    model_config = ConfigDict(frozen=True)

    config: ServingConfig
    point: LoadPoint
    hardware: str
    """CPU model / GPU name the measurement ran on (figures only compare on the same one)."""
    memory_mb: float | None = None
    """Growth of the serving side's memory when the configuration was loaded and warmed up."""


class TuningGrid(BaseModel):
    """The values each knob may take, the load levels, and when to stop early."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    instance_counts: tuple[int, ...] = (1, 2, 4)
    max_batch_sizes: tuple[int, ...] = (8, 32, 64)
    max_queue_delays_us: tuple[int, ...] = (0, 500, 2000, 10000)
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    """Levels each configuration is driven at, lowest first."""
    requests_per_level: int = Field(default=600, ge=1)
    """Requests per configuration and level, over all rounds."""
    rounds: int = Field(default=3, ge=1)
    """Rounds a level is split into; the figures are medians over rounds."""
    min_gain: float = Field(default=0.05, ge=0)
    """A candidate replaces the incumbent only with this much more throughput (fraction)."""
    min_growth: float = Field(default=0.05, ge=0)
    """Concurrency stops rising when throughput grew less than this (fraction)."""

    def values(self, knob: Knob) -> tuple[int, ...]:
        return {
            "instance_count": self.instance_counts,
            "max_batch_size": self.max_batch_sizes,
            "max_queue_delay_microseconds": self.max_queue_delays_us,
        }[knob]


class Trial(BaseModel):
    """One configuration measured in one head-to-head (or failed to load)."""

    model_config = ConfigDict(frozen=True)

    config: ServingConfig
    points: list[LoadPoint] = Field(default_factory=list)
    memory_mb: float | None = None
    error: str | None = None
    against: ServingConfig | None = None
    """The configuration it was measured beside (None: alone)."""


class TuningResult(BaseModel):
    """Every trial of one tuning, the golden configuration and the baseline it beat."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    num_classes: int
    embedding_size: int | None = None
    """Size of the ``embedding`` output the version declares; None when it declares none."""
    hardware: str
    constraints: Constraints
    grid: TuningGrid
    base: ServingOptions
    """The deployed options; the golden configuration changes only its knobs."""
    trials: list[Trial]
    golden: GoldenPoint | None
    """None when no configuration met the constraints."""
    baseline: Trial
    """The baseline as measured beside the golden configuration (the final head-to-head)."""
    started_at: datetime
    seconds: float

    @property
    def baseline_config(self) -> ServingConfig:
        return ServingConfig.of(self.base)

    @property
    def changed(self) -> bool:
        """Whether the golden configuration differs from the deployed one."""
        return self.golden is not None and self.golden.config != self.baseline_config


# --- selection and early stopping (pure) ---------------------------------------------------------


def best_point(points: Iterable[LoadPoint], constraints: Constraints) -> LoadPoint | None:
    """The highest-throughput point without errors within the latency and throughput limits
    (ties: lower p99); None when none is."""
    allowed = [
        point
        for point in points
        if point.errors == 0
        and (constraints.max_p99_ms is None or point.p99_ms <= constraints.max_p99_ms)
        and (
            constraints.min_throughput_rps is None
            or point.throughput_rps >= constraints.min_throughput_rps
        )
    ]
    return max(allowed, key=lambda p: (p.throughput_rps, -p.p99_ms), default=None)


def _within_memory(trial: Trial, constraints: Constraints) -> bool:
    if constraints.max_memory_mb is None:
        return True
    return trial.memory_mb is not None and trial.memory_mb <= constraints.max_memory_mb


def qualifying_point(trial: Trial, constraints: Constraints) -> LoadPoint | None:
    """``best_point`` of a trial that loaded and keeps to the memory limit."""
    if trial.error is not None or not _within_memory(trial, constraints):
        return None
    return best_point(trial.points, constraints)


def beats(
    challenger: Trial, incumbent: Trial, constraints: Constraints, *, min_gain: float
) -> bool:
    """Whether ``challenger`` should replace ``incumbent``: it meets the constraints and
    serves ``min_gain`` more (or the incumbent meets them nowhere)."""
    mine = qualifying_point(challenger, constraints)
    if mine is None:
        return False
    theirs = qualifying_point(incumbent, constraints)
    return theirs is None or mine.throughput_rps > theirs.throughput_rps * (1 + min_gain)


def keep_raising(points: Sequence[LoadPoint], constraints: Constraints, min_growth: float) -> bool:
    """Whether a configuration measured at ``points`` (rising concurrency) is worth a higher
    level: no errors, p99 within the limit, and throughput still growing."""
    if not points:
        return True
    last = points[-1]
    if last.errors > 0:
        return False
    if constraints.max_p99_ms is not None and last.p99_ms > constraints.max_p99_ms:
        return False
    return len(points) < 2 or last.throughput_rps >= points[-2].throughput_rps * (1 + min_growth)


Compare = Callable[[ServingConfig, ServingConfig], Awaitable[tuple[Trial, Trial]]]
"""Measure (incumbent, challenger) head to head; their trials in that order."""


async def search(
    baseline: ServingConfig,
    grid: TuningGrid,
    constraints: Constraints,
    compare: Compare,
) -> tuple[ServingConfig, list[Trial]]:
    """Coordinate search from ``baseline``: the best configuration found and every trial.

    For each knob in turn the values above the incumbent's are tried upwards, then (when
    none of those helped) the ones below it downwards; a direction ends at the first value
    that does not beat the incumbent.
    """
    incumbent = baseline
    trials: list[Trial] = []
    for knob in KNOBS:
        current = getattr(incumbent, knob)
        values = sorted(set(grid.values(knob)))
        up = [value for value in values if value > current]
        down = [value for value in reversed(values) if value < current]
        moved = False
        for direction in (up, down):
            if moved:
                break
            for value in direction:
                challenger = incumbent.model_copy(update={knob: value})
                held, tried = await compare(incumbent, challenger)
                trials += [held, tried]
                if not beats(tried, held, constraints, min_gain=grid.min_gain):
                    break
                incumbent, moved = challenger, True
    return incumbent, trials


# --- load generation ----------------------------------------------------------------------------


async def measure(
    triton_url: str,
    model_name: str,
    version: str,
    images: Sequence[bytes],
    concurrencies: Sequence[int],
    *,
    requests_per_level: int,
    rounds: int = 3,
    keep_going: Callable[[Sequence[LoadPoint]], bool] | None = None,
    spec: PreprocessSpec = MNIST_PREPROCESS,
) -> list[LoadPoint]:
    """Drive ``model_name``/``version`` (already loaded) with preprocessed ``images`` at each
    concurrency in turn and report each level.

    ``images`` are encoded images (PNG, JPEG …), preprocessed once here as ``spec`` says (the
    version's declared preprocessing), so the load measures Triton, not the decoding. Each level is
    ``requests_per_level`` single-image requests in ``rounds`` rounds (figures are medians
    over rounds); ``keep_going`` sees the levels so far and may end the ramp early.
    """
    tensors = _tensors(images, spec)
    target = _Target(model=model_name, version=version)
    await _warm_up(triton_url, [target], tensors, max(concurrencies))
    points: list[LoadPoint] = []
    for concurrency in concurrencies:
        (point,) = await _level(
            triton_url, [target], tensors, concurrency, requests_per_level, rounds
        )
        points.append(point)
        if keep_going is not None and not keep_going(points):
            break
    return points


class _Target(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    version: str


def _tensors(
    images: Sequence[bytes], spec: PreprocessSpec = MNIST_PREPROCESS
) -> list[npt.NDArray[np.float32]]:
    if not images:
        raise InvalidInputError("profiling needs at least one image")
    return [preprocess(image, spec)[np.newaxis] for image in images]


def serving_signature(files: ModelFiles) -> ModelSignature:
    """What ``files`` declare (``model.json``), the MNIST reference when they declare nothing."""
    return signature_or_reference(files.model_json, len(files.labels))


def serving_spec(files: ModelFiles) -> PreprocessSpec:
    """The preprocessing ``files`` declare (``model.json``), MNIST's when they declare none."""
    return serving_signature(files).preprocessing


async def _warm_up(
    url: str, targets: Sequence[_Target], tensors: Sequence[npt.NDArray[np.float32]], top: int
) -> None:
    """First requests on a fresh instance pay for lazy initialisation: not measured."""
    concurrency = min(top, 8)
    for target in targets:
        await _round(url, target, tensors, concurrency, 4 * concurrency)


async def _level(
    url: str,
    targets: Sequence[_Target],
    tensors: Sequence[npt.NDArray[np.float32]],
    concurrency: int,
    requests: int,
    rounds: int,
) -> list[LoadPoint]:
    """One level of every target, their rounds interleaved (the order rotates per round)."""
    per_round = max(1, math.ceil(requests / rounds))
    results: dict[_Target, list[_RoundResult]] = {target: [] for target in targets}
    for number in range(rounds):
        shift = number % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            results[target].append(await _round(url, target, tensors, concurrency, per_round))
    return [_point(concurrency, results[target], target) for target in targets]


class _RoundResult(BaseModel):
    latencies_ms: list[float]
    errors: int
    seconds: float
    first_error: str | None = None


async def _round(
    url: str,
    target: _Target,
    tensors: Sequence[npt.NDArray[np.float32]],
    concurrency: int,
    count: int,
) -> _RoundResult:
    """``count`` requests from ``concurrency`` closed-loop clients."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    next_index = 0
    client = http_aio.InferenceServerClient(url, conn_limit=concurrency)

    async def one_client() -> None:
        nonlocal next_index, errors, first_error
        while next_index < count:
            index = next_index
            next_index += 1
            tensor = tensors[index % len(tensors)]
            image = http_aio.InferInput(INPUT_NAME, list(tensor.shape), "FP32")
            image.set_data_from_numpy(tensor, binary_data=True)
            output = http_aio.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
            started = time.perf_counter()
            try:
                await client.infer(
                    target.model, [image], model_version=target.version, outputs=[output]
                )
            except (InferenceServerException, aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors += 1
                first_error = first_error or str(exc)
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await client.close()
    return _RoundResult(
        latencies_ms=latencies, errors=errors, seconds=seconds, first_error=first_error
    )


def _point(concurrency: int, rounds: Sequence[_RoundResult], target: _Target) -> LoadPoint:
    answered = [r for r in rounds if r.latencies_ms]
    if not answered:
        raise TritonError(
            "every request of a load level failed",
            details={
                "model": target.model,
                "version": target.version,
                "concurrency": concurrency,
                "error": next((r.first_error for r in rounds if r.first_error), None),
            },
        )

    def median_of(value: Callable[[_RoundResult], float]) -> float:
        return float(statistics.median(value(r) for r in answered))

    def percentile(q: float) -> Callable[[_RoundResult], float]:
        return lambda r: float(np.percentile(r.latencies_ms, q))

    return LoadPoint(
        concurrency=concurrency,
        requests=sum(len(r.latencies_ms) + r.errors for r in rounds),
        errors=sum(r.errors for r in rounds),
        throughput_rps=median_of(lambda r: len(r.latencies_ms) / r.seconds),
        p50_ms=median_of(percentile(50)),
        p95_ms=median_of(percentile(95)),
        p99_ms=median_of(percentile(99)),
    )


# --- candidates in Triton -----------------------------------------------------------------------


def config_json(pbtxt: str) -> str:
    """A ``config.pbtxt`` as the JSON Triton's load request takes as a config override."""
    message = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
    return str(json_format.MessageToJson(message))


class _Candidates:
    """Scratch models in Triton, one per configuration, loaded from files sent in the request."""

    def __init__(
        self,
        control: TritonControl,
        files: ModelFiles,
        base: ServingOptions,
        memory_probe: MemoryProbe | None,
        timeout: float,
    ) -> None:
        self._control = control
        self._files = files
        signature = serving_signature(files)
        self._spec = signature.preprocessing
        self._embedding_size = signature.embedding_size
        self._base = base
        self._probe = memory_probe
        self._timeout = timeout
        self._prefix = f"{files.name[:90]}.tune-{uuid.uuid4().hex[:8]}"
        self._loaded: dict[ServingConfig, _Target] = {}
        self._memory: dict[ServingConfig, float | None] = {}
        self._count = 0

    async def load(self, config: ServingConfig) -> _Target:
        """Load ``config`` unless it is; ``ModelLoadError`` when Triton refuses it."""
        if config in self._loaded:
            return self._loaded[config]
        self._count += 1
        name = f"{self._prefix}-{self._count}"
        options = config.apply(self._base)
        pbtxt = render_config(
            name,
            len(self._files.labels),
            [1],
            options,
            input_dims=self._spec.input_shape,
            embedding_size=self._embedding_size,
        )
        payload = {
            f"file:1/{ONNX_FILE}": self._files.onnx,
            f"file:1/{LABELS_FILE}": labels_json(self._files.labels),
        }
        if options.flavour == "python":
            payload[f"file:1/{MODEL_PY_FILE}"] = python_backend_source()
        before = await self._probe() if self._probe else None
        client = http_aio.InferenceServerClient(self._control.url, conn_timeout=self._timeout)
        try:
            await client.load_model(name, config=config_json(pbtxt), files=payload)
        except InferenceServerException as exc:
            raise ModelLoadError(
                f"Triton could not load {config.label}: {exc.message() or exc}",
                details={"model": name},
            ) from exc
        finally:
            await client.close()
        await self._control.wait_model_ready(name, "1", timeout=self._timeout)
        target = _Target(model=name, version="1")
        self._loaded[config] = target
        blank = np.zeros((1, *self._spec.input_shape), dtype=np.float32)
        await _warm_up(self._control.url, [target], [blank], 8)
        after = await self._probe() if self._probe else None
        if before is not None and after is not None:
            self._memory.setdefault(config, round(max(after - before, 0.0), 1))
        return target

    def memory_mb(self, config: ServingConfig) -> float | None:
        return self._memory.get(config)

    async def unload(self, config: ServingConfig) -> None:
        target = self._loaded.pop(config, None)
        if target is None:
            return
        await self._control.unload(target.model)
        deadline = time.monotonic() + self._timeout
        # Its instances go in the background; the next footprint must not count them.
        while await self._control.model_ready(target.model):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.05)
        await self._settle(deadline)

    async def _settle(self, deadline: float) -> None:
        """Wait until the memory probe reads steady: an unloaded model's backend processes
        end after Triton reports it gone, and the next footprint must not include them."""
        if self._probe is None:
            return
        last = await self._probe()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            now = await self._probe()
            if now is None or last is None or abs(now - last) < 1.0:
                return
            last = now

    async def unload_all(self, keep: Iterable[ServingConfig] = ()) -> None:
        kept = set(keep)
        for config in list(self._loaded):
            if config not in kept:
                await self.unload(config)


async def tune(
    triton_url: str,
    files: ModelFiles,
    images: Sequence[bytes],
    *,
    base: ServingOptions,
    grid: TuningGrid | None = None,
    constraints: Constraints | None = None,
    memory_probe: MemoryProbe | None = None,
    hardware: str | None = None,
    timeout: float = 120.0,  # noqa: ASYNC109 - bounds each load, not the tuning
) -> TuningResult:
    """Profile ``files`` (one version) in the Triton at ``triton_url`` under the grid's
    configurations and choose the golden one; see the module's docstring for the method.

    ``base`` is the deployed configuration: the baseline, and the source of every option the
    grid does not turn. ``memory_probe`` is needed for a memory limit. Scratch models are
    unloaded at the end, whatever happens.
    """
    grid = grid or TuningGrid()
    constraints = constraints or Constraints()
    if constraints.max_memory_mb is not None and memory_probe is None:
        raise InvalidInputError("a memory limit needs a way to measure memory (memory_probe)")
    tensors = _tensors(images, serving_spec(files))
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    baseline = ServingConfig.of(base)
    async with TritonControl(triton_url, timeout=timeout) as control:
        candidates = _Candidates(control, files, base, memory_probe, timeout)

        async def compare(
            incumbent: ServingConfig, challenger: ServingConfig
        ) -> tuple[Trial, Trial]:
            held = await candidates.load(incumbent)
            try:
                tried = await candidates.load(challenger)
            except ModelLoadError as error:
                _log.warning("candidate refused", config=challenger.label, reason=error.message)
                return (
                    Trial(config=incumbent, memory_mb=candidates.memory_mb(incumbent)),
                    Trial(config=challenger, error=error.message, against=incumbent),
                )
            finally:
                # Losers go once the newcomer's footprint is read: processes ending meanwhile
                # would count against it. The baseline stays for the final head-to-head.
                await candidates.unload_all(keep={baseline, incumbent, challenger})
            incumbent_points, challenger_points = await _ramp(
                triton_url, [held, tried], tensors, grid, constraints
            )
            return (
                Trial(
                    config=incumbent,
                    points=incumbent_points,
                    memory_mb=candidates.memory_mb(incumbent),
                    against=challenger,
                ),
                Trial(
                    config=challenger,
                    points=challenger_points,
                    memory_mb=candidates.memory_mb(challenger),
                    against=incumbent,
                ),
            )

        try:
            best, trials = await search(baseline, grid, constraints, compare)
            if best != baseline:
                # The search compared neighbours; the golden one must beat what is deployed.
                held, tried = await compare(baseline, best)
                trials += [held, tried]
                if not beats(tried, held, constraints, min_gain=grid.min_gain):
                    best = baseline
            else:
                measured = [trial for trial in trials if trial.config == baseline and trial.points]
                if measured:
                    held = tried = measured[-1]
                else:  # no other value to try, or every candidate was refused
                    held = tried = await _alone(
                        candidates, baseline, triton_url, tensors, grid, constraints
                    )
                    trials.append(held)
        finally:
            await candidates.unload_all()
    final = tried if best != baseline else held
    point = qualifying_point(final, constraints)
    described = hardware or describe_hardware()
    golden = (
        None
        if point is None
        else GoldenPoint(config=best, point=point, hardware=described, memory_mb=final.memory_mb)
    )
    return TuningResult(
        model_name=files.name,
        version=files.version,
        num_classes=len(files.labels),
        embedding_size=serving_signature(files).embedding_size,
        hardware=described,
        constraints=constraints,
        grid=grid,
        base=base,
        trials=trials,
        golden=golden,
        baseline=held,
        started_at=started_at,
        seconds=round(time.perf_counter() - started, 1),
    )


async def _alone(
    candidates: _Candidates,
    config: ServingConfig,
    url: str,
    tensors: Sequence[npt.NDArray[np.float32]],
    grid: TuningGrid,
    constraints: Constraints,
) -> Trial:
    """A grid with no other value to try: the baseline measured by itself."""
    target = await candidates.load(config)
    (points,) = await _ramp(url, [target], tensors, grid, constraints)
    return Trial(config=config, points=points, memory_mb=candidates.memory_mb(config))


async def _ramp(
    url: str,
    targets: Sequence[_Target],
    tensors: Sequence[npt.NDArray[np.float32]],
    grid: TuningGrid,
    constraints: Constraints,
) -> list[list[LoadPoint]]:
    """Every target at rising concurrency, interleaved, until none is worth a higher level."""
    curves: list[list[LoadPoint]] = [[] for _ in targets]
    for concurrency in sorted(grid.concurrencies):
        points = await _level(
            url, targets, tensors, concurrency, grid.requests_per_level, grid.rounds
        )
        for curve, point in zip(curves, points, strict=True):
            curve.append(point)
        if not any(keep_raising(curve, constraints, grid.min_growth) for curve in curves):
            break
    return curves


# --- hardware and memory ------------------------------------------------------------------------


def describe_hardware() -> str:
    """This machine's CPU model and core count, and its GPUs (``nvidia-smi``) if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = "no GPU"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            names = subprocess.run(  # noqa: S603 - a fixed query of the found binary
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            names = []
        found = [name.strip() for name in names if name.strip()]
        if found:
            gpus = ", ".join(f"{found.count(n)} x {n}" for n in dict.fromkeys(found))
    return f"{cpu} ({os.cpu_count() or 0} CPUs); {gpus}"


def process_group_rss_mb(group: int) -> MemoryProbe:
    """A probe summing the resident memory of process group ``group`` (a local Triton and the
    backend stubs it forks), read from ``/proc``."""
    page = os.sysconf("SC_PAGE_SIZE")

    async def probe() -> float | None:
        def read() -> float:
            total = 0
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rpartition(")")[2].split()
                except OSError:  # the process ended meanwhile
                    continue
                # After the command: state, ppid, pgrp, …; rss (pages) is the 22nd.
                if int(fields[2]) == group:
                    total += int(fields[21]) * page
            return total / 2**20

        return await asyncio.to_thread(read)

    return probe


_METRIC = re.compile(
    r"^(nv_gpu_memory_used_bytes|nv_cpu_memory_used_bytes)(\{[^}]*\})? (\S+)$", re.M
)


def metrics_memory_mb(metrics_url: str) -> MemoryProbe:
    """A probe reading Triton's Prometheus endpoint: GPU memory used plus the host's CPU
    memory used (the host's, not Triton's alone: other work on it shows up too)."""

    async def probe() -> float | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.get(metrics_url) as response,
            ):
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        values = [float(value) for _, _, value in _METRIC.findall(text)]
        return sum(values) / 2**20 if values else None

    return probe


# --- golden config in the registry --------------------------------------------------------------


def golden_config(tags: Mapping[str, str]) -> ServingConfig | None:
    """The golden knobs a version's tags carry (a ``GoldenPoint``, or only its
    ``ServingConfig``); None when it has none, or a tag that does not parse (logged)."""
    raw = tags.get(GOLDEN_TAG)
    if raw is None:
        return None
    try:
        return GoldenPoint.model_validate_json(raw).config
    except ValidationError:
        pass
    try:
        return ServingConfig.model_validate_json(raw)
    except ValidationError as error:
        _log.warning("ignoring a malformed golden tag", tag=raw[:200], error=str(error))
        return None


def golden_options(versions: Iterable[ModelVersionInfo], options: ServingOptions) -> ServingOptions:
    """``options`` with the golden knobs of the newest of ``versions`` that has them (one
    ``config.pbtxt`` serves all of a model's versions)."""
    for info in sorted(versions, key=lambda v: int(v.version), reverse=True):
        found = golden_config(info.tags)
        if found is not None:
            return found.apply(options)
    return options


def plot_png(result: TuningResult) -> bytes:
    """Throughput against p99, one line per configuration (its latest measurement, one marker
    per concurrency level); the golden point starred, the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict[ServingConfig, Trial] = {}
    for trial in [*result.trials, result.baseline]:
        if trial.points:
            latest[trial.config] = trial
    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=100)
    try:
        for config, trial in latest.items():
            is_base = config == result.baseline_config
            xs = [p.p99_ms for p in trial.points]
            ys = [p.throughput_rps for p in trial.points]
            axes.plot(
                xs,
                ys,
                marker="o",
                linestyle="--" if is_base else "-",
                label=f"{config.label}{' (deployed)' if is_base else ''}",
            )
            for point in trial.points:
                axes.annotate(
                    f"c{point.concurrency}", (point.p99_ms, point.throughput_rps), fontsize=7
                )
        if result.golden is not None:
            axes.plot(
                [result.golden.point.p99_ms],
                [result.golden.point.throughput_rps],
                marker="*",
                markersize=18,
                color="gold",
                markeredgecolor="black",
                linestyle="none",
                label=f"golden: {result.golden.config.label}",
            )
        if result.constraints.max_p99_ms is not None:
            axes.axvline(result.constraints.max_p99_ms, color="red", linewidth=1, label="p99 limit")
        if result.constraints.min_throughput_rps is not None:
            axes.axhline(
                result.constraints.min_throughput_rps,
                color="red",
                linewidth=1,
                linestyle=":",
                label="throughput floor",
            )
        axes.set_xlabel("p99 latency (ms)")
        axes.set_ylabel("throughput (requests/s)")
        axes.set_title(f"{result.model_name} v{result.version} on {result.hardware}", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def golden_document(result: TuningResult) -> dict[str, Any]:
    """What ``golden.json`` holds: the golden point, the baseline beside it, every trial."""
    return result.model_dump(mode="json") | {
        "baseline_config": result.baseline_config.model_dump(),
        "changed": result.changed,
    }


def golden_pbtxt(result: TuningResult) -> str:
    """The ``config.pbtxt`` of the golden configuration serving the tuned version."""
    if result.golden is None:
        raise InvalidInputError("no configuration met the constraints; there is no golden one")
    options = result.golden.config.apply(result.base)
    return render_config(
        result.model_name,
        result.num_classes,
        [int(result.version)],
        options,
        embedding_size=result.embedding_size,
    )


async def log_golden(registry: ModelRegistry, result: TuningResult) -> str:
    """Store the golden ``config.pbtxt``, ``golden.json`` and the plot in the version's run
    (``serving/``) and tag the version; return the artifacts' folder URI."""
    if result.golden is None:
        raise InvalidInputError("no configuration met the constraints; there is no golden one")
    golden = result.golden
    pbtxt = golden_pbtxt(result)
    document = json.dumps(golden_document(result), indent=2).encode()
    plot = await asyncio.to_thread(plot_png, result)
    uri = await registry.log_version_artifacts(
        result.model_name,
        result.version,
        {PBTXT_FILE: pbtxt.encode(), GOLDEN_FILE: document, PLOT_FILE: plot},
        artifact_path=ARTIFACT_PATH,
    )
    base_point = qualifying_point(result.baseline, result.constraints)
    tags = {
        GOLDEN_TAG: golden.model_dump_json(),
        f"{TAG_PREFIX}config_pbtxt": pbtxt[:MAX_TAG_VALUE],
        f"{TAG_PREFIX}throughput_rps": f"{golden.point.throughput_rps:.1f}",
        f"{TAG_PREFIX}p99_ms": f"{golden.point.p99_ms:.2f}",
        f"{TAG_PREFIX}concurrency": str(golden.point.concurrency),
        f"{TAG_PREFIX}memory_mb": "unknown" if golden.memory_mb is None else f"{golden.memory_mb}",
        f"{TAG_PREFIX}baseline_throughput_rps": (
            "none" if base_point is None else f"{base_point.throughput_rps:.1f}"
        ),
        f"{TAG_PREFIX}hardware": golden.hardware[:MAX_TAG_VALUE],
        f"{TAG_PREFIX}constraints": result.constraints.model_dump_json(exclude_none=True),
        f"{TAG_PREFIX}artifacts": uri[:MAX_TAG_VALUE],
        f"{TAG_PREFIX}tuned_at": result.started_at.isoformat(),
    }
    await registry.set_tags(result.model_name, result.version, tags)
    return uri
