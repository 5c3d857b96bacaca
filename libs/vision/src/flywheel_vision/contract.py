"""The training entry-point contract: what a model line's training code gets and must leave.

A model line names its entry point (an importable ``package.module:function`` or a script
path). The platform runner (``python -m flywheel_vision.train``) prepares a work folder and
hands the entry point one ``TrainingContext``: the snapshot's TRAIN and VALIDATION images as
local files with their labels, the champion's files (if any), an empty output folder, the
hyperparameters and the distributed environment. A callable gets the context as its one
argument; a script gets ``--context <work>/context-rank<R>.json``, the same model as JSON, and
needs nothing from Flywheel to read it.

Rank 0 leaves in the output folder ``model.onnx``, ``model.json`` (a ``ModelSignature``: input
and output tensors and the ``PreprocessSpec`` serving must apply) and ``metrics.json``; it may
add ``params.json``, ``config.pbtxt`` and ``state_dict.pt``. ``read_outputs`` checks them and
names the file at fault; the platform, not the entry point, talks to MLflow and the registry.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from flywheel_runtime.errors import InvalidInputError
from flywheel_vision.preprocess import (
    EMBEDDING_NAME,
    INPUT_NAME,
    MNIST_PREPROCESS,
    OUTPUT_NAME,
    PreprocessSpec,
)

__all__ = [
    "CONFIG_FILE",
    "CONTRACT_VERSION",
    "LABELS_FILE",
    "METRICS_FILE",
    "ONNX_FILE",
    "PARAMS_FILE",
    "SIGNATURE_FILE",
    "STATE_DICT_FILE",
    "BaseModelFiles",
    "DistributedEnv",
    "EntryPointOutputError",
    "ModelSignature",
    "Sample",
    "TensorSpec",
    "TrainingContext",
    "read_signature",
    "reference_signature",
    "signature_or_reference",
]

CONTRACT_VERSION: Final = 1
"""Bumped on a change an existing entry point could not follow."""

ONNX_FILE: Final = "model.onnx"
CONFIG_FILE: Final = "config.pbtxt"
LABELS_FILE: Final = "labels.json"
STATE_DICT_FILE: Final = "state_dict.pt"
"""File names of a model's artifacts, in MLflow and in a Triton model repository alike."""
SIGNATURE_FILE: Final = "model.json"
"""The model's declaration: tensors and preprocessing; logged with the version."""
METRICS_FILE: Final = "metrics.json"
PARAMS_FILE: Final = "params.json"
"""What the entry point leaves besides the model: final or per-step metrics, extra params."""

SIGNATURE_FORMAT: Final = "flywheel.model/v1"


class EntryPointOutputError(InvalidInputError):
    """The entry point left a file missing or invalid; the message names it."""

    code = "invalid_training_output"


# --- model.json -------------------------------------------------------------------------------


