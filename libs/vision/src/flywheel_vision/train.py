"""The training runner: snapshot in S3 → entry point → registered model version in MLflow.

``python -m flywheel_vision.train`` runs it in one process; ``torchrun --nproc_per_node=N -m
flywheel_vision.train`` runs it as N ranks. Every rank prepares (local rank 0) or waits for the
work folder, then calls the model line's entry point (``--entry-point``: the reference DigitNet
training unless told otherwise; see ``flywheel_vision.contract``). Only rank 0 talks to MLflow,
so one job is always one MLflow run and one model version: it creates the run before the entry
point starts, and afterwards checks what the entry point left, logs it, registers the version
and writes the result file. ``train`` holds the logic so tests and other Python callers run it
in-process; ``main`` only parses arguments around it.

The job reads only the TRAIN and VALIDATION labels of the snapshot (TEST belongs to the
validator), hands the entry point the registered champion's files when there is one, and
records everything needed to reproduce or audit the version: snapshot, base version, entry
point, hyperparameters, git sha, library versions and hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as host_platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import structlog
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from flywheel_runtime.errors import InvalidInputError
from flywheel_runtime.logs import configure_logging
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import DATA_BUCKET, ObjectStorage
from flywheel_vision.contract import (
    SIGNATURE_FILE,
    BaseModelFiles,
    DistributedEnv,
    TrainingContext,
)
from flywheel_vision.entrypoints import DEFAULT_ENTRY_POINT, EntryPoint, EntryPointError
from flywheel_vision.export import (
    CONFIG_FILE,
    LABELS_FILE,
    ONNX_FILE,
    STATE_DICT_FILE,
    labels_json,
    triton_config,
)
from flywheel_vision.outputs import ModelOutputs, read_outputs, smoke_test
from flywheel_vision.preprocess import PREPROCESS_VERSION
from flywheel_vision.workdir import (
    PreparedWork,
    WorkFolder,
    download_base,
    fetch_snapshot,
    training_entries,
)

__all__ = [
    "ARTIFACT_PATH",
    "TrainConfig",
    "TrainResult",
    "config_from_args",
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
    """What to train, from which data, on top of which base, with which entry point."""

    model_config = ConfigDict(frozen=True)

    project_id: str
    snapshot_id: str
    model_name: str
    """Registered model (one per model line) the new version is added to."""
    model_line: str | None = None
    """The model line, recorded as a tag (it names the registered model by default)."""
    experiment_name: str | None = None
    """MLflow experiment of the run; defaults to ``model_name``."""
    entry_point: str = DEFAULT_ENTRY_POINT
    """``package.module:function`` or a script path (``flywheel_vision.contract``)."""
    base_alias: str | None = "champion"
    """Alias of the version to start from; nothing there means training from scratch."""
    base_version: str | None = None
    """Explicit version to start from; wins over ``base_alias`` and must exist."""
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    """Further hyperparameters for the entry point, over ``epochs``, ``batch_size``, ``lr``
    and ``seed`` (which it receives too)."""
    correlation_id: str | None = None
    training_run_id: str | None = None
    """The dispatcher's id of this training run (one per ``threshold.reached``)."""
    threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads of this process; default: torch's choice (``OMP_NUM_THREADS``)."""
    data_bucket: str = DATA_BUCKET
    excluded_label_ids: frozenset[uuid.UUID] = frozenset()
    """Labels that must not enter training (quarantined batches); dropped before loading."""
    register_version: bool = True
    """False: an experiment; the run is logged with its model files but no version is made
    (``flywheel models register <run id>`` makes one later)."""
    work_dir: Path | None = None
    """Work folder to use and keep; default: a temporary one, removed at the end."""

    def all_hyperparameters(self) -> dict[str, JsonValue]:
        """What the entry point receives: the common four, then the line's own."""
        common: dict[str, JsonValue] = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
        }
        return common | self.hyperparameters


