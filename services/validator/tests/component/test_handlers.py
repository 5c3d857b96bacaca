import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest
import structlog
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker, TestRabbitBroker

from flywheel_clients.registry import ModelFiles, ModelVersionInfo
from flywheel_contracts import Event, ModelTrainedV1, ModelValidatedV1
from flywheel_contracts.events import ValidationVerdict
from flywheel_runtime.drift_reference import DriftReference
from flywheel_runtime.errors import (
    DependencyUnavailableError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
)
from flywheel_runtime.http import install_error_handlers
from flywheel_runtime.messaging import create_broker, is_retryable
from flywheel_runtime.topology import Topology
from flywheel_serving.tuning import GOLDEN_TAG, GoldenPoint, LoadPoint, ServingConfig
from flywheel_validator.api import router
from flywheel_validator.errors import ModelUnusableError, ServingRefusedError
from flywheel_validator.gates import Gates, ModelScore, ParityCheck
from flywheel_validator.handlers import register
from flywheel_validator.performance import PerformanceGate
from flywheel_validator.ports import (
    HeldOutSplit,
    LabeledImage,
    LoadRun,
    ServedModel,
    Validation,
)
from flywheel_validator.service import Validator

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MODEL = "digits-classifier"
SNAPSHOT = "snap-test"
GATES = Gates(
    min_accuracy=0.9,
    min_macro_f1=0.9,
    min_class_recall=0.5,
    max_latency_p95_ms=20,
    max_model_bytes=1_000_000,
    min_test_images=100,
)


# --- fakes of the ports -------------------------------------------------------------------------


@dataclass
class FakeStore:
    """The Store port in memory: a transaction applies only when it completes."""

    validations: list[Validation] = field(default_factory=list)
    claimed: set[uuid.UUID] = field(default_factory=set)
    outbox: list[Event[Any]] = field(default_factory=list)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator["FakeTransaction"]:
        tx = FakeTransaction(set(self.claimed))
        yield tx
        self.claimed = tx.claimed
        self.validations += tx.added
        self.outbox += tx.emitted

    async def by_event(self, event_id: uuid.UUID) -> Validation | None:
        return next((v for v in self.validations if v.event_id == event_id), None)

    async def get(self, validation_id: uuid.UUID) -> Validation | None:
        return next((v for v in self.validations if v.validation_id == validation_id), None)

    async def recent(self, model_line: str | None, limit: int) -> list[Validation]:
        mine = [v for v in self.validations if model_line is None or v.model_line == model_line]
        return list(reversed(mine))[:limit]

    def events(self) -> list[ModelValidatedV1]:
        return [e for e in self.outbox if isinstance(e, ModelValidatedV1)]


@dataclass
class FakeTransaction:
    claimed: set[uuid.UUID]
    added: list[Validation] = field(default_factory=list)
    emitted: list[Event[Any]] = field(default_factory=list)

    async def claim(self, event_id: uuid.UUID) -> bool:
        if event_id in self.claimed:
            return False
        self.claimed.add(event_id)
        return True

    async def add(self, validation: Validation) -> None:
        self.added.append(validation)

    async def emit(self, event: Event[Any]) -> None:
        self.emitted.append(event)


@dataclass
class FakeRegistry:
    """Versions (their files, or the error reading them raises), aliases and tags."""

    files: dict[str, ModelFiles | FlywheelError] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    down: bool = False
    downloads: list[str] = field(default_factory=list)

    def add(self, version: str, labels: list[str] | None = None) -> None:
        self.files[version] = ModelFiles(
            name=MODEL,
            version=version,
            onnx=f"onnx-{version}".encode(),
            labels=labels or [str(d) for d in range(10)],
            state_dict=b"state",
            config_pbtxt="name: 'digits'",
        )

    def _check(self) -> None:
        if self.down:
            raise DependencyUnavailableError("model registry is unavailable")

    async def get_version(self, name: str, version: str) -> ModelVersionInfo:
        self._check()
        assert name == MODEL
        if version not in self.files:
            raise NotFoundError("model version not found")
        return ModelVersionInfo(name=name, version=version, tags=self.tags.get(version, {}))

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        self._check()
        assert name == MODEL
        version = self.aliases.get(alias)
        return None if version is None else ModelVersionInfo(name=name, version=version)

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        self._check()
        assert name == MODEL
        self.aliases[alias] = version

    async def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        self._check()
        assert name == MODEL
        if version not in self.files:
            raise NotFoundError("model version not found")
        self.tags.setdefault(version, {}).update(tags)

    async def download_model_files(self, name: str, version: str) -> ModelFiles:
        self._check()
        assert name == MODEL
        self.downloads.append(version)
        found = self.files.get(version)
        if found is None:
            raise NotFoundError("model version not found")
        if isinstance(found, FlywheelError):
            raise found
        return found


