"""Training job: snapshot in S3 → trained, exported, registered model version in MLflow.

``python -m flywheel_vision.train`` runs it in one process; ``torchrun --nproc_per_node=N -m
flywheel_vision.train`` runs the same code as N DDP ranks, of which only rank 0 talks to MLflow,
so one job is always one MLflow run and one model version. ``train`` holds the logic so tests
and other Python callers run it in-process; ``main`` only parses arguments around it.

The job reads only the TRAIN and VALIDATION labels of the snapshot (TEST belongs to the
validator), starts from the registered champion's weights when there is one, and records
everything needed to reproduce or audit the version: snapshot, base version, git sha, seeds,
library versions and hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform as host_platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import structlog
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flywheel_contracts.datasets import ManifestEntry, Split
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.errors import InvalidInputError
from flywheel_runtime.logs import configure_logging
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import DATA_BUCKET, ObjectStorage
from flywheel_vision import ddp
from flywheel_vision.export import (
    CONFIG_FILE,
    LABELS_FILE,
    ONNX_FILE,
    STATE_DICT_FILE,
    check_parity,
    export_onnx,
    labels_json,
    read_labels,
    triton_config,
)
from flywheel_vision.model import DigitNet, load_compatible
from flywheel_vision.preprocess import PREPROCESS_VERSION, preprocess

__all__ = [
    "ARTIFACT_PATH",
    "LabeledImages",
    "SnapshotData",
    "TrainConfig",
    "TrainResult",
    "config_from_args",
    "load_snapshot",
    "main",
    "read_label_ids",
    "resolve_version",
    "train",
    "training_entries",
]

ARTIFACT_PATH: Final = "model"
"""Folder of a run's artifacts that a model version points at (ONNX, config, labels, weights)."""

NO_BASE: Final = "none"
"""``base_version`` tag of a version trained from scratch."""

TRITON_MAX_BATCH: Final = 64
TRITON_PREFERRED_BATCHES: Final = (8, 16, 32)
TRITON_QUEUE_DELAY_US: Final = 2_000
"""Serving defaults written into ``config.pbtxt``; rollout may rewrite them per deployment."""

_FETCH_CONCURRENCY: Final = 8
_PARITY_IMAGES: Final = 32

_LIBRARIES: Final = (
    "torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "numpy",
    "pillow",
    "mlflow-skinny",
)

log = structlog.get_logger(__name__)


class TrainConfig(BaseModel):
    """What to train, from which data, on top of which base, and how."""

    model_config = ConfigDict(frozen=True)

    project_id: str
    snapshot_id: str
    model_name: str
    """Registered model (one per model line) the new version is added to."""
    experiment_name: str | None = None
    """MLflow experiment of the run; defaults to ``model_name``."""
    base_alias: str | None = "champion"
    """Alias of the version to start from; nothing there means training from scratch."""
    base_version: str | None = None
    """Explicit version to start from; wins over ``base_alias`` and must exist."""
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0
    correlation_id: str | None = None
    training_run_id: str | None = None
    """The dispatcher's id of this training run (one per ``threshold.reached``)."""
    threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads of this process; default: torch's choice (``OMP_NUM_THREADS``)."""
    data_bucket: str = DATA_BUCKET
    excluded_label_ids: frozenset[uuid.UUID] = frozenset()
    """Labels that must not enter training (quarantined batches); dropped before loading."""


class TrainResult(BaseModel):
    """What rank 0 reports: the run, the registered version and its metrics."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    model_name: str
    version: str
    artifact_uri: str
    """``<run artifact uri>/model``: the version's source."""
    project_id: str
    snapshot_id: str
    base_version: str | None
    classes: list[str]
    metrics: dict[str, float]
    world_size: int
    correlation_id: str | None
    training_run_id: str | None


@dataclass(frozen=True)
class LabeledImages:
    """Preprocessed images ``float32 [N, 1, 28, 28]`` with class indices ``int64 [N]``."""

    images: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]

    def dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.images), torch.from_numpy(self.labels))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SnapshotData:
    """The TRAIN and VALIDATION labels of a snapshot, ready for the model."""

    classes: tuple[str, ...]
    """Sorted class names; index ``i`` is output ``i`` of the model."""
    train: LabeledImages
    validation: LabeledImages


