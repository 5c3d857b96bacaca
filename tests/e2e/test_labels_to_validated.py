"""labels → threshold.reached → a real training run → model.validated, with all four services."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flywheel_contracts import (
    ModelTrainedV1,
    ModelValidatedV1,
    ThresholdReachedV1,
    ValidationVerdict,
)
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings
from flywheel_testing.events import EventProbe
from flywheel_trainer_dispatch.main import create_app as create_trainer_dispatch
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings
from flywheel_validator.gates import Gates
from flywheel_validator.main import create_app as create_validator
from flywheel_validator.settings import ValidatorSettings

from .conftest import Loop, create_project, post_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABELS = 1500
"""Enough for a test split of ~150 images, the validator's minimum."""


async def test_labels_become_a_trained_validated_challenger(
    loop: Loop, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    loop.with_mlflow(mlflow_tracking_uri)
    namespace = loop.topology.namespace
    probe = await loop.stack.enter_async_context(
        EventProbe(
            loop.rabbit_url, loop.topology, ThresholdReachedV1, ModelTrainedV1, ModelValidatedV1
        )
    )
    await loop.start(
        create_validator(
            ValidatorSettings(
                platform=loop.platform,
                namespace=namespace,
                db_schema=loop.schema("validator"),
                data_bucket=loop.bucket,
                # Small data, short training: floors for a model of ~1 200 training images.
                default_gates=Gates(min_accuracy=0.7, min_macro_f1=0.6, min_class_recall=0.2),
            )
        )
    )
    await loop.start(
        create_trainer_dispatch(
            TrainerDispatchSettings(
                platform=loop.platform,
                namespace=namespace,
                db_schema=loop.schema("trainer-dispatch"),
                data_bucket=loop.bucket,
                runs_dir=tmp_path / "runs",
                epochs=3,
                poll_interval_s=0.2,
                timeout_s=300,
            )
        )
    )
    await loop.start(
        create_data_monitor(
            DataMonitorSettings(
                platform=loop.platform,
                namespace=namespace,
                db_schema=loop.schema("data-monitor"),
                data_bucket=loop.bucket,
                tick_interval_s=0.2,
            )
        )
    )
    labeling = await loop.start(
        create_labeling(
            LabelingSettings(
                platform=loop.platform,
                auth=AuthSettings(dev_signing_key=loop.key),
                namespace=namespace,
                db_schema=loop.schema("labeling"),
                data_bucket=loop.bucket,
            )
        )
    )
    await create_project(labeling, loop, count=LABELS)

    await post_mnist(labeling, loop, LABELS)

    [fired] = await probe.wait(ThresholdReachedV1, timeout=60)
    [trained] = await probe.wait(ModelTrainedV1, timeout=240)
    [validated] = await probe.wait(ModelValidatedV1, timeout=120)
    assert trained.payload.snapshot_id == fired.payload.snapshot_id
    assert trained.correlation_id == fired.correlation_id == validated.correlation_id
    assert validated.payload.model_version == trained.payload.model_version
    assert validated.payload.verdict is ValidationVerdict.PASSED, validated.payload.reasons
    assert validated.payload.champion_version is None
    assert validated.payload.candidate_metrics["accuracy"] >= 0.7
    registry = MlflowClient(mlflow_tracking_uri)
    challenger = registry.get_model_version_by_alias(trained.payload.registered_model, "challenger")
    assert challenger.version == trained.payload.model_version
    assert challenger.tags["snapshot_id"] == fired.payload.snapshot_id
    run = registry.get_run(trained.payload.mlflow_run_id)
    assert run.data.tags["snapshot_id"] == fired.payload.snapshot_id
    assert "val_accuracy" in run.data.metrics