class TrainResult(BaseModel):
    """What rank 0 reports: the run, the registered version and its metrics."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    model_name: str
    version: str | None
    """None for an experiment (``register_version=False``)."""
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


def _hardware(dist: DistributedEnv) -> dict[str, str]:
    cuda = torch.cuda.is_available()
    return {
        "hardware.cpu_count": str(os.cpu_count() or 0),
        "hardware.torch_threads": str(torch.get_num_threads()),
        "hardware.cuda_available": str(cuda).lower(),
        "hardware.gpu": torch.cuda.get_device_name(dist.local_rank) if cuda else "none",
        "hardware.device": f"cuda:{dist.local_rank}" if cuda else "cpu",
        "distributed.world_size": str(dist.world_size),
        "distributed.backend": ("nccl" if cuda else "gloo") if dist.world_size > 1 else "none",
    }


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


def _client(platform: PlatformSettings) -> MlflowClient:
    return MlflowClient(tracking_uri=platform.mlflow_uri, registry_uri=platform.mlflow_uri)


def train(
    config: TrainConfig,
    *,
    platform: PlatformSettings | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainResult | None:
    """Run one training job; the result on rank 0, None on the other ranks.

    ``platform`` says where S3 and MLflow are (default: ``FLYWHEEL_*`` env); ``env`` is the
    process environment the distributed place is read from (default: ``os.environ``).
    Blocking: run it in a worker thread or process from async code.
    """
    platform = platform or PlatformSettings()
    env = os.environ if env is None else env
    dist = DistributedEnv.from_env(env)
    entry = EntryPoint.parse(config.entry_point).resolved()
    work = WorkFolder.for_run(config.training_run_id or "run", dist, given=config.work_dir, env=env)
    bound = log.bind(
        rank=dist.rank,
        correlation_id=config.correlation_id,
        training_run_id=config.training_run_id,
        snapshot_id=config.snapshot_id,
        entry_point=str(entry),
    )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        prepared = _prepare(config, platform, work) if work.preparer else work.wait()
        if not prepared.train:
            raise InvalidInputError(
                "the snapshot has no training images", details={"snapshot_id": config.snapshot_id}
            )
        bound.info(
            "snapshot loaded",
            classes=len(prepared.classes),
            train_images=len(prepared.train),
            validation_images=len(prepared.validation),
            base_version=prepared.base.version if prepared.base else None,
        )
        context = TrainingContext(
            project_id=config.project_id,
            snapshot_id=config.snapshot_id,
            model_name=config.model_name,
            training_run_id=config.training_run_id,
            correlation_id=config.correlation_id,
            work_dir=work.path,
            output_dir=work.output,
            classes=prepared.classes,
            train=prepared.train,
            validation=prepared.validation,
            base=prepared.base,
            hyperparameters=config.all_hyperparameters(),
            distributed=dist,
            threads=config.threads,
        )
        context_file = work.context_file()
        context_file.write_text(context.model_dump_json())
        if dist.rank != 0:
            entry.run(context, context_file)
            return None
        return _train_and_publish(config, platform, entry, context, context_file, bound)
    finally:
        work.done()


def _prepare(config: TrainConfig, platform: PlatformSettings, work: WorkFolder) -> PreparedWork:
    """Local rank 0: fetch the snapshot and the base version into the work folder."""
    work.reset()
    classes, train_samples, validation = asyncio.run(_fetch(config, platform, work.images))
    base: BaseModelFiles | None = None
    client = _client(platform)
    found = resolve_version(
        client, config.model_name, alias=config.base_alias, version=config.base_version
    )
    if found is not None:
        # The resolved number, not the alias: the alias may move while we download. The URI
        # is resolved through our client, since ``models:/`` downloads would consult the
        # process's default registry (``MLFLOW_TRACKING_URI`` or a local ./mlflow.db).
        base = download_base(
            client, platform.mlflow_uri, config.model_name, str(found.version), work.base
        )
    prepared = PreparedWork(
        launcher=work.launcher,
        classes=classes,
        train=train_samples,
        validation=validation,
        base=base,
    )
    work.publish(prepared)
    return prepared


async def _fetch(config: TrainConfig, platform: PlatformSettings, images: Path) -> Any:
    storage = ObjectStorage.from_settings(platform)
    try:
        return await fetch_snapshot(
            storage,
            config.project_id,
            config.snapshot_id,
            images,
            bucket=config.data_bucket,
            excluded_label_ids=config.excluded_label_ids,
        )
    finally:
        storage.close()


def _train_and_publish(
    config: TrainConfig,
    platform: PlatformSettings,
    entry: EntryPoint,
    context: TrainingContext,
    context_file: Path,
    bound: Any,
) -> TrainResult:
    """Rank 0: the MLflow run around the entry point, then the checked outputs into it."""
    client = _client(platform)
    experiment_id = _experiment_id(client, config.experiment_name or config.model_name)
    run = client.create_run(
        experiment_id,
        run_name=config.training_run_id,
        tags=_run_tags(config, entry, context),
    )
    run_id = run.info.run_id
    try:
        params = _params(config, entry, context)
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        started = time.perf_counter()
        entry.run(context, context_file)
        seconds = time.perf_counter() - started
        outputs = read_outputs(context.output_dir, context.classes)
        smoke_test(outputs, [s.path for s in (context.validation or context.train)])
        result = _publish(client, config, run_id, experiment_id, context, outputs, params, seconds)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    bound.info("model registered", run_id=result.run_id, version=result.version)
    return result


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Sequence[float]]) -> None:
    """Each metric's values at steps 0, 1, …; MLflow takes at most 1 000 per batch."""
    now = int(time.time() * 1000)
    entries = [
        Metric(key, value, now, step)
        for key, values in metrics.items()
        for step, value in enumerate(values)
    ]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])


