"""The validator's use cases: plain async methods over the ports.

Judging a candidate reads S3 and MLflow and runs both models for seconds, so it all happens
before any transaction. Outages raise retryable errors and the event is redelivered with nothing
recorded; a candidate whose files are missing or broken is judged ``failed`` with the reason, so
a bad model never turns into a crash loop. The registry is told the verdict (tags, and the
``challenger`` alias on a pass) before the transaction that claims the event, stores the
validation and queues ``model.validated``: both registry writes are idempotent, so a redelivery
after a failed commit repeats them harmlessly, and a consumer of ``model.validated`` always finds
the alias already in place.

Once a candidate has been scored, its drift reference (predictions, embeddings and image
statistics on the same TEST images) is written for data-monitor. It is a by-product of the
validation, not part of the verdict: a failure to write it is logged and the validation goes on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import structlog

from flywheel_clients.registry import CHALLENGER, CHAMPION, ModelFiles
from flywheel_contracts import ModelTrainedV1, ModelValidatedV1
from flywheel_contracts.events import (
    ModelTrainedPayload,
    ModelValidatedPayload,
    ValidationVerdict,
)
from flywheel_runtime.errors import FlywheelError, InvalidInputError, NotFoundError
from flywheel_serving.tuning import GOLDEN_TAG, ServingConfig, golden_config
from flywheel_validator.errors import (
    ModelUnusableError,
    ServingRefusedError,
    ValidationNotFoundError,
)
from flywheel_validator.gates import (
    GateResult,
    Gates,
    ModelScore,
    check_gates,
    gates_for,
    too_few_images,
)
from flywheel_validator.performance import (
    GATE,
    PerformanceGate,
    PerformanceOutcome,
    check_performance,
    not_measured,
)
from flywheel_validator.ports import (
    Benchmark,
    Evaluator,
    HeldOutSplit,
    LabeledImage,
    ReferenceStore,
    Registry,
    ServedModel,
    SplitReader,
    Store,
    Validation,
)

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

TAG_PREFIX: Final = "validation."
"""Prefix of the version tags that record a verdict."""

TAGGED_METRICS: Final = (
    "accuracy",
    "macro_f1",
    "min_class_recall",
    "latency_p95_ms",
    "model_size_bytes",
    "parity_max_abs_diff",
    "serving_rps",
    "serving_p99_ms",
)
"""Headline numbers copied into version tags; the full set is in the event and the API."""

MAX_TAG_VALUE: Final = 5000
"""MLflow's limit on a tag value; longer reasons are cut."""

# Artifacts that are missing or unreadable: the model's fault, never retried.
_BAD_ARTIFACTS = (NotFoundError, InvalidInputError)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Assessment:
    """What the gates concluded about one candidate."""

    verdict: ValidationVerdict
    reasons: list[str]
    test_images: int = 0
    champion_version: str | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def failed(cls, reason: str, *, test_images: int = 0) -> Assessment:
        """A verdict reached before any model was scored."""
        return cls(ValidationVerdict.FAILED, [reason], test_images=test_images)