class TensorSpec(BaseModel):
    """One tensor of the exported model; ``-1`` marks a dynamic dimension."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"
    """Serving sends and reads float32 tensors only."""


class ModelSignature(BaseModel):
    """``model.json``: what the model takes, what it gives, and how images are prepared for it.

    One input ``[-1, C, H, W]`` whose ``C, H, W`` are the preprocessing's, one output
    ``[-1, K]`` of unnormalised scores for the ``K`` classes, in ``labels.json`` order, and
    optionally a second output ``[-1, D]``: the model's embedding (its penultimate layer), which
    drift checks compare between production and the held-out data.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["flywheel.model/v1"] = SIGNATURE_FORMAT
    architecture: str | None = Field(default=None, max_length=200)
    """Free text naming the architecture; ``DigitNet`` is the reference, whose PyTorch weights
    the validator reloads to check export parity."""
    inputs: tuple[TensorSpec] = Field(min_length=1, max_length=1)
    outputs: tuple[TensorSpec] = Field(min_length=1, max_length=1)
    preprocessing: PreprocessSpec
    embedding: TensorSpec | None = None
    """The model's embedding output ``[-1, D]``, when it exports one besides the scores."""

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        (image,) = self.inputs
        (scores,) = self.outputs
        embedding = self.embedding
        expected = (-1, *self.preprocessing.input_shape)
        if image.shape != expected:
            raise ValueError(
                f"input {image.name!r} has shape {list(image.shape)}; the preprocessing makes "
                f"{list(expected)} (batch dimension -1)"
            )
        if len(scores.shape) != 2 or scores.shape[0] != -1 or scores.shape[1] < 1:
            raise ValueError(
                f"output {scores.name!r} must have shape [-1, number of classes], "
                f"not {list(scores.shape)}"
            )
        if embedding is not None:
            if len(embedding.shape) != 2 or embedding.shape[0] != -1 or embedding.shape[1] < 1:
                raise ValueError(
                    f"embedding {embedding.name!r} must have shape [-1, size], "
                    f"not {list(embedding.shape)}"
                )
            if embedding.name in (image.name, scores.name):
                raise ValueError(
                    f"embedding {embedding.name!r} must be a tensor of its own, not the "
                    "input or the scores"
                )
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_embedding(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A model without an embedding keeps the model.json it had before embeddings existed,
        # which readers that do not know the field still accept.
        data: dict[str, Any] = handler(self)
        if data.get("embedding") is None:
            data.pop("embedding", None)
        return data

    @property
    def num_classes(self) -> int:
        return self.outputs[0].shape[1]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    @property
    def embedding_size(self) -> int | None:
        """``D`` of the declared embedding output; None when the model declares none."""
        return None if self.embedding is None else self.embedding.shape[1]

    def canonical(self) -> ModelSignature:
        """The same signature with the tensor names serving uses (``image`` → ``logits``, and
        ``embedding`` when declared)."""
        update: dict[str, object] = {
            "inputs": (self.input.model_copy(update={"name": INPUT_NAME}),),
            "outputs": (self.output.model_copy(update={"name": OUTPUT_NAME}),),
        }
        if self.embedding is not None:
            update["embedding"] = self.embedding.model_copy(update={"name": EMBEDDING_NAME})
        return self.model_copy(update=update)


def reference_signature(
    num_classes: int,
    *,
    architecture: str | None = "DigitNet",
    embedding_size: int | None = None,
) -> ModelSignature:
    """The signature of the MNIST reference model (and, without an embedding, of versions that
    carry none)."""
    return ModelSignature(
        architecture=architecture,
        inputs=(TensorSpec(name=INPUT_NAME, shape=(-1, *MNIST_PREPROCESS.input_shape)),),
        outputs=(TensorSpec(name=OUTPUT_NAME, shape=(-1, num_classes)),),
        preprocessing=MNIST_PREPROCESS,
        embedding=(
            None
            if embedding_size is None
            else TensorSpec(name=EMBEDDING_NAME, shape=(-1, embedding_size))
        ),
    )


def read_signature(data: bytes | str) -> ModelSignature:
    """A ``model.json``; ``EntryPointOutputError`` naming the file when it is not valid."""
    try:
        return ModelSignature.model_validate_json(data)
    except ValidationError as error:
        raise EntryPointOutputError(
            f"{SIGNATURE_FILE} is not a valid model declaration: {_first_error(error)}",
            details={"file": SIGNATURE_FILE},
        ) from error


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))


def signature_or_reference(data: bytes | None, num_classes: int) -> ModelSignature:
    """A version's declared signature, or the reference one for versions without ``model.json``
    (everything registered before preprocessing was declared)."""
    if data is None:
        return reference_signature(num_classes, architecture=None)
    return read_signature(data)


# --- the context ------------------------------------------------------------------------------


class Sample(BaseModel):
    """One labelled image of the snapshot, as a local file."""

    model_config = ConfigDict(frozen=True)

    path: Path
    label: int = Field(ge=0)
    """Index of the class in ``TrainingContext.classes`` (the model's output index)."""
    class_name: str
    label_id: uuid.UUID


class BaseModelFiles(BaseModel):
    """The version a run starts from (the champion, by default), downloaded."""

    model_config = ConfigDict(frozen=True)

    version: str
    classes: list[str]
    """Its class names in output order; compare with the run's to decide on the head."""
    onnx: Path
    state_dict: Path | None = None
    """PyTorch weights when the version has them (the reference model does)."""
    signature: ModelSignature
    """Its ``model.json`` (the reference one for versions without)."""


class DistributedEnv(BaseModel):
    """This process's place in the job, from the variables torchrun sets."""

    model_config = ConfigDict(frozen=True)

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DistributedEnv:
        def number(name: str, default: int) -> int:
            raw = env.get(name)
            return int(raw) if raw not in (None, "") else default

        port = env.get("MASTER_PORT")
        return cls(
            rank=number("RANK", 0),
            world_size=number("WORLD_SIZE", 1),
            local_rank=number("LOCAL_RANK", 0),
            local_world_size=number("LOCAL_WORLD_SIZE", 1),
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=int(port) if port else None,
        )


class TrainingContext(BaseModel):
    """Everything an entry point gets; written as ``context-rank<R>.json`` for scripts."""

    model_config = ConfigDict(frozen=True)

    contract_version: Literal[1] = CONTRACT_VERSION
    project_id: str
    snapshot_id: str
    model_name: str
    """Registered model the version will be added to."""
    training_run_id: str | None = None
    correlation_id: str | None = None
    work_dir: Path
    output_dir: Path
    """Where rank 0 leaves ``model.onnx``, ``model.json`` and ``metrics.json``."""
    classes: list[str]
    """Class names, sorted; index ``i`` is output ``i`` of the model."""
    train: list[Sample]
    validation: list[Sample]
    base: BaseModelFiles | None = None
    """The version to start from; None trains from scratch."""
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    distributed: DistributedEnv = DistributedEnv()
    threads: int | None = None
    """CPU threads this process should use (``OMP_NUM_THREADS`` says the same)."""

    @property
    def is_main(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.distributed.rank == 0
