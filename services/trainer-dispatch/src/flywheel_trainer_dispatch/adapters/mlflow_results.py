"""A training run's result read from MLflow, where a run on another machine leaves it.

The local backend reads the JSON that ``--result-file`` names; a pod's files are gone with the
pod, and a result must survive the pod (its TTL, a dispatcher down for a day). What survives is
what the training job registers: rank 0 creates the model version with the tag
``training_run_id`` = the dispatcher's run id, as the very last step. So the result is that
version (the newest, should a retried pod have registered twice) with its MLflow run's metrics
and ``world_size`` parameter: the fields of ``TrainingOutput``, the same contract as the file.

``MlflowClient`` blocks and retries for minutes when the server is down, so lookups run on a
small executor of their own, each bounded in time: a slow MLflow makes a lookup fail with
``DependencyUnavailableError`` (the backend keeps watching and asks again), and never holds up
the Kubernetes calls, which use the default executor.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_trainer_dispatch.ports import TrainingOutput

RUN_TAG: Final = "training_run_id"
NO_BASE: Final = "none"
"""``base_version`` tag of a version trained from scratch (``flywheel_vision.train``)."""


class MlflowResults:
    """Finds the model version a training run registered."""

    def __init__(self, tracking_uri: str, *, timeout_s: float = 30.0) -> None:
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlflow-results")

    async def result(self, run_id: uuid.UUID) -> TrainingOutput | None:
        """The run's result, or None when it registered no version."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._result, run_id),
                timeout=self._timeout_s,
            )
        except TimeoutError as error:
            raise DependencyUnavailableError(
                "MLflow did not answer in time", details={"run_id": str(run_id)}
            ) from error

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _result(self, run_id: uuid.UUID) -> TrainingOutput | None:
        try:
            # A UUID's text needs no quoting in the filter.
            versions = self._client.search_model_versions(f"tags.{RUN_TAG} = '{run_id}'")
            if not versions:
                return None
            version = max(versions, key=lambda v: int(v.version))
            run = self._client.get_run(version.run_id) if version.run_id else None
        except MlflowException as error:
            raise DependencyUnavailableError(
                f"could not read the result from MLflow ({error.error_code})",
                details={"run_id": str(run_id)},
            ) from error
        except OSError as error:
            raise DependencyUnavailableError(
                "MLflow did not answer", details={"run_id": str(run_id)}
            ) from error
        base = (version.tags or {}).get("base_version")
        metrics = dict(run.data.metrics) if run is not None else {}
        world_size = run.data.params.get("world_size", "1") if run is not None else "1"
        return TrainingOutput(
            run_id=str(version.run_id or ""),
            model_name=str(version.name),
            version=str(version.version),
            base_version=None if base in (None, "", NO_BASE) else base,
            metrics={key: float(value) for key, value in metrics.items()},
            world_size=int(world_size) if str(world_size).isdigit() else 1,
            training_run_id=str(run_id),
        )
