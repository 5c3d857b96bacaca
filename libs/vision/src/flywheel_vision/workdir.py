"""The work folder of one training run: the snapshot as local files, the base version, outputs.

Local rank 0 of each node prepares it (every node needs its own copy of the images) and writes
``prepared.json`` last, under a name the other local ranks wait for; they share the folder
rather than fetching the snapshot once per process. The folder is named after the run and the
launcher (torchrun's agent, the parent of every local rank), so a stale folder of an earlier
launch is never taken for this one. Layout::

    <work>/images/<sha256>.<ext>     every TRAIN and VALIDATION image of the snapshot, once
    <work>/base/                     model.onnx, labels.json, model.json, state_dict.pt
    <work>/output/                   what the entry point leaves (rank 0)
    <work>/context-rank<R>.json      the TrainingContext of rank R
    <work>/prepared.json             written last by local rank 0
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Final

import structlog
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from pydantic import BaseModel, ConfigDict

from flywheel_contracts.datasets import ManifestEntry, Split
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_runtime.storage import ObjectStorage
from flywheel_vision.contract import (
    LABELS_FILE,
    ONNX_FILE,
    SIGNATURE_FILE,
    STATE_DICT_FILE,
    BaseModelFiles,
    DistributedEnv,
    Sample,
    signature_or_reference,
)
from flywheel_vision.export import read_labels

__all__ = [
    "PreparedWork",
    "WorkFolder",
    "download_base",
    "fetch_snapshot",
    "training_entries",
]

PREPARED_FILE: Final = "prepared.json"
IMAGES_DIR: Final = "images"
BASE_DIR: Final = "base"
OUTPUT_DIR: Final = "output"
PREPARE_WAIT_S: Final = 1800.0
"""How long the other local ranks wait for local rank 0 to fetch the snapshot."""

_FETCH_CONCURRENCY: Final = 8
_POLL_S: Final = 0.2
_EXTENSIONS: Final = ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"))

log = structlog.get_logger(__name__)


class PreparedWork(BaseModel):
    """What local rank 0 prepared, for every local rank to read."""

    model_config = ConfigDict(frozen=True)

    launcher: int
    """Parent process id of the local ranks: tells this launch's folder from a stale one."""
    classes: list[str]
    train: list[Sample]
    validation: list[Sample]
    base: BaseModelFiles | None = None


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


def _extension(data: bytes) -> str:
    return next((ext for magic, ext in _EXTENSIONS if data.startswith(magic)), ".img")


async def fetch_snapshot(
    storage: ObjectStorage,
    project_id: str,
    snapshot_id: str,
    images_dir: Path,
    *,
    bucket: str,
    excluded_label_ids: Collection[uuid.UUID] = (),
    concurrency: int = _FETCH_CONCURRENCY,
) -> tuple[list[str], list[Sample], list[Sample]]:
    """Write a snapshot's TRAIN and VALIDATION images into ``images_dir``; classes and samples.

    Classes are the sorted names of the remaining entries, so the same snapshot and exclusions
    give the same output order on every node. TEST stays in S3: it belongs to the validator.
    """
    manifest = await SnapshotStore(storage, bucket=bucket).resolve(project_id, snapshot_id)
    entries = training_entries(manifest.entries, excluded_label_ids)
    classes = sorted({e.class_name for e in entries})
    index = {name: i for i, name in enumerate(classes)}
    await asyncio.to_thread(images_dir.mkdir, parents=True, exist_ok=True)
    gate = asyncio.Semaphore(concurrency)
    paths: dict[str, Path] = {}

    async def fetch(entry: ManifestEntry) -> None:
        async with gate:
            data = await storage.get(bucket, entry.image_key)
        path = images_dir / f"{entry.image_sha256}{_extension(data)}"
        await asyncio.to_thread(path.write_bytes, data)
        paths[entry.image_sha256] = path

    unique = {e.image_sha256: e for e in entries}
    await asyncio.gather(*(fetch(e) for e in unique.values()))

    def samples(split: Split) -> list[Sample]:
        return [
            Sample(
                path=paths[e.image_sha256],
                label=index[e.class_name],
                class_name=e.class_name,
                label_id=e.label_id,
            )
            for e in entries
            if e.split is split
        ]

    return classes, samples(Split.TRAIN), samples(Split.VALIDATION)