@dataclass
class FakeSplits:
    images: int = 150
    validation_images: int = 50
    missing: bool = False
    undecodable: int = 0
    read: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[frozenset[uuid.UUID]] = field(default_factory=list)

    async def test_split(
        self,
        project_id: str,
        snapshot_id: str,
        *,
        excluded: frozenset[uuid.UUID] = frozenset(),
        with_validation: bool = False,
    ) -> HeldOutSplit:
        self.read.append((project_id, snapshot_id))
        self.excluded.append(excluded)
        if self.missing:
            raise NotFoundError("object not found")
        images = [LabeledImage(class_name=str(i % 10), data=b"png") for i in range(self.images)]
        validation = [
            LabeledImage(class_name=str(i % 10), data=b"val")
            for i in range(self.validation_images if with_validation else 0)
        ]
        return HeldOutSplit(snapshot_id, images, self.undecodable, validation)


@dataclass
class FakeEvaluator:
    """Scores by version (from the ONNX bytes); a version may be unusable."""

    scores: dict[str, ModelScore | ModelUnusableError] = field(default_factory=dict)
    parity_check: ParityCheck = field(default_factory=lambda: ParityCheck(max_abs_diff=1e-6))
    scored: list[str] = field(default_factory=list)
    checked: list[tuple[str, int]] = field(default_factory=list)
    described: list[str] = field(default_factory=list)
    describe_error: FlywheelError | None = None

    async def score(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ModelScore:
        assert images
        self.scored.append(files.version)
        found = self.scores[files.version]
        if isinstance(found, ModelUnusableError):
            raise found
        return found

    async def parity(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ParityCheck:
        self.checked.append((files.version, len(images)))
        return self.parity_check

    async def describe(self, files: ModelFiles, images: Sequence[LabeledImage]) -> DriftReference:
        self.described.append(files.version)
        if self.describe_error is not None:
            raise self.describe_error
        return DriftReference(
            predicted=[image.class_name for image in images],
            embeddings=np.zeros((len(images), 64)),
            statistics={"brightness": np.full(len(images), 0.2)},
        )


@dataclass
class FakeReferences:
    """The ReferenceStore port in memory; it may be down."""

    written: dict[tuple[str, str], DriftReference] = field(default_factory=dict)
    down: bool = False

    async def put(self, model_line: str, version: str, reference: DriftReference) -> str:
        if self.down:
            raise DependencyUnavailableError("S3 is unavailable")
        self.written[(model_line, version)] = reference
        return f"drift/reference/{model_line}/{version}.npz"


def score(accuracy: float = 0.97, macro_f1: float = 0.96, recall: float = 0.9) -> ModelScore:
    return ModelScore(
        test_images=150,
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class_recall={str(d): recall for d in range(10)},
        latency_p50_ms=0.3,
        latency_p95_ms=0.8,
        model_size_bytes=430_000,
    )


# --- harness ------------------------------------------------------------------------------------


@dataclass
class Harness:
    store: FakeStore
    registry: FakeRegistry
    splits: FakeSplits
    evaluator: FakeEvaluator
    validator: Validator
    broker: RabbitBroker
    topology: Topology
    references: FakeReferences

    def trained(self, version: str = "2", project: str = "digits") -> ModelTrainedV1:
        return ModelTrainedV1.model_validate(
            {
                "payload": {
                    "project_id": project,
                    "model_line": MODEL,
                    "snapshot_id": SNAPSHOT,
                    "training_run_id": uuid.uuid4(),
                    "mlflow_run_id": uuid.uuid4().hex,
                    "registered_model": MODEL,
                    "model_version": version,
                    "backend": "local",
                }
            }
        )

    async def publish(self, event: Event[Any] | dict[str, Any]) -> None:
        body = event if isinstance(event, dict) else event.model_dump(mode="json")
        await self.broker.publish(
            body,
            exchange=self.topology.exchange_for(ModelTrainedV1),
            routing_key=ModelTrainedV1.routing_key(),
        )


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    store, registry, splits, evaluator = FakeStore(), FakeRegistry(), FakeSplits(), FakeEvaluator()
    references = FakeReferences()
    validator = Validator(
        store,
        registry,
        splits,
        evaluator,
        default_gates=GATES,
        project_gates={"strict": Gates(min_accuracy=0.99)},
        references=references,
        clock=lambda: NOW,
    )
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id="validator")
    topology = Topology(namespace="component.")
    register(broker, topology, validator)
    async with TestRabbitBroker(broker) as test_broker:
        yield Harness(
            store, registry, splits, evaluator, validator, test_broker, topology, references
        )


# --- verdicts -----------------------------------------------------------------------------------


async def test_a_first_version_that_meets_the_floors_passes_and_becomes_challenger(
    harness: Harness,
) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    event = harness.trained("1")

    await harness.publish(event)

    [validated] = harness.store.events()
    assert validated.correlation_id == event.correlation_id
    assert validated.causation_id == event.event_id
    payload = validated.payload
    assert payload.verdict is ValidationVerdict.PASSED
    assert (payload.model_version, payload.champion_version) == ("1", None)
    assert (payload.snapshot_id, payload.model_line) == (SNAPSHOT, MODEL)
    assert payload.candidate_metrics["accuracy"] == 0.97
    assert payload.candidate_metrics["parity_max_abs_diff"] == 1e-6
    assert payload.champion_metrics == {}
    assert payload.reasons[0] == "accuracy 0.970 >= floor 0.900 (no champion): pass"
    assert all(r.endswith(": pass") for r in payload.reasons)
    assert harness.registry.aliases == {"challenger": "1"}
    tags = harness.registry.tags["1"]
    assert tags["validation.verdict"] == "passed"
    assert tags["validation.accuracy"] == "0.97"
    assert tags["validation.champion_version"] == "none"
    assert tags["validation.event_id"] == str(event.event_id)
    assert tags["validation.reasons"].splitlines() == payload.reasons
    [validation] = harness.store.validations
    assert validation.validated_event_id == validated.event_id
    assert validation.gates == GATES
    assert validation.test_images == 150
    assert harness.store.claimed == {event.event_id}
    assert harness.splits.read == [("digits", SNAPSHOT)]
    assert harness.evaluator.checked == [("1", 150)]
    # Gates judge on TEST; the drift reference is every held-out image, VALIDATION too.
    reference = harness.references.written[(MODEL, "1")]
    assert reference.predicted.count("0") == 20  # 15 of TEST, 5 of VALIDATION


# --- drift references ---------------------------------------------------------------------------


async def test_the_candidate_drift_reference_is_written_whatever_the_verdict(
    harness: Harness,
) -> None:
    harness.registry.add("1")
    harness.registry.add("2")
    harness.registry.aliases["champion"] = "1"
    harness.evaluator.scores |= {"1": score(), "2": score(accuracy=0.5)}

    await harness.publish(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.FAILED
    assert harness.evaluator.described == ["2"]  # the candidate's only, not the champion's
    assert list(harness.references.written) == [(MODEL, "2")]
    reference = harness.references.written[(MODEL, "2")]
    assert reference.embeddings is not None
    assert reference.embeddings.shape == (200, 64)


@pytest.mark.parametrize("fault", ["store down", "model unusable"])
async def test_a_reference_that_cannot_be_written_does_not_fail_the_validation(
    harness: Harness, fault: str
) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    if fault == "store down":
        harness.references.down = True
    else:
        harness.evaluator.describe_error = ModelUnusableError("no embedding output")

    with structlog.testing.capture_logs() as logs:
        await harness.publish(harness.trained("1"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.PASSED
    assert harness.registry.aliases == {"challenger": "1"}
    assert harness.references.written == {}
    [warning] = [log for log in logs if log["event"] == "drift reference not written"]
    assert warning["log_level"] == "warning"
    assert warning["model_version"] == "1"


async def test_no_reference_is_written_for_a_candidate_that_does_not_run(
    harness: Harness,
) -> None:
    harness.registry.add("2")
    harness.evaluator.scores["2"] = ModelUnusableError("INVALID_PROTOBUF")

    await harness.publish(harness.trained("2"))

    assert harness.evaluator.described == []
    assert harness.references.written == {}


async def test_without_a_reference_store_none_is_written(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    validator = Validator(
        harness.store,
        harness.registry,
        harness.splits,
        harness.evaluator,
        default_gates=GATES,
        clock=lambda: NOW,
    )

    await validator.model_trained(harness.trained("1"))

    assert harness.evaluator.described == []
    assert harness.store.events()[0].payload.verdict is ValidationVerdict.PASSED


async def test_a_candidate_worse_than_the_champion_fails_without_an_alias(
    harness: Harness,
) -> None:
    harness.registry.add("1")
    harness.registry.add("2")
    harness.registry.aliases["champion"] = "1"
    harness.evaluator.scores |= {"1": score(0.97, 0.96), "2": score(0.95, 0.955)}

    await harness.publish(harness.trained("2"))

    [validated] = harness.store.events()
    payload = validated.payload
    assert payload.verdict is ValidationVerdict.FAILED
    assert payload.champion_version == "1"
    assert payload.champion_metrics["accuracy"] == 0.97
    assert payload.reasons[0] == "accuracy 0.950 < champion 0.970 - 0.005: fail"
    assert payload.reasons[1] == "macro-F1 0.955 >= champion 0.960 - 0.010: pass"
    assert harness.registry.aliases == {"champion": "1"}
    assert harness.registry.tags["2"]["validation.verdict"] == "failed"
    assert harness.registry.tags["2"]["validation.champion_version"] == "1"
    assert "accuracy 0.950 < champion" in harness.registry.tags["2"]["validation.reasons"]


async def test_a_candidate_that_is_already_champion_is_judged_on_the_floors(
    harness: Harness,
) -> None:
    harness.registry.add("3")
    harness.registry.aliases["champion"] = "3"
    harness.evaluator.scores["3"] = score()

    await harness.publish(harness.trained("3"))

    [validated] = harness.store.events()
    assert validated.payload.champion_version is None
    assert harness.evaluator.scored == ["3"]
    assert "(no champion)" in validated.payload.reasons[0]


async def test_project_gates_override_the_defaults(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score(accuracy=0.97)

    await harness.publish(harness.trained("1", project="strict"))
    await harness.publish(harness.trained("1", project="digits"))

    strict, default = harness.store.events()
    assert strict.payload.verdict is ValidationVerdict.FAILED
    assert strict.payload.reasons[0] == "accuracy 0.970 < floor 0.990 (no champion): fail"
    assert default.payload.verdict is ValidationVerdict.PASSED
    assert harness.store.validations[0].gates.min_accuracy == 0.99


# --- broken candidates and data -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            NotFoundError("model version artifacts lack model.onnx"),
            "candidate version 2 artifacts unusable (model version artifacts lack model.onnx): "
            "fail",
        ),
        (
            InvalidInputError("labels.json is not JSON"),
            "candidate version 2 artifacts unusable (labels.json is not JSON): fail",
        ),
    ],
)
async def test_a_candidate_with_missing_or_corrupt_artifacts_fails_with_the_reason(
    harness: Harness, error: FlywheelError, reason: str
) -> None:
    harness.registry.files["2"] = error

    await harness.publish(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.FAILED
    assert validated.payload.reasons == [reason]
    assert validated.payload.candidate_metrics == {}
    assert harness.evaluator.scored == []
    assert harness.registry.tags["2"]["validation.reasons"] == reason
    assert "challenger" not in harness.registry.aliases


async def test_a_version_missing_from_the_registry_still_gets_a_failed_verdict(
    harness: Harness,
) -> None:
    await harness.publish(harness.trained("7"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.FAILED
    assert "model version not found" in validated.payload.reasons[0]
    assert harness.registry.tags == {}


async def test_an_onnx_that_does_not_run_fails_the_candidate(harness: Harness) -> None:
    harness.registry.add("2")
    harness.evaluator.scores["2"] = ModelUnusableError("INVALID_PROTOBUF")

    await harness.publish(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.FAILED
    assert validated.payload.reasons == [
        "candidate version 2 does not run on onnxruntime (INVALID_PROTOBUF): fail"
    ]


async def test_a_broken_parity_check_fails_only_the_parity_gate(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    harness.evaluator.parity_check = ParityCheck(error="the version has no state dict")

    await harness.publish(harness.trained("1"))

    [validated] = harness.store.events()
    failed = [r for r in validated.payload.reasons if r.endswith(": fail")]
    assert failed == ["export parity not checked (the version has no state dict): fail"]
    assert "parity_max_abs_diff" not in validated.payload.candidate_metrics


async def test_an_unusable_champion_is_noted_and_the_floors_apply(harness: Harness) -> None:
    harness.registry.add("1")
    harness.registry.add("2")
    harness.registry.aliases["champion"] = "1"
    harness.evaluator.scores |= {"1": ModelUnusableError("bad graph"), "2": score()}

    await harness.publish(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.PASSED
    assert validated.payload.champion_version is None
    assert "(no champion)" in validated.payload.reasons[0]
    assert validated.payload.reasons[-1] == (
        "champion version 1 unusable (bad graph); absolute floors apply"
    )


async def test_a_test_split_too_small_fails_with_a_clear_reason(harness: Harness) -> None:
    harness.registry.add("1")
    harness.splits.images = 42

    await harness.publish(harness.trained("1"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.FAILED
    assert validated.payload.reasons == ["test split has 42 images < minimum 100: fail"]
    assert harness.store.validations[0].test_images == 42
    assert harness.evaluator.scored == []


async def test_a_missing_snapshot_fails_the_candidate(harness: Harness) -> None:
    harness.registry.add("1")
    harness.splits.missing = True

    await harness.publish(harness.trained("1"))

    [validated] = harness.store.events()
    assert validated.payload.reasons == [
        f"test split of snapshot {SNAPSHOT} unreadable (object not found): fail"
    ]


async def test_undecodable_test_images_are_left_out_and_noted(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    harness.splits.undecodable = 3

    await harness.publish(harness.trained("1"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.PASSED
    assert validated.payload.reasons[-1] == "3 test images are not decodable and were left out"


# --- delivery -----------------------------------------------------------------------------------


async def test_an_unavailable_registry_raises_a_retryable_error_and_records_nothing(
    harness: Harness,
) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    harness.registry.down = True
    event = harness.trained("1")

    with pytest.raises(DependencyUnavailableError) as raised:
        await harness.validator.model_trained(event)
    await harness.publish(event)

    assert is_retryable(raised.value)
    assert harness.store.claimed == set()
    assert harness.store.outbox == []
    harness.registry.down = False
    await harness.publish(event)
    assert len(harness.store.events()) == 1


async def test_the_same_event_twice_gives_one_validation_and_one_event(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    event = harness.trained("1")

    await harness.publish(event)
    await harness.publish(event)

    assert len(harness.store.validations) == 1
    assert len(harness.store.events()) == 1
    assert harness.evaluator.scored == ["1"]


async def test_a_consumer_that_lost_the_race_stores_nothing(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    event = harness.trained("1")
    harness.store.claimed.add(event.event_id)  # another replica committed meanwhile

    assert await harness.validator.model_trained(event) is None
    assert harness.store.validations == []
    assert harness.store.outbox == []


async def test_a_malformed_event_never_reaches_the_validator(harness: Harness) -> None:
    await harness.publish({"type": "model.trained", "payload": {"project_id": "digits"}})

    assert harness.store.claimed == set()
    assert harness.registry.downloads == []


# --- read API -----------------------------------------------------------------------------------


async def test_read_api_lists_by_model_line_and_reads_one(harness: Harness) -> None:
    harness.registry.add("1")
    harness.registry.add("2")
    harness.evaluator.scores |= {"1": score(), "2": score(accuracy=0.5)}
    await harness.publish(harness.trained("1"))
    await harness.publish(harness.trained("2"))
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.validator = harness.validator

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        listed = await client.get("/v1/validations", params={"model_line": MODEL})
        limited = await client.get("/v1/validations", params={"limit": 1})
        other = await client.get("/v1/validations", params={"model_line": "other-line"})
        first_id = listed.json()["validations"][-1]["validation_id"]
        one = await client.get(f"/v1/validations/{first_id}")
        unknown = await client.get(f"/v1/validations/{uuid.uuid4()}")
        not_a_uuid = await client.get("/v1/validations/nope")
        bad_line = await client.get("/v1/validations", params={"model_line": "Not_A_Slug"})

    assert listed.status_code == 200
    assert [v["model_version"] for v in listed.json()["validations"]] == ["2", "1"]
    assert [v["verdict"] for v in listed.json()["validations"]] == ["failed", "passed"]
    assert len(limited.json()["validations"]) == 1
    assert other.json() == {"validations": []}
    body = one.json()
    assert body["model_version"] == "1"
    assert body["candidate_metrics"]["accuracy"] == 0.97
    assert body["gates"]["min_accuracy"] == 0.9
    assert body["reasons"][0].endswith(": pass")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "validation_not_found"
    assert not_a_uuid.status_code == 422
    assert bad_line.status_code == 422


async def test_labels_the_run_left_out_are_left_out_of_the_test_split(harness: Harness) -> None:
    harness.registry.add("1")
    harness.evaluator.scores["1"] = score()
    quarantined = [uuid.uuid4(), uuid.uuid4()]
    event = harness.trained("1")
    event = event.model_copy(
        update={"payload": event.payload.model_copy(update={"excluded_label_ids": quarantined})}
    )

    await harness.publish(event)

    assert harness.splits.excluded == [frozenset(quarantined)]


# --- the performance gate -----------------------------------------------------------------------


def load_point(concurrency: int, rps: float, p99: float) -> LoadPoint:
    return LoadPoint(
        concurrency=concurrency,
        requests=50,
        errors=0,
        throughput_rps=rps,
        p50_ms=p99 / 2,
        p95_ms=p99,
        p99_ms=p99,
    )


@dataclass
class FakeBenchmark:
    """Load points by role, or the refusal Triton answers a role's load with."""

    points: dict[str, list[LoadPoint]] = field(default_factory=dict)
    refuse: str | None = None
    compared: list[tuple[ServedModel, ServedModel, int]] = field(default_factory=list)

    async def compare(
        self, candidate: ServedModel, champion: ServedModel, images: Sequence[bytes]
    ) -> LoadRun:
        self.compared.append((candidate, champion, len(images)))
        if self.refuse is not None:
            raise ServingRefusedError("bad config", details={"role": self.refuse})
        return LoadRun(
            candidate=self.points["candidate"],
            champion=self.points["champion"],
            hardware="Test CPU x 2 CPUs",
            description="Triton test:8000, concurrency 1, 4",
        )


def with_performance(harness: Harness, benchmark: FakeBenchmark | None) -> Validator:
    harness.registry.add("1")
    harness.registry.add("2")
    harness.registry.aliases["champion"] = "1"
    harness.evaluator.scores |= {"1": score(), "2": score()}
    return Validator(
        harness.store,
        harness.registry,
        harness.splits,
        harness.evaluator,
        default_gates=GATES,
        performance=PerformanceGate(throughput_margin=0.2),
        benchmark=benchmark,
        benchmark_images=32,
        clock=lambda: NOW,
    )


async def test_a_slower_candidate_fails_the_performance_gate_with_its_figures(
    harness: Harness,
) -> None:
    benchmark = FakeBenchmark(
        points={
            "candidate": [load_point(1, 90, 14), load_point(4, 180, 42)],
            "champion": [load_point(1, 200, 6), load_point(4, 410, 20)],
        }
    )
    validator = with_performance(harness, benchmark)
    golden = ServingConfig(max_batch_size=16, max_queue_delay_microseconds=100, instance_count=2)
    harness.registry.tags["1"] = {
        GOLDEN_TAG: GoldenPoint(
            config=golden, point=load_point(4, 410, 20), hardware="Test CPU"
        ).model_dump_json()
    }

    await validator.model_trained(harness.trained("2"))

    [validated] = harness.store.events()
    payload = validated.payload
    assert payload.verdict is ValidationVerdict.FAILED
    assert payload.reasons[-2] == (
        "performance: throughput candidate 180 rps vs champion 410 rps (-56% beyond -20% "
        "margin); p99 at concurrency 4 candidate 42.0 ms vs champion 20.0 ms (+110% beyond "
        "+50% margin + 2 ms): fail"
    )
    assert payload.reasons[-1] == (
        "performance measured on Test CPU x 2 CPUs: Triton test:8000, concurrency 1, 4"
    )
    assert [r.rsplit(": ", 1)[-1] for r in payload.reasons[:-2]] == ["pass"] * 6
    assert payload.candidate_metrics["serving_rps"] == 180
    assert payload.candidate_metrics["serving_p99_ms"] == 42
    assert payload.champion_metrics["serving_rps"] == 410
    assert payload.champion_metrics["accuracy"] == 0.97
    [(candidate, champion, images)] = benchmark.compared
    assert (candidate.role, candidate.files.version, candidate.config) == ("candidate", "2", None)
    assert (champion.role, champion.files.version, champion.config) == ("champion", "1", golden)
    assert images == 32
    assert harness.registry.aliases == {"champion": "1"}
    assert harness.registry.tags["2"]["validation.serving_rps"] == "180"


async def test_a_same_speed_candidate_passes_the_performance_gate(harness: Harness) -> None:
    same = [load_point(1, 200, 6), load_point(4, 400, 21)]
    benchmark = FakeBenchmark(points={"candidate": same, "champion": same})
    validator = with_performance(harness, benchmark)

    await validator.model_trained(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.PASSED, validated.payload.reasons
    assert validated.payload.reasons[-2].startswith("performance: throughput candidate 400 rps")
    assert harness.registry.aliases == {"champion": "1", "challenger": "2"}


@pytest.mark.parametrize(
    ("benchmark", "reason"),
    [
        (None, "performance not compared (no Triton configured): skipped"),
        (
            FakeBenchmark(refuse="champion"),
            "performance not compared (champion version 1 does not load in Triton: "
            "bad config): skipped",
        ),
    ],
)
async def test_a_performance_gate_that_cannot_compare_says_so_and_passes(
    harness: Harness, benchmark: FakeBenchmark | None, reason: str
) -> None:
    validator = with_performance(harness, benchmark)

    await validator.model_trained(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.PASSED
    assert validated.payload.reasons[-1] == reason
    assert "serving_rps" not in validated.payload.candidate_metrics


async def test_a_candidate_triton_refuses_fails_the_performance_gate(harness: Harness) -> None:
    validator = with_performance(harness, FakeBenchmark(refuse="candidate"))

    await validator.model_trained(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.FAILED
    assert validated.payload.reasons[-1] == (
        "performance: candidate does not load in Triton (bad config): fail"
    )


async def test_the_performance_gate_spares_triton_a_candidate_already_failed(
    harness: Harness,
) -> None:
    benchmark = FakeBenchmark()
    validator = with_performance(harness, benchmark)
    harness.evaluator.scores["2"] = score(accuracy=0.5)

    await validator.model_trained(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.reasons[-1] == (
        "performance not compared (the candidate failed another gate): skipped"
    )
    assert benchmark.compared == []


async def test_without_a_champion_the_performance_gate_is_skipped(harness: Harness) -> None:
    benchmark = FakeBenchmark()
    validator = with_performance(harness, benchmark)
    harness.registry.aliases.clear()

    await validator.model_trained(harness.trained("2"))

    [validated] = harness.store.events()
    assert validated.payload.verdict is ValidationVerdict.PASSED
    assert validated.payload.reasons[-1] == (
        "performance not compared (no champion to compare with): skipped"
    )
    assert benchmark.compared == []