def training_entries(
    entries: Iterable[ManifestEntry], excluded_label_ids: Collection[uuid.UUID] = ()
) -> list[ManifestEntry]:
    """The TRAIN and VALIDATION entries of a manifest, less the excluded labels."""
    excluded = frozenset(excluded_label_ids)
    return [
        e
        for e in entries
        if e.split in (Split.TRAIN, Split.VALIDATION) and e.label_id not in excluded
    ]


async def load_snapshot(
    storage: ObjectStorage,
    project_id: str,
    snapshot_id: str,
    *,
    bucket: str = DATA_BUCKET,
    concurrency: int = _FETCH_CONCURRENCY,
    excluded_label_ids: Collection[uuid.UUID] = (),
) -> SnapshotData:
    """Resolve a snapshot and fetch and preprocess its TRAIN and VALIDATION images.

    Labels in ``excluded_label_ids`` are left out before anything is fetched. Classes are the
    sorted names seen in the remaining entries, so the same snapshot and exclusions always
    yield the same output order, whichever process or rank loads it.
    """
    manifest = await SnapshotStore(storage, bucket=bucket).resolve(project_id, snapshot_id)
    entries = training_entries(manifest.entries, excluded_label_ids)
    classes = tuple(sorted({e.class_name for e in entries}))
    index = {name: i for i, name in enumerate(classes)}
    gate = asyncio.Semaphore(concurrency)

    async def fetch(entry: ManifestEntry) -> bytes:
        async with gate:
            return await storage.get(bucket, entry.image_key)

    blobs = await asyncio.gather(*(fetch(e) for e in entries))

    def collect(split: Split) -> LabeledImages:
        chosen = [(blob, e) for blob, e in zip(blobs, entries, strict=True) if e.split is split]
        images = np.zeros((len(chosen), 1, 28, 28), dtype=np.float32)
        for row, (blob, _) in enumerate(chosen):
            images[row] = preprocess(blob)
        labels = np.asarray([index[e.class_name] for _, e in chosen], dtype=np.int64)
        return LabeledImages(images, labels)

    return SnapshotData(classes, collect(Split.TRAIN), collect(Split.VALIDATION))