def _run_tags(config: TrainConfig, entry: EntryPoint, context: TrainingContext) -> dict[str, str]:
    base = context.base
    tags = {
        "project_id": config.project_id,
        "snapshot_id": config.snapshot_id,
        "base_version": base.version if base else NO_BASE,
        "git_sha": _git_sha(),
        "correlation_id": config.correlation_id or "",
        "training_run_id": config.training_run_id or "",
        "entry_point": str(entry),
        "preprocess_version": PREPROCESS_VERSION,
        "mlflow.source.name": "flywheel_vision.train",
        "mlflow.source.type": "JOB",
    }
    if config.model_line:
        tags["model_line"] = config.model_line
    return tags | _library_versions() | _hardware(context.distributed)


def _params(config: TrainConfig, entry: EntryPoint, context: TrainingContext) -> dict[str, str]:
    base = context.base
    params: dict[str, Any] = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in context.hyperparameters.items()
    }
    params |= {
        "entry_point": str(entry),
        "num_classes": len(context.classes),
        "train_images": len(context.train),
        "validation_images": len(context.validation),
        "excluded_labels": len(config.excluded_label_ids),
        "world_size": context.distributed.world_size,
        "base_alias": config.base_alias or "",
        "base_version": base.version if base else NO_BASE,
        "snapshot_id": config.snapshot_id,
    }
    return {key: str(value)[:6000] for key, value in params.items()}


def _model_files(
    config: TrainConfig, context: TrainingContext, outputs: ModelOutputs
) -> dict[str, bytes]:
    """What the version ships with: the entry point's files and the platform's labels."""
    files = {
        ONNX_FILE: outputs.onnx,
        SIGNATURE_FILE: outputs.signature.model_dump_json(indent=2).encode(),
        LABELS_FILE: labels_json(context.classes),
        CONFIG_FILE: (
            outputs.config_pbtxt
            or triton_config(
                config.model_name,
                num_classes=len(context.classes),
                max_batch_size=TRITON_MAX_BATCH,
                preferred_batch_sizes=TRITON_PREFERRED_BATCHES,
                max_queue_delay_microseconds=TRITON_QUEUE_DELAY_US,
                input_dims=outputs.signature.preprocessing.input_shape,
                embedding_size=outputs.signature.embedding_size,
            )
        ).encode(),
    }
    if outputs.state_dict is not None:
        files[STATE_DICT_FILE] = outputs.state_dict
    return files


