"""The predict core and the routing use cases: plain async methods over the ports.

``Predictor`` is the one object every front calls (``/predict``, ``/predict/batch``, batch jobs,
Label Studio): images in, ranked classes out, each prediction logged. It reads the image, picks
the version (pinned, by routing key, or by the prediction's random bucket), checks the cache,
runs the shared ``preprocess`` with the preprocessing each version declared (its ``model.json``;
the MNIST reference for versions without), sends each version's images to Triton in chunks,
applies softmax
and keeps the top k. An image the client got wrong fails alone (its ``ItemFailure`` names the
field); serving trouble fails the call with a 503/504 and every affected image is logged as an
error, marked ``serving_unavailable`` when Triton could not be reached at all.

``Routing`` applies ``rollout.step``, ``canary.verdict`` and ``project.configured`` and answers
which version serves a request; without weights the registry's champion alias does, read with a
TTL and reused while the registry is unreachable.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog
from PIL import Image
from pydantic import ValidationError

from flywheel_clients.registry import CHAMPION
from flywheel_contracts import (
    CanaryVerdictV1,
    InferenceLoggedV1,
    ProjectConfiguredV1,
    RolloutStepV1,
)
from flywheel_contracts.datasets import image_key
from flywheel_contracts.events import InferenceLoggedPayload
from flywheel_inference_bff.errors import (
    FieldError,
    InferenceUnreachableError,
    InvalidImageError,
    ModelLineNotFoundError,
    ModelUnusableError,
)
from flywheel_inference_bff.inputs import ImageBytes, ImageRef, StoredImage, check_image
from flywheel_inference_bff.metrics import BffMetrics
from flywheel_inference_bff.ports import (
    Images,
    Inference,
    InferenceLog,
    Inputs,
    PredictionCache,
    Registry,
    RouteStore,
)
from flywheel_inference_bff.routing import (
    BUCKETS,
    LineRoute,
    RoutingTable,
    bucket_for_id,
    bucket_for_key,
    route_from_step,
    route_from_verdict,
)
from flywheel_inference_bff.scoring import ClassScore, softmax, top_k
from flywheel_runtime.errors import (
    DependencyUnavailableError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
)
from flywheel_vision.contract import signature_or_reference
from flywheel_vision.preprocess import PreprocessSpec, image_statistics, preprocess

log = structlog.get_logger(__name__)

Route = Literal["online", "batch"]
Clock = Callable[[], float]

INLINE_PREPROCESS_BYTES = 256 * 1024
"""Below this many image bytes in a call, decoding runs on the event loop: a thread hop costs
more than decoding a few small images."""


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One servable version: the registered (and Triton) model and its version."""

    model_line: str
    registered_model: str
    version: str


@dataclass(frozen=True)
class PredictOptions:
    model_line: str
    top_k: int
    routing_key: str | None = None
    """Sticky routing: the same key gets the same version while the weights hold."""
    route: Route = "online"
    target: Target | None = None
    """Pin every image to this version (batch jobs); routing is skipped."""


@dataclass(frozen=True)
class Prediction:
    prediction_id: uuid.UUID
    model_line: str
    registered_model: str
    model_version: str
    classes: list[ClassScore]
    """The top k, best first."""
    input_sha256: str
    latency_ms: float
    cached: bool = False
    statistics: dict[str, float | int] | None = field(default=None, repr=False, compare=False)
    embedding: list[float] | None = field(default=None, repr=False, compare=False)

    @property
    def predicted_class(self) -> str:
        return self.classes[0].class_name

    @property
    def confidence(self) -> float:
        return self.classes[0].score


@dataclass(frozen=True)
class ItemFailure:
    """One image the client got wrong; the others of the call go on."""

    index: int
    error: FieldError
    prediction_id: uuid.UUID
    input_sha256: str | None = None


Outcome = Prediction | ItemFailure


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    chunk: int = 64
    """Most images in one Triton call."""
    read_concurrency: int = 16
    """Images read from S3 at once for one call."""


@dataclass
class _Item:
    index: int
    field: str
    prediction_id: uuid.UUID
    target: Target
    data: bytes | None = None
    sha256: str | None = None
    tensor: npt.NDArray[np.float32] | None = None
    probabilities: list[float] | None = None
    cached: bool = False
    error: FieldError | None = None
    statistics: dict[str, float | int] | None = None
    embedding: list[float] | None = None


# --- routing ------------------------------------------------------------------------------------


@dataclass
class _CachedChampion:
    version: str | None
    read_at: float