def _git_sha() -> str:
    """The code's commit: ``FLYWHEEL_GIT_SHA`` (set in images), else git, else "unknown"."""
    if sha := os.environ.get("FLYWHEEL_GIT_SHA"):
        return sha
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        completed = subprocess.run(  # noqa: S603 - fixed arguments
            [git, "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = completed.stdout.strip()
    return sha if completed.returncode == 0 and sha else "unknown"


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "absent"
    versions["version.python"] = host_platform.python_version()
    return versions


def _hardware(dist: ddp.Distributed) -> dict[str, str]:
    cuda = torch.cuda.is_available()
    return {
        "hardware.cpu_count": str(os.cpu_count() or 0),
        "hardware.torch_threads": str(torch.get_num_threads()),
        "hardware.cuda_available": str(cuda).lower(),
        "hardware.gpu": torch.cuda.get_device_name(dist.device) if cuda else "none",
        "hardware.device": str(dist.device),
        "distributed.world_size": str(dist.world_size),
        "distributed.backend": dist.backend or "none",
    }


@dataclass(frozen=True)
class _Base:
    version: str
    state: dict[str, torch.Tensor]
    classes: list[str]


def resolve_version(
    client: MlflowClient, model_name: str, *, alias: str | None, version: str | None = None
) -> ModelVersion | None:
    """The version to start from: ``version`` if given, else the one behind ``alias``.

    None when the model line has no registered model or no such alias yet (its first
    training); an explicit ``version`` that does not exist is an error.
    """
    if version is not None:
        return client.get_model_version(model_name, version)
    if not alias:
        return None
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        missing_model = exc.error_code == "RESOURCE_DOES_NOT_EXIST"
        # MLflow reports a missing alias as an invalid parameter; only that one means "none".
        missing_alias = exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
        if missing_model or missing_alias:
            return None
        raise


def _load_base(client: MlflowClient, tracking_uri: str, config: TrainConfig) -> _Base | None:
    version = resolve_version(
        client, config.model_name, alias=config.base_alias, version=config.base_version
    )
    if version is None:
        return None
    # The resolved number, not the alias: the alias may move while we download. The URI is
    # resolved through our client, since ``models:/`` downloads would consult the process's
    # default registry (``MLFLOW_TRACKING_URI`` or a local ./mlflow.db), not ours.
    source = client.get_model_version_download_uri(config.model_name, str(version.version))
    with tempfile.TemporaryDirectory(prefix="flywheel-base-") as tmp:
        local = Path(
            download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        )
        state = torch.load(local / STATE_DICT_FILE, map_location="cpu", weights_only=True)
        classes = read_labels((local / LABELS_FILE).read_bytes())
    return _Base(str(version.version), state, classes)


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as exc:
        # Another job created it between our lookup and our create.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        raced = client.get_experiment_by_name(name)
        if raced is None:
            raise
        return str(raced.experiment_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _run_epoch(
    model: nn.Module,
    loader: ddp.ShardedLoader,
    optimizer: torch.optim.Optimizer,
    dist: ddp.Distributed,
) -> float:
    """One pass over this rank's shard; the mean loss over every rank's samples."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    count = 0
    for images, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        torch.autograd.backward(loss)
        optimizer.step()
        loss_sum += loss.detach().double() * len(labels)
        count += len(labels)
    total = dist.all_reduce_sum(count)
    return dist.all_reduce_sum(loss_sum) / total if total else float("nan")


def _accuracy(model: nn.Module, dataset: Dataset[Any], dist: ddp.Distributed) -> float | None:
    """Accuracy over the whole set, each rank scoring its own shard; None for an empty set."""
    plain = ddp.unwrap(model)
    plain.eval()
    correct = 0
    seen = 0
    with torch.inference_mode():
        for images, labels in DataLoader(dist.shard(dataset), batch_size=256):
            predictions = plain(images.to(dist.device)).argmax(dim=1).cpu()
            correct += int((predictions == labels).sum())
            seen += len(labels)
    total = dist.all_reduce_sum(seen)
    return dist.all_reduce_sum(correct) / total if total else None


def _write_artifacts(
    directory: Path,
    model: nn.Module,
    classes: Sequence[str],
    config: TrainConfig,
    sample: torch.Tensor,
) -> dict[str, float]:
    plain = ddp.unwrap(model)
    onnx_bytes = export_onnx(plain)
    parity = check_parity(plain, onnx_bytes, sample)
    (directory / ONNX_FILE).write_bytes(onnx_bytes)
    (directory / LABELS_FILE).write_bytes(labels_json(classes))
    (directory / CONFIG_FILE).write_text(
        triton_config(
            config.model_name,
            num_classes=len(classes),
            max_batch_size=TRITON_MAX_BATCH,
            preferred_batch_sizes=TRITON_PREFERRED_BATCHES,
            max_queue_delay_microseconds=TRITON_QUEUE_DELAY_US,
        )
    )
    buffer = io.BytesIO()
    torch.save({key: value.cpu() for key, value in plain.state_dict().items()}, buffer)
    (directory / STATE_DICT_FILE).write_bytes(buffer.getvalue())
    return {"parity_max_abs_diff": parity, "model_size_bytes": float(len(onnx_bytes))}


def train(
    config: TrainConfig,
    *,
    platform: PlatformSettings | None = None,
    dist: ddp.Distributed | None = None,
    data: SnapshotData | None = None,
) -> TrainResult | None:
    """Train one model version; the result on rank 0, None on the other ranks.

    ``platform`` says where S3 and MLflow are (default: ``FLYWHEEL_*`` env). ``dist`` is the
    caller's DDP context (default: ``ddp.init()``, closed again here). ``data`` skips loading
    the snapshot from S3, for callers that already hold it. Blocking: run it in a worker
    thread or process from async code.
    """
    platform = platform or PlatformSettings()
    own_dist = dist is None
    dist = dist or ddp.init()
    bound = log.bind(
        rank=dist.rank,
        correlation_id=config.correlation_id,
        training_run_id=config.training_run_id,
        snapshot_id=config.snapshot_id,
    )
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        ddp.seed_everything(config.seed)
        if data is None:
            data = asyncio.run(_load(platform, config))
        if not len(data.train):
            raise InvalidInputError(
                "the snapshot has no training images", details={"snapshot_id": config.snapshot_id}
            )
        bound.info(
            "snapshot loaded",
            classes=len(data.classes),
            train_images=len(data.train),
            validation_images=len(data.validation),
        )
        return _train(config, platform, dist, data, bound)
    finally:
        if own_dist:
            dist.close()


async def _load(platform: PlatformSettings, config: TrainConfig) -> SnapshotData:
    storage = ObjectStorage.from_settings(platform)
    try:
        return await load_snapshot(
            storage,
            config.project_id,
            config.snapshot_id,
            bucket=config.data_bucket,
            excluded_label_ids=config.excluded_label_ids,
        )
    finally:
        storage.close()


def _train(
    config: TrainConfig,
    platform: PlatformSettings,
    dist: ddp.Distributed,
    data: SnapshotData,
    bound: Any,
) -> TrainResult | None:
    classes = list(data.classes)
    model: nn.Module = DigitNet(len(classes))
    client: MlflowClient | None = None
    base: _Base | None = None
    run_id = experiment_id = ""
    if dist.is_main:
        # Only rank 0 reads the base: DDP copies rank 0's weights to every rank on wrapping.
        client = MlflowClient(tracking_uri=platform.mlflow_uri, registry_uri=platform.mlflow_uri)
        base = _load_base(client, platform.mlflow_uri, config)
        if base is not None:
            load_compatible(model, base.state, with_head=base.classes == classes)
            bound.info("starting from base", base_version=base.version)
        experiment_id = _experiment_id(client, config.experiment_name or config.model_name)
        run = client.create_run(
            experiment_id, run_name=config.training_run_id, tags=_run_tags(config, dist, base)
        )
        run_id = run.info.run_id
        _log_params(client, run_id, config, data, dist, base)
    try:
        model, loader = dist.prepare(
            model, data.train.dataset(), batch_size=config.batch_size, seed=config.seed
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        validation = data.validation.dataset()
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        for epoch in range(config.epochs):
            metrics["train_loss"] = _run_epoch(model, loader, optimizer, dist)
            accuracy = _accuracy(model, validation, dist)
            if accuracy is not None:
                metrics["val_accuracy"] = accuracy
            if client is not None:
                _log_metrics(client, run_id, metrics, step=epoch)
            bound.info("epoch done", epoch=epoch, **metrics)
        metrics["train_seconds"] = time.perf_counter() - started
        if client is None:
            dist.barrier()
            return None
        result = _publish(client, config, run_id, experiment_id, model, data, dist, base, metrics)
    except BaseException:
        if client is not None and run_id:
            client.set_terminated(run_id, status="FAILED")
        raise
    # Ranks other than 0 wait here, so the job ends when the version exists.
    dist.barrier()
    bound.info("model registered", run_id=result.run_id, version=result.version)
    return result


def _log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, float], *, step: int
) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()]
    )


def _run_tags(config: TrainConfig, dist: ddp.Distributed, base: _Base | None) -> dict[str, str]:
    tags = {
        "project_id": config.project_id,
        "snapshot_id": config.snapshot_id,
        "base_version": base.version if base else NO_BASE,
        "git_sha": _git_sha(),
        "correlation_id": config.correlation_id or "",
        "training_run_id": config.training_run_id or "",
        "preprocess_version": PREPROCESS_VERSION,
        "mlflow.source.name": "flywheel_vision.train",
        "mlflow.source.type": "JOB",
    }
    return tags | _library_versions() | _hardware(dist)


def _log_params(
    client: MlflowClient,
    run_id: str,
    config: TrainConfig,
    data: SnapshotData,
    dist: ddp.Distributed,
    base: _Base | None,
) -> None:
    params = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "global_batch_size": config.batch_size * dist.world_size,
        "lr": config.lr,
        "seed": config.seed,
        "optimizer": "Adam",
        "architecture": DigitNet.__name__,
        "num_classes": len(data.classes),
        "train_images": len(data.train),
        "validation_images": len(data.validation),
        "excluded_labels": len(config.excluded_label_ids),
        "world_size": dist.world_size,
        "base_alias": config.base_alias or "",
        "base_version": base.version if base else NO_BASE,
        "base_head_reused": bool(base and base.classes == list(data.classes)),
        "snapshot_id": config.snapshot_id,
    }
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


def _publish(
    client: MlflowClient,
    config: TrainConfig,
    run_id: str,
    experiment_id: str,
    model: nn.Module,
    data: SnapshotData,
    dist: ddp.Distributed,
    base: _Base | None,
    metrics: dict[str, float],
) -> TrainResult:
    """Export, check, log the artifacts, register the version (rank 0 only)."""
    held_out = data.validation if len(data.validation) else data.train
    sample = torch.from_numpy(held_out.images[:_PARITY_IMAGES])
    with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
        metrics |= _write_artifacts(Path(tmp), model, data.classes, config, sample)
        client.log_artifacts(run_id, tmp, artifact_path=ARTIFACT_PATH)
    _log_metrics(
        client,
        run_id,
        {k: metrics[k] for k in ("train_seconds", "parity_max_abs_diff", "model_size_bytes")},
        step=0,
    )
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
    base_version = base.version if base else NO_BASE
    _ensure_registered_model(client, config.model_name)
    version = client.create_model_version(
        config.model_name,
        source,
        run_id=run_id,
        tags={
            "project_id": config.project_id,
            "snapshot_id": config.snapshot_id,
            "base_version": base_version,
            "correlation_id": config.correlation_id or "",
            "training_run_id": config.training_run_id or "",
            "git_sha": run.data.tags.get("git_sha", "unknown"),
        },
        description=f"Trained on snapshot {config.snapshot_id} from base {base_version}.",
    )
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(
        run_id=run_id,
        experiment_id=experiment_id,
        model_name=config.model_name,
        version=str(version.version),
        artifact_uri=source,
        project_id=config.project_id,
        snapshot_id=config.snapshot_id,
        base_version=base.version if base else None,
        classes=list(data.classes),
        metrics=metrics,
        world_size=dist.world_size,
        correlation_id=config.correlation_id,
        training_run_id=config.training_run_id,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel_vision.train",
        description=(
            "Train a model version from a dataset snapshot and register it in MLflow. "
            "S3 and MLflow default to FLYWHEEL_S3_* and FLYWHEEL_MLFLOW_URI; S3 credentials "
            "are read from the environment only, so they never show in a process list."
        ),
    )
    parser.add_argument("--project-id", required=True)
    parser.add_argument("--snapshot-id", required=True)
    parser.add_argument("--model-name", required=True, help="registered model of the line")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (model name)")
    parser.add_argument("--base-alias", default="champion", help="alias to start from")
    parser.add_argument("--base-version", default=None, help="version to start from")
    parser.add_argument("--no-base", action="store_true", help="train from scratch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--correlation-id", default=None)
    parser.add_argument("--training-run-id", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    parser.add_argument("--data-bucket", default=DATA_BUCKET)
    parser.add_argument("--s3-endpoint", default=None, help="host:port (FLYWHEEL_S3_ENDPOINT)")
    parser.add_argument("--mlflow-uri", default=None, help="tracking URI (FLYWHEEL_MLFLOW_URI)")
    parser.add_argument("--result-file", type=Path, default=None, help="JSON result (rank 0)")
    parser.add_argument(
        "--exclude-labels-file",
        type=Path,
        default=None,
        help="JSON list of label ids to leave out (quarantined labels)",
    )
    return parser


def read_label_ids(path: Path) -> frozenset[uuid.UUID]:
    """The label ids of a ``--exclude-labels-file``: a JSON list of UUID strings."""
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, list):
        raise InvalidInputError(
            "the exclude-labels file must hold a JSON list of label ids",
            details={"path": str(path)},
        )
    try:
        return frozenset(uuid.UUID(str(item)) for item in loaded)
    except ValueError as exc:
        raise InvalidInputError(
            "the exclude-labels file holds something that is not a label id",
            details={"path": str(path)},
        ) from exc


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the command line asks for (arguments parsed by ``main``'s parser)."""
    return TrainConfig(
        project_id=args.project_id,
        snapshot_id=args.snapshot_id,
        model_name=args.model_name,
        experiment_name=args.experiment,
        base_alias=None if args.no_base else args.base_alias,
        base_version=None if args.no_base else args.base_version,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        correlation_id=args.correlation_id,
        training_run_id=args.training_run_id,
        threads=args.threads,
        data_bucket=args.data_bucket,
        excluded_label_ids=(
            read_label_ids(args.exclude_labels_file) if args.exclude_labels_file else frozenset()
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.s3_endpoint:
        overrides["s3_endpoint"] = args.s3_endpoint
    if args.mlflow_uri:
        overrides["mlflow_uri"] = args.mlflow_uri
    platform = PlatformSettings().model_copy(update=overrides)
    configure_logging("trainer", level=platform.log_level, json=platform.log_json)
    config = config_from_args(args)
    result = train(config, platform=platform)
    if result is not None and args.result_file is not None:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        partial = args.result_file.with_name(args.result_file.name + ".partial")
        partial.write_text(result.model_dump_json(indent=2))
        # Renamed into place, so a dispatcher polling for the file never reads half of it.
        partial.replace(args.result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
