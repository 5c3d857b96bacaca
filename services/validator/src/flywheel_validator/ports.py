"""What the use cases need from the outside world, and the records that cross those ports.

``Registry`` is the MLflow model registry (``flywheel_clients.registry.ModelRegistry`` implements
it as is). ``SplitReader`` reads a snapshot's held-out TEST images from S3. ``Evaluator`` runs a
model's files the way serving will. ``ReferenceStore`` keeps each version's drift reference
where data-monitor reads it. ``Benchmark`` serves two versions on one Triton and drives
them under load in the same run (the performance gate). ``Store`` is the service's PostgreSQL
schema, with ``transaction()`` for the unit of work that claims the event, stores the validation
and queues ``model.validated`` in the outbox, all committed together.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from flywheel_clients.registry import ModelFiles, ModelVersionInfo
from flywheel_contracts import Event
from flywheel_contracts.events import ValidationVerdict
from flywheel_runtime.drift_reference import DriftReference
from flywheel_serving.tuning import LoadPoint, ServingConfig
from flywheel_validator.gates import Gates, ModelScore, ParityCheck


@dataclass(frozen=True)
class LabeledImage:
    """One held-out image: its encoded bytes and the class name a labeler gave it."""

    class_name: str
    data: bytes


@dataclass(frozen=True)
class HeldOutSplit:
    """The TEST split of a snapshot, as the models will see it."""

    snapshot_id: str
    images: list[LabeledImage]
    undecodable: int = 0
    """Images of the split that are not decodable and were left out."""
    validation: list[LabeledImage] = field(default_factory=list)
    """The VALIDATION split, read only when asked for: with TEST, the drift reference, which
    wants every image the model did not train on (gates judge on TEST alone)."""


class Validation(BaseModel):
    """One model.trained judged: the verdict, every number behind it and the gates applied."""

    model_config = ConfigDict(frozen=True)

    validation_id: uuid.UUID
    event_id: uuid.UUID
    """The model.trained that asked for it (one validation per event)."""
    correlation_id: uuid.UUID
    validated_event_id: uuid.UUID
    """The model.validated that announced it."""
    project_id: str
    model_line: str
    registered_model: str
    model_version: str
    champion_version: str | None
    """The version compared against; None when absolute floors applied."""
    snapshot_id: str
    verdict: ValidationVerdict
    test_images: int
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    reasons: list[str]
    gates: Gates
    created_at: datetime
    duration_s: float


class Registry(Protocol):
    """The model registry: versions, aliases, tags and files."""

    async def get_version(self, name: str, version: str) -> ModelVersionInfo:
        """The version with its tags; ``NotFoundError`` when it does not exist."""
        ...

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """None when the alias is not set."""
        ...

    async def set_alias(self, name: str, alias: str, version: str) -> None: ...

    async def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        """``NotFoundError`` when the version does not exist."""
        ...

    async def download_model_files(self, name: str, version: str) -> ModelFiles:
        """``NotFoundError`` for a missing version or file, ``InvalidInputError`` for bad labels;
        ``DependencyUnavailableError`` while the registry is away."""
        ...


class SplitReader(Protocol):
    """Held-out data of dataset snapshots."""

    async def test_split(
        self,
        project_id: str,
        snapshot_id: str,
        *,
        excluded: frozenset[uuid.UUID] = frozenset(),
        with_validation: bool = False,
    ) -> HeldOutSplit:
        """The TEST split (and the VALIDATION one when ``with_validation``) without the
        ``excluded`` (quarantined) labels; ``NotFoundError`` when the snapshot or an image is
        missing; ``DependencyUnavailable`` while S3 is away."""
        ...


class Evaluator(Protocol):
    """Runs a model's files as serving will; CPU-bound work happens off the event loop."""

    async def score(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ModelScore:
        """``ModelUnusableError`` when the ONNX does not load or run."""
        ...

    async def parity(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ParityCheck:
        """Never raises for a bad model: a check that cannot run says why in ``error``."""
        ...

    async def describe(self, files: ModelFiles, images: Sequence[LabeledImage]) -> DriftReference:
        """The version's drift reference on ``images``, one row per image: its predicted class
        names, its embeddings when it declares an embedding output, and each image's
        statistics; ``ModelUnusableError`` when the ONNX does not run."""
        ...


class ReferenceStore(Protocol):
    """Drift references of model versions (``flywheel_runtime.drift_reference``)."""

    async def put(self, model_line: str, version: str, reference: DriftReference) -> str:
        """Write the version's reference, replacing any; its key. ``DependencyUnavailableError``
        while the store is away."""
        ...


@dataclass(frozen=True)
class ServedModel:
    """A version to measure and the configuration to serve it under."""

    role: str
    """``candidate`` or ``champion``: in reasons, error details and Triton model names."""
    files: ModelFiles
    config: ServingConfig | None = None
    """Its golden configuration; None serves it under the benchmark's default options."""


@dataclass(frozen=True)
class LoadRun:
    """Load points of two versions measured on one Triton in one run."""

    candidate: list[LoadPoint]
    champion: list[LoadPoint]
    hardware: str
    """What Triton ran on, as far as the benchmark can tell (figures compare on one only)."""
    description: str
    """How it was measured: levels, rounds, requests, configurations."""


class Benchmark(Protocol):
    """Serves two versions side by side and measures them taking turns."""

    async def compare(
        self, candidate: ServedModel, champion: ServedModel, images: Sequence[bytes]
    ) -> LoadRun:
        """Load both, drive both with ``images`` at the same levels, unload both.

        ``ServingRefusedError`` (details ``role``) when Triton will not load one of them;
        ``DependencyUnavailableError`` while Triton is away."""
        ...


class Transaction(Protocol):
    """One unit of work on the validator's schema; everything in it commits or nothing does."""

    async def claim(self, event_id: uuid.UUID) -> bool:
        """True the first time this event is handled (a redelivery gets False)."""
        ...

    async def add(self, validation: Validation) -> None: ...

    async def emit(self, event: Event[Any]) -> None:
        """Queue an event for publishing once the transaction commits (outbox)."""
        ...


class Store(Protocol):
    """The validator's persistent state."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def by_event(self, event_id: uuid.UUID) -> Validation | None: ...

    async def get(self, validation_id: uuid.UUID) -> Validation | None: ...

    async def recent(self, model_line: str | None, limit: int) -> Sequence[Validation]:
        """Newest first."""
        ...