class Routing:
    """Routing weights and projects from events; which version serves a request."""

    def __init__(
        self,
        registry: Registry,
        store: RouteStore,
        *,
        registered_models: Mapping[str, str] | None = None,
        project_ids: Mapping[str, str] | None = None,
        champion_alias: str = CHAMPION,
        champion_cache_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._registry = registry
        self._store = store
        self._table = RoutingTable()
        self._registered_models = dict(registered_models or {})
        self._projects = dict(project_ids or {})
        self._project_revisions: dict[str, int] = {}
        self._champion_alias = champion_alias
        self._champion_cache_s = champion_cache_s
        self._clock = clock
        self._champions: dict[str, _CachedChampion] = {}
        self._champion_locks: dict[str, asyncio.Lock] = {}

    # --- events -------------------------------------------------------------------------------

    async def rollout_step(self, event: RolloutStepV1) -> bool:
        """Reacts to rollout.step: the candidate gets traffic_percent from now on (newest wins)."""
        return await self._apply(route_from_step(event))

    async def canary_verdict(self, event: CanaryVerdictV1) -> bool:
        """Reacts to canary.verdict: promoted → the candidate serves 100 %; rolled back → the
        champion does."""
        return await self._apply(route_from_verdict(event))

    async def project_configured(self, event: ProjectConfiguredV1) -> bool:
        """Reacts to project.configured: remembers which project a model line belongs to."""
        project = event.payload
        if project.revision <= self._project_revisions.get(project.project_id, 0):
            return False
        self._project_revisions[project.project_id] = project.revision
        self._projects[project.model_line] = project.project_id
        await _best_effort(self._store.save_project(project.model_line, project.project_id))
        return True

    async def restore(self) -> None:
        """Take the routes and projects other replicas stored (a replica starting mid-canary)."""
        try:
            routes = await self._store.load_routes()
            projects = await self._store.load_projects()
        except DependencyUnavailableError:
            log.warning("stored routes not read: database unavailable; using the champions")
            return
        for route in routes:
            self._table.apply(route)
        for model_line, project_id in projects.items():
            self._projects.setdefault(model_line, project_id)

    async def _apply(self, route: LineRoute) -> bool:
        if not self._table.apply(route):
            log.info("stale routing event ignored", model_line=route.model_line)
            return False
        log.info(
            "routing weights applied",
            model_line=route.model_line,
            champion_version=route.champion_version,
            candidate_version=route.candidate_version,
            candidate_percent=route.candidate_percent,
        )
        await _best_effort(self._store.save_route(route))
        return True

    # --- queries ------------------------------------------------------------------------------

    def route(self, model_line: str) -> LineRoute | None:
        return self._table.get(model_line)

    def routes(self) -> list[LineRoute]:
        return self._table.routes()

    def project_for(self, model_line: str) -> str:
        return self._projects.get(model_line, model_line)

    def registered_model(self, model_line: str) -> str:
        route = self._table.get(model_line)
        if route is not None:
            return route.registered_model
        return self._registered_models.get(model_line, model_line)

    async def target(self, model_line: str, bucket: int) -> Target:
        """The version serving a request of ``model_line`` that fell into ``bucket``."""
        name = self.registered_model(model_line)
        route = self._table.get(model_line)
        version = None if route is None else route.version_for(bucket)
        if version is None:
            version = await self._champion(name)
        if version is None and route is not None:
            # No champion anywhere yet: the candidate is the only version there is.
            version = route.candidate_version
        if version is None:
            raise ModelLineNotFoundError(model_line)
        return Target(model_line, name, version)

    async def champion(self, model_line: str) -> Target:
        """The version serving the traffic no candidate gets (what batch jobs pin)."""
        return await self.target(model_line, BUCKETS - 1)

    async def _champion(self, name: str) -> str | None:
        cached = self._champions.get(name)
        if cached is not None and self._clock() - cached.read_at < self._champion_cache_s:
            return cached.version
        lock = self._champion_locks.setdefault(name, asyncio.Lock())
        async with lock:
            cached = self._champions.get(name)
            if cached is not None and self._clock() - cached.read_at < self._champion_cache_s:
                return cached.version
            try:
                found = await self._registry.get_alias(name, self._champion_alias)
            except DependencyUnavailableError:
                if cached is None:
                    raise
                log.warning("registry unavailable: serving the last known champion", model=name)
                return cached.version
            version = None if found is None else found.version
            self._champions[name] = _CachedChampion(version, self._clock())
            return version


async def _best_effort(saving: Awaitable[None]) -> None:
    # Every replica holds the routing state in memory already; the stored copy only seeds
    # replicas that start later, so an unreachable database must not make the broker redeliver.
    try:
        await saving
    except DependencyUnavailableError:
        log.warning("routing state not stored: database unavailable")


# --- prediction ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedVersion:
    """What serving needs to know about one version besides its weights (Triton has those)."""

    labels: list[str]
    """Class names in output order."""
    preprocessing: PreprocessSpec
    """How its images are prepared, as its ``model.json`` declares."""
    embedding: bool = False
    """Whether it declares an embedding output (asked for, and logged, for drift checks)."""


class ServedVersions:
    """Class names and preprocessing per version, read once from the registry (a version
    never changes)."""

    def __init__(self, registry: Registry, max_entries: int = 256) -> None:
        self._registry = registry
        self._max_entries = max_entries
        self._versions: dict[tuple[str, str], ServedVersion] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def of(self, target: Target) -> ServedVersion:
        key = (target.registered_model, target.version)
        found = self._versions.get(key)
        if found is not None:
            return found
        async with self._locks.setdefault(key, asyncio.Lock()):
            found = self._versions.get(key)
            if found is not None:
                return found
            details = {"model": target.registered_model, "version": target.version}
            try:
                labels, model_json = await self._registry.download_serving_files(*key)
            except NotFoundError as error:
                raise ModelUnusableError(
                    f"version {target.version} of {target.registered_model!r} has no class "
                    "names in the registry",
                    details=details,
                ) from error
            try:
                signature = signature_or_reference(model_json, len(labels))
            except InvalidInputError as error:
                raise ModelUnusableError(
                    f"version {target.version} of {target.registered_model!r} declares no "
                    f"usable preprocessing: {error.message}",
                    details=details,
                ) from error
            served = ServedVersion(
                labels, signature.preprocessing, embedding=signature.embedding is not None
            )
            if len(self._versions) >= self._max_entries:
                self._versions.pop(next(iter(self._versions)))
            self._versions[key] = served
            self._locks.pop(key, None)
            return served


class Predictor:
    """Images in, ranked classes out; the one core behind every front.

    ``cache`` None means no prediction cache: nothing is looked up nor written.
    """

    def __init__(
        self,
        routing: Routing,
        inference: Inference,
        versions: ServedVersions,
        images: Images,
        cache: PredictionCache | None,
        inference_log: InferenceLog,
        *,
        limits: Limits | None = None,
        metrics: BffMetrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        drift_features: bool = False,
        inputs: Inputs | None = None,
    ) -> None:
        self._drift_features = drift_features
        self._inputs = inputs
        self._routing = routing
        self._inference = inference
        self._versions = versions
        self._images = images
        self._cache = cache
        self._log = inference_log
        self._limits = limits or Limits()
        self._metrics = metrics or BffMetrics.create()
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()

    @property
    def routing(self) -> Routing:
        return self._routing

    async def predict(self, image: ImageRef, options: PredictOptions) -> Prediction:
        """One image; a client mistake raises its ``FieldError``."""
        [outcome] = await self.predict_many([image], options)
        if isinstance(outcome, ItemFailure):
            raise outcome.error
        return outcome

    async def predict_many(
        self, images: Sequence[ImageRef], options: PredictOptions
    ) -> list[Outcome]:
        """Every image, in order; each either a ``Prediction`` or the ``ItemFailure`` saying
        what was wrong with it. Serving trouble (Triton, registry) raises for the whole call."""
        started = time.perf_counter()
        ids = [uuid.uuid4() for _ in images]
        targets = await self._choose_targets(ids, options)
        items = [
            _Item(index, ref.field, prediction_id, target)
            for index, (ref, prediction_id, target) in enumerate(
                zip(images, ids, targets, strict=True)
            )
        ]
        await self._read(images, items)
        for item in items:
            if item.data is not None:
                item.sha256 = hashlib.sha256(item.data).hexdigest()
                self._check(item, item.data)
        try:
            served = {t: await self._versions.of(t) for t in set(targets)}
            labels = {t: version.labels for t, version in served.items()}
            pending = [i for i in items if i.error is None]
            await self._from_cache(pending, labels)
            await self._preprocess([i for i in pending if i.probabilities is None], served)
            await self._infer([i for i in pending if i.error is None and not i.cached], served)
        except FlywheelError as error:
            latency = _ms_since(started)
            unreachable = isinstance(error, InferenceUnreachableError)
            for item in items:
                if item.error is None:
                    self._record_error(
                        item, options, error.code, latency, serving_unavailable=unreachable
                    )
            raise
        latency = _ms_since(started)
        outcomes: list[Outcome] = []
        for item in items:
            if item.error is not None or item.probabilities is None:
                failed = item.error or InvalidImageError("image was not scored", field=item.field)
                self._record_error(item, options, failed.code, latency)
                outcomes.append(ItemFailure(item.index, failed, item.prediction_id, item.sha256))
                continue
            prediction = Prediction(
                prediction_id=item.prediction_id,
                model_line=options.model_line,
                registered_model=item.target.registered_model,
                model_version=item.target.version,
                classes=top_k(item.probabilities, labels[item.target], options.top_k),
                input_sha256=item.sha256 or "",
                latency_ms=latency,
                cached=item.cached,
                statistics=item.statistics,
                embedding=item.embedding,
            )
            self._record_ok(prediction, options, item.data)
            outcomes.append(prediction)
        return outcomes

    async def close(self) -> None:
        """Wait for cache writes still in flight."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # --- steps --------------------------------------------------------------------------------

    async def _read(self, images: Sequence[ImageRef], items: list[_Item]) -> None:
        gate = asyncio.Semaphore(self._limits.read_concurrency)

        async def read(ref: StoredImage, item: _Item) -> None:
            async with gate:
                try:
                    item.data = await self._images.read(
                        ref.key, max_bytes=self._limits.max_image_bytes, field=ref.field
                    )
                except FieldError as error:
                    item.error = error

        reads = []
        for ref, item in zip(images, items, strict=True):
            if isinstance(ref, ImageBytes):
                item.data = ref.data
            else:
                reads.append(read(ref, item))
        if reads:
            await asyncio.gather(*reads)

    def _check(self, item: _Item, data: bytes) -> None:
        try:
            check_image(
                data,
                max_bytes=self._limits.max_image_bytes,
                max_pixels=self._limits.max_image_pixels,
                field=item.field,
            )
        except FieldError as error:
            item.error = error

    async def _choose_targets(self, ids: list[uuid.UUID], options: PredictOptions) -> list[Target]:
        line = options.model_line
        if options.target is not None:
            return [options.target] * len(ids)
        if options.routing_key is not None:
            target = await self._routing.target(line, bucket_for_key(line, options.routing_key))
            return [target] * len(ids)
        return [await self._routing.target(line, bucket_for_id(i)) for i in ids]

    async def _from_cache(self, items: list[_Item], labels: Mapping[Target, list[str]]) -> None:
        if not items or self._cache is None:
            return
        found = await self._cache.get([_cache_key(i) for i in items])
        for item, probabilities in zip(items, found, strict=True):
            if probabilities is not None and len(probabilities) == len(labels[item.target]):
                item.probabilities = probabilities
                item.cached = True

    async def _preprocess(self, items: list[_Item], served: Mapping[Target, ServedVersion]) -> None:
        if not items:
            return
        statistics = self._drift_features
        if sum(len(i.data or b"") for i in items) <= INLINE_PREPROCESS_BYTES:
            _preprocess_items(items, served, statistics=statistics)
        else:
            await asyncio.to_thread(_preprocess_items, items, served, statistics=statistics)

    async def _infer(self, items: list[_Item], served: Mapping[Target, ServedVersion]) -> None:
        by_target: dict[Target, list[_Item]] = {}
        for item in items:
            by_target.setdefault(item.target, []).append(item)
        chunks = [
            (target, group[start : start + self._limits.chunk])
            for target, group in by_target.items()
            for start in range(0, len(group), self._limits.chunk)
        ]
        if len(chunks) == 1:
            # The common case, one image or one small batch: gather would wrap the call in a
            # task of its own, a scheduling round trip per request for nothing.
            ((target, chunk),) = chunks
            await self._infer_chunk(target, chunk, served[target])
        else:
            results = await asyncio.gather(
                *(self._infer_chunk(target, chunk, served[target]) for target, chunk in chunks),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        if self._cache is None:
            return
        fresh = {_cache_key(i): i.probabilities for i in items if i.probabilities is not None}
        if fresh:
            # Written in the background: the answer does not wait for the cache.
            self._spawn(self._cache.put(fresh))

    async def _infer_chunk(self, target: Target, chunk: list[_Item], served: ServedVersion) -> None:
        labels = served.labels
        batch = np.stack([i.tensor for i in chunk if i.tensor is not None])
        embeddings = None
        if self._drift_features and served.embedding:
            logits, embeddings = await self._inference.infer_embedded(
                target.registered_model, target.version, batch, embedding=True
            )
        else:
            logits = await self._inference.infer(target.registered_model, target.version, batch)
        if logits.ndim != 2 or logits.shape != (len(chunk), len(labels)):
            raise ModelUnusableError(
                f"version {target.version} of {target.registered_model!r} answered logits of "
                f"shape {list(logits.shape)} for {len(chunk)} images of {len(labels)} classes",
                details={"model": target.registered_model, "version": target.version},
            )
        for item, row in zip(chunk, softmax(logits), strict=True):
            item.probabilities = [float(p) for p in row]
        if embeddings is not None and embeddings.ndim == 2 and len(embeddings) == len(chunk):
            for item, vector in zip(chunk, embeddings, strict=True):
                # Four decimals: drift compares distributions, and the log stays small.
                item.embedding = [round(float(v), 4) for v in vector]

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- logging ------------------------------------------------------------------------------

    def _record_ok(
        self, prediction: Prediction, options: PredictOptions, data: bytes | None = None
    ) -> None:
        self._metrics.predictions.labels(
            prediction.model_line, prediction.model_version, "ok"
        ).inc()
        if not self._log.enabled:
            return
        input_key = None
        if self._inputs is not None and data is not None and options.route == "online":
            input_key = image_key(prediction.input_sha256)
            self._spawn(_keep_input(self._inputs, prediction.input_sha256, data))
        self._offer(
            {
                "image_stats": prediction.statistics,
                "embedding": prediction.embedding,
                "input_key": input_key,
                "request_id": prediction.prediction_id,
                "project_id": self._routing.project_for(prediction.model_line),
                "model_line": prediction.model_line,
                "registered_model": prediction.registered_model,
                "model_version": prediction.model_version,
                "input_sha256": prediction.input_sha256,
                "predicted_class": prediction.predicted_class,
                "confidence": min(1.0, max(0.0, prediction.confidence)),
                "latency_ms": prediction.latency_ms,
                "status": "ok",
                "route": options.route,
                "served_at": self._clock(),
            }
        )

    def _record_error(
        self,
        item: _Item,
        options: PredictOptions,
        code: str,
        latency_ms: float,
        *,
        serving_unavailable: bool = False,
    ) -> None:
        version = item.target.version
        self._metrics.predictions.labels(options.model_line, version, f"error:{code}").inc()
        # A log names the image by its hash: one that never arrived has nothing to name.
        if not self._log.enabled or item.sha256 is None:
            return
        self._offer(
            {
                "request_id": item.prediction_id,
                "project_id": self._routing.project_for(options.model_line),
                "model_line": options.model_line,
                "registered_model": item.target.registered_model,
                "model_version": version,
                "input_sha256": item.sha256,
                "latency_ms": latency_ms,
                "status": "error",
                "error_code": code,
                "route": options.route,
                "served_at": self._clock(),
                "serving_unavailable": serving_unavailable,
            }
        )

    def _offer(self, payload: dict[str, object]) -> None:
        try:
            event = InferenceLoggedV1(payload=InferenceLoggedPayload.model_validate(payload))
        except ValidationError:
            # A project id that is not a slug, say: counted, never a failed request.
            self._metrics.logs_dropped.labels("invalid").inc()
            log.warning("inference log not valid; dropped", model_line=payload.get("model_line"))
            return
        self._log.offer(event)


def _preprocess_items(
    items: list[_Item], served: Mapping[Target, ServedVersion], *, statistics: bool = False
) -> None:
    for item in items:
        if item.data is None:
            continue
        try:
            # Decoded once for both: the tensor and the statistics drift compares.
            picture = Image.open(io.BytesIO(item.data))
            picture.load()
            item.tensor = preprocess(picture, served[item.target].preprocessing)
            if statistics:
                item.statistics = image_statistics(picture)
        except (FlywheelError, OSError, ValueError, Image.DecompressionBombError) as error:
            # The header was readable (checked before), the pixels are not: truncated, corrupt.
            item.error = InvalidImageError("image is truncated or corrupt", field=item.field)
            item.error.__cause__ = error


async def _keep_input(inputs: Inputs, sha256: str, data: bytes) -> None:
    """Keep an answered image for labeling; its log names the key either way (a lost one
    only costs the labelers that image)."""
    try:
        await inputs.keep(sha256, data)
    except FlywheelError as error:
        log.warning("input not kept for labeling", input_sha256=sha256, error=error.code)


def _cache_key(item: _Item) -> str:
    return f"{item.target.registered_model}:{item.target.version}:{item.sha256}"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