def download_base(
    client: MlflowClient, tracking_uri: str, model_name: str, version: str, folder: Path
) -> BaseModelFiles:
    """The files of ``version`` in ``folder``: ONNX and class names, and when the version has
    them its ``model.json`` and PyTorch weights."""
    source = client.get_model_version_download_uri(model_name, version)
    local = Path(
        download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=tracking_uri)
    )
    classes = read_labels((local / LABELS_FILE).read_bytes())
    signature_file = local / SIGNATURE_FILE
    state = local / STATE_DICT_FILE
    return BaseModelFiles(
        version=version,
        classes=classes,
        onnx=local / ONNX_FILE,
        state_dict=state if state.is_file() else None,
        signature=signature_or_reference(
            signature_file.read_bytes() if signature_file.is_file() else None, len(classes)
        ),
    )


class WorkFolder:
    """One run's work folder as seen by one process; see the module docstring."""

    def __init__(self, path: Path, dist: DistributedEnv, *, owned: bool, launcher: int) -> None:
        self.path = path
        self.dist = dist
        self.owned = owned
        """Created by the runner (removed when every local rank is done), not the caller's."""
        self.launcher = launcher

    @classmethod
    def for_run(
        cls,
        run_name: str,
        dist: DistributedEnv,
        *,
        given: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> WorkFolder:
        """The folder of this launch: ``given``, or one under the temporary directory."""
        launcher = os.getppid()
        if given is not None:
            return cls(given.resolve(), dist, owned=False, launcher=launcher)
        base = Path((env or os.environ).get("TMPDIR") or tempfile.gettempdir())
        if dist.local_world_size <= 1:
            # Nobody to share with: a fresh folder, so in-process callers never collide.
            fresh = Path(tempfile.mkdtemp(prefix=f"flywheel-train-{run_name}-", dir=base))
            return cls(fresh, dist, owned=True, launcher=launcher)
        return cls(
            base / f"flywheel-train-{run_name}-{launcher}", dist, owned=True, launcher=launcher
        )

    @property
    def images(self) -> Path:
        return self.path / IMAGES_DIR

    @property
    def base(self) -> Path:
        return self.path / BASE_DIR

    @property
    def output(self) -> Path:
        return self.path / OUTPUT_DIR

    def context_file(self) -> Path:
        return self.path / f"context-rank{self.dist.rank}.json"

    @property
    def preparer(self) -> bool:
        """Whether this process prepares the folder (local rank 0)."""
        return self.dist.local_rank == 0

    def reset(self) -> None:
        """Local rank 0, before preparing: an empty folder with an empty output folder."""
        if self.owned and self.dist.local_world_size > 1:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / PREPARED_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.output, ignore_errors=True)
        self.output.mkdir(parents=True)

    def publish(self, prepared: PreparedWork) -> None:
        """Local rank 0: tell the other local ranks the folder is ready (renamed into place)."""
        partial = self.path / f".{PREPARED_FILE}.partial"
        partial.write_text(prepared.model_dump_json())
        partial.replace(self.path / PREPARED_FILE)

    def wait(self, timeout_s: float = PREPARE_WAIT_S) -> PreparedWork:
        """The other local ranks: what local rank 0 prepared, once it has."""
        deadline = time.monotonic() + timeout_s
        marker = self.path / PREPARED_FILE
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                prepared = PreparedWork.model_validate_json(marker.read_bytes())
                if prepared.launcher == self.launcher:
                    return prepared
            if time.monotonic() >= deadline:
                raise DependencyUnavailableError(
                    "local rank 0 did not prepare the training data in time",
                    details={"work_dir": str(self.path), "timeout_s": timeout_s},
                )
            time.sleep(_POLL_S)

    def done(self) -> None:
        """Every local rank at its end; the last one removes a folder the runner created."""
        if not self.owned:
            return
        with contextlib.suppress(OSError):
            (self.path / f"done-{self.dist.local_rank}").touch()
            finished = len(list(self.path.glob("done-*")))
            if finished >= self.dist.local_world_size:
                shutil.rmtree(self.path, ignore_errors=True)
                log.debug("work folder removed", work_dir=str(self.path))