class Validator:
    """Judges every trained version against the champion and records the verdict."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        splits: SplitReader,
        evaluator: Evaluator,
        *,
        default_gates: Gates,
        project_gates: Mapping[str, Gates] | None = None,
        champion_alias: str = CHAMPION,
        challenger_alias: str = CHALLENGER,
        performance: PerformanceGate | None = None,
        benchmark: Benchmark | None = None,
        benchmark_images: int = 64,
        references: ReferenceStore | None = None,
        clock: Clock = utcnow,
    ) -> None:
        """``performance`` turns the performance gate on (None: verdicts have no such line);
        without a ``benchmark`` (no Triton configured) the gate reports itself skipped.
        ``references`` is where candidates' drift references go (None: none are written)."""
        self._store = store
        self._registry = registry
        self._splits = splits
        self._evaluator = evaluator
        self._default_gates = default_gates
        self._project_gates = dict(project_gates or {})
        self._champion_alias = champion_alias
        self._challenger_alias = challenger_alias
        self._performance = performance
        self._benchmark = benchmark
        self._benchmark_images = benchmark_images
        self._references = references
        self._clock = clock

    def gates_for(self, project_id: str) -> Gates:
        """The gates in force for a project: the defaults with its override applied."""
        return gates_for(project_id, self._default_gates, self._project_gates)

    # --- events ---------------------------------------------------------------------------

    async def model_trained(self, event: ModelTrainedV1) -> Validation | None:
        """Reacts to model.trained: scores candidate and champion on the TEST split, applies
        the gates, tags the version (and aliases it ``challenger`` on a pass); emits
        model.validated. Returns None when the event was already handled."""
        trained = event.payload
        bound = log.bind(
            registered_model=trained.registered_model, model_version=trained.model_version
        )
        # A cheap early look spares a redelivery the downloads and the scoring; the claim in
        # the transaction below is what actually guarantees one validation per event.
        if await self._store.by_event(event.event_id) is not None:
            bound.info("model.trained already validated")
            return None
        started = time.perf_counter()
        gates = self.gates_for(trained.project_id)
        assessment = await self._assess(trained, gates)
        await self._tell_registry(event, assessment)
        outgoing = event.caused(
            ModelValidatedV1,
            ModelValidatedPayload(
                project_id=trained.project_id,
                model_line=trained.model_line,
                registered_model=trained.registered_model,
                model_version=trained.model_version,
                champion_version=assessment.champion_version,
                snapshot_id=trained.snapshot_id,
                verdict=assessment.verdict,
                candidate_metrics=assessment.candidate_metrics,
                champion_metrics=assessment.champion_metrics,
                reasons=assessment.reasons,
            ),
        )
        validation = Validation(
            validation_id=uuid.uuid4(),
            event_id=event.event_id,
            correlation_id=event.correlation_id,
            validated_event_id=outgoing.event_id,
            project_id=trained.project_id,
            model_line=trained.model_line,
            registered_model=trained.registered_model,
            model_version=trained.model_version,
            champion_version=assessment.champion_version,
            snapshot_id=trained.snapshot_id,
            verdict=assessment.verdict,
            test_images=assessment.test_images,
            candidate_metrics=assessment.candidate_metrics,
            champion_metrics=assessment.champion_metrics,
            reasons=assessment.reasons,
            gates=gates,
            created_at=self._clock(),
            duration_s=time.perf_counter() - started,
        )
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                bound.info("model.trained validated meanwhile by another consumer")
                return None
            await tx.add(validation)
            await tx.emit(outgoing)
        bound.info(
            "model validated",
            verdict=assessment.verdict.value,
            champion_version=assessment.champion_version,
            validation_id=str(validation.validation_id),
            reasons=assessment.reasons,
        )
        return validation

    # --- read API -------------------------------------------------------------------------

    async def validation(self, validation_id: uuid.UUID) -> Validation:
        """One validation; ``ValidationNotFoundError`` when there is none with that id."""
        found = await self._store.get(validation_id)
        if found is None:
            raise ValidationNotFoundError(
                "validation not found", details={"validation_id": str(validation_id)}
            )
        return found

    async def validations(self, model_line: str | None, limit: int) -> Sequence[Validation]:
        """Validations, newest first, of one model line or of all."""
        return await self._store.recent(model_line, limit)

    # --- steps ----------------------------------------------------------------------------

    async def _assess(self, trained: ModelTrainedPayload, gates: Gates) -> Assessment:
        name, version = trained.registered_model, trained.model_version
        try:
            candidate_files = await self._registry.download_model_files(name, version)
        except _BAD_ARTIFACTS as error:
            return Assessment.failed(
                f"candidate version {version} artifacts unusable ({error.message}): fail"
            )
        champion = await self._registry.get_alias(name, self._champion_alias)
        try:
            split = await self._splits.test_split(
                trained.project_id,
                trained.snapshot_id,
                excluded=frozenset(trained.excluded_label_ids),
                with_validation=self._references is not None,
            )
        except NotFoundError as error:
            return Assessment.failed(
                f"test split of snapshot {trained.snapshot_id} unreadable ({error.message}): fail"
            )
        notes = _split_notes(split)
        if (small := too_few_images(len(split.images), gates)) is not None:
            return Assessment.failed(small.reason, test_images=len(split.images))
        try:
            candidate = await self._evaluator.score(candidate_files, split.images)
        except ModelUnusableError as error:
            return Assessment.failed(
                f"candidate version {version} does not run on onnxruntime ({error.message}): fail",
                test_images=len(split.images),
            )
        parity = await self._evaluator.parity(candidate_files, split.images)
        notes += _unknown_note("candidate", candidate)
        await self._write_reference(trained, candidate_files, split.images + split.validation)

        champion_score: ModelScore | None = None
        champion_version: str | None = None
        champion_files: ModelFiles | None = None
        if champion is not None and champion.version != version:
            try:
                champion_files = await self._registry.download_model_files(name, champion.version)
                champion_score = await self._evaluator.score(champion_files, split.images)
            except (*_BAD_ARTIFACTS, ModelUnusableError) as error:
                # A broken champion must not block every successor: judge on the floors and
                # say so, so an operator sees why no comparison happened.
                notes.append(
                    f"champion version {champion.version} unusable ({error.message}); "
                    "absolute floors apply"
                )
            else:
                champion_version = champion.version
                notes += _unknown_note("champion", champion_score)

        results = check_gates(gates, candidate, champion_score, parity)
        candidate_metrics = candidate.metrics()
        champion_metrics = {} if champion_score is None else champion_score.metrics()
        performance, measured = await self._compare_serving(
            candidate_files,
            None if champion_version is None else champion_files,
            split.images,
            failed=not all(result.passed for result in results),
        )
        if performance is not None:
            results.append(performance.result)
            candidate_metrics |= performance.candidate_metrics
            champion_metrics |= performance.champion_metrics
        notes += measured
        verdict = (
            ValidationVerdict.PASSED
            if all(result.passed for result in results)
            else ValidationVerdict.FAILED
        )
        if parity.max_abs_diff is not None:
            candidate_metrics["parity_max_abs_diff"] = parity.max_abs_diff
        return Assessment(
            verdict=verdict,
            reasons=[result.reason for result in results] + notes,
            test_images=len(split.images),
            champion_version=champion_version,
            candidate_metrics=candidate_metrics,
            champion_metrics=champion_metrics,
        )

    async def _write_reference(
        self, trained: ModelTrainedPayload, files: ModelFiles, images: list[LabeledImage]
    ) -> None:
        """Write the candidate's drift reference on the held-out images (TEST and VALIDATION:
        images it did not train on look to it as production's should); a failure only warns.

        Drift checks of this version start without a reference until it exists, which costs
        less than holding up (or redelivering) a verdict the canary waits for.
        """
        if self._references is None:
            return
        bound = log.bind(model_line=trained.model_line, model_version=trained.model_version)
        try:
            reference = await self._evaluator.describe(files, images)
            key = await self._references.put(trained.model_line, trained.model_version, reference)
        except FlywheelError as error:
            bound.warning("drift reference not written", error_code=error.code, error=error.message)
            return
        bound.info(
            "drift reference written",
            key=key,
            images=len(reference.predicted),
            embedding_size=None if reference.embeddings is None else reference.embeddings.shape[1],
        )

    async def _compare_serving(
        self,
        candidate: ModelFiles,
        champion: ModelFiles | None,
        images: list[LabeledImage],
        *,
        failed: bool,
    ) -> tuple[PerformanceOutcome | None, list[str]]:
        """The performance gate's outcome (None when it is off) and a note on how it measured.

        It runs last and only for a candidate that passed every other gate: loading both
        versions and driving them takes Triton for seconds, wasted on a verdict already failed.
        """
        if self._performance is None:
            return None, []

        def skipped(cause: str) -> tuple[PerformanceOutcome, list[str]]:
            return PerformanceOutcome(not_measured(cause), {}, {}), []

        if champion is None:
            return skipped("no champion to compare with")
        if failed:
            return skipped("the candidate failed another gate")
        if self._benchmark is None:
            return skipped("no Triton configured")
        candidate_config, champion_config = await asyncio.gather(
            self._golden(candidate), self._golden(champion)
        )
        try:
            run = await self._benchmark.compare(
                ServedModel("candidate", candidate, candidate_config),
                ServedModel("champion", champion, champion_config),
                [image.data for image in images[: self._benchmark_images]],
            )
        except ServingRefusedError as error:
            if error.details.get("role") == "champion":
                # As with a champion that does not score: no comparison, and say why.
                return skipped(
                    f"champion version {champion.version} does not load in Triton: {error.message}"
                )
            refused = GateResult(
                gate=GATE,
                passed=False,
                reason=f"{GATE}: candidate does not load in Triton ({error.message}): fail",
            )
            return PerformanceOutcome(refused, {}, {}), []
        outcome = check_performance(self._performance, run.candidate, run.champion)
        return outcome, [f"{GATE} measured on {run.hardware}: {run.description}"]

    async def _golden(self, files: ModelFiles) -> ServingConfig | None:
        """The golden serving configuration the tuner recorded on the version, if any."""
        try:
            info = await self._registry.get_version(files.name, files.version)
        except NotFoundError:
            return None
        # The tuner's tag (``flywheel tune``); one that does not parse is logged and ignored.
        return golden_config(info.tags) if GOLDEN_TAG in info.tags else None

    async def _tell_registry(self, event: ModelTrainedV1, assessment: Assessment) -> None:
        """Record the verdict on the version; alias it as the challenger when it passed."""
        trained = event.payload
        name, version = trained.registered_model, trained.model_version
        tags = {
            f"{TAG_PREFIX}verdict": assessment.verdict.value,
            f"{TAG_PREFIX}champion_version": assessment.champion_version or "none",
            f"{TAG_PREFIX}snapshot_id": trained.snapshot_id,
            f"{TAG_PREFIX}test_images": str(assessment.test_images),
            f"{TAG_PREFIX}event_id": str(event.event_id),
            f"{TAG_PREFIX}reasons": "\n".join(assessment.reasons)[:MAX_TAG_VALUE],
        } | {
            f"{TAG_PREFIX}{metric}": f"{assessment.candidate_metrics[metric]:.6g}"
            for metric in TAGGED_METRICS
            if metric in assessment.candidate_metrics
        }
        try:
            await self._registry.set_tags(name, version, tags)
        except NotFoundError:
            # The version itself is gone: there is nothing to tag or alias, but the verdict
            # (failed, its artifacts unusable) still goes out as an event.
            log.warning("candidate version not in the registry; verdict not tagged")
            return
        if assessment.verdict is ValidationVerdict.PASSED:
            await self._registry.set_alias(name, self._challenger_alias, version)


def _split_notes(split: HeldOutSplit) -> list[str]:
    if not split.undecodable:
        return []
    return [f"{split.undecodable} test images are not decodable and were left out"]


def _unknown_note(role: str, score: ModelScore) -> list[str]:
    if not score.unknown_class_images:
        return []
    names = ", ".join(repr(name) for name in score.unknown_classes)
    return [
        f"{role} does not know the classes {names} of {score.unknown_class_images} test images; "
        "scored as errors"
    ]