def _publish(
    client: MlflowClient,
    config: TrainConfig,
    run_id: str,
    experiment_id: str,
    context: TrainingContext,
    outputs: ModelOutputs,
    logged_params: Mapping[str, str],
    seconds: float,
) -> TrainResult:
    """Log the checked outputs and register the version (rank 0 only)."""
    extra = {k: v for k, v in outputs.params.items() if k not in logged_params}
    if extra:
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in extra.items()])
    if outputs.signature.architecture:
        client.set_tag(run_id, "architecture", outputs.signature.architecture)
    metrics = dict(outputs.metrics)
    metrics["train_seconds"] = [seconds]
    metrics["model_size_bytes"] = [float(len(outputs.onnx))]
    _log_metrics(client, run_id, metrics)
    with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
        for name, data in _model_files(config, context, outputs).items():
            (Path(tmp) / name).write_bytes(data)
        client.log_artifacts(run_id, tmp, artifact_path=ARTIFACT_PATH)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
    base = context.base
    base_version = base.version if base else NO_BASE
    version: str | None = None
    if config.register_version:
        _ensure_registered_model(client, config.model_name)
        registered = client.create_model_version(
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
                "entry_point": run.data.tags.get("entry_point", ""),
            },
            description=f"Trained on snapshot {config.snapshot_id} from base {base_version}.",
        )
        version = str(registered.version)
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(
        run_id=run_id,
        experiment_id=experiment_id,
        model_name=config.model_name,
        version=version,
        artifact_uri=source,
        project_id=config.project_id,
        snapshot_id=config.snapshot_id,
        base_version=base.version if base else None,
        classes=list(context.classes),
        metrics={name: values[-1] for name, values in metrics.items()},
        world_size=context.distributed.world_size,
        correlation_id=config.correlation_id,
        training_run_id=config.training_run_id,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel_vision.train",
        description=(
            "Train a model version from a dataset snapshot with a model line's entry point and "
            "register it in MLflow. "
            "S3 and MLflow default to FLYWHEEL_S3_* and FLYWHEEL_MLFLOW_URI; S3 credentials "
            "are read from the environment only, so they never show in a process list."
        ),
    )
    parser.add_argument("--project-id", required=True)
    parser.add_argument("--snapshot-id", required=True)
    parser.add_argument("--model-name", required=True, help="registered model of the line")
    parser.add_argument("--model-line", default=None, help="model line (recorded as a tag)")
    parser.add_argument(
        "--entry-point",
        default=DEFAULT_ENTRY_POINT,
        help="package.module:function or a script path (default: the reference DigitNet)",
    )
    parser.add_argument(
        "--hyperparameters",
        type=_json_object,
        default={},
        help="JSON object of further hyperparameters for the entry point",
    )
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
    parser.add_argument("--work-dir", type=Path, default=None, help="work folder to use and keep")
    parser.add_argument(
        "--no-register",
        action="store_true",
        help="an experiment: log the run and its model files, register no version",
    )
    parser.add_argument(
        "--exclude-labels-file",
        type=Path,
        default=None,
        help="JSON list of label ids to leave out (quarantined labels)",
    )
    return parser


def _json_object(text: str) -> dict[str, JsonValue]:
    try:
        loaded = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return loaded


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
        model_line=args.model_line,
        experiment_name=args.experiment,
        entry_point=args.entry_point,
        hyperparameters=args.hyperparameters,
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
        register_version=not args.no_register,
        work_dir=args.work_dir,
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
    try:
        result = train(config, platform=platform)
    except EntryPointError as error:
        code = error.details.get("exit_code")
        if isinstance(code, int) and code < 0:
            # A script killed by a signal (the OOM killer, say): exit as a shell reports it,
            # so the dispatcher sees a kill (retryable), not an error of the script's.
            log.error("entry point killed", entry_point=config.entry_point, signal=-code)
            return 128 - code
        raise
    if result is not None and args.result_file is not None:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        partial = args.result_file.with_name(args.result_file.name + ".partial")
        partial.write_text(result.model_dump_json(indent=2))
        # Renamed into place, so a dispatcher polling for the file never reads half of it.
        partial.replace(args.result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
