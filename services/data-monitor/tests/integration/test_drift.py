"""Drift checks on the real servers: inference logs through RabbitMQ, features and reports in
PostgreSQL, references and plots in S3, events back on the broker."""

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from flywheel_contracts import (
    DriftDetectedV1,
    InferenceLoggedV1,
    LabelsRequestedV1,
    ThresholdReachedV1,
)
from flywheel_contracts.datasets import image_key
from flywheel_contracts.events import DriftAction, ThresholdReason
from flywheel_data_monitor.drift import DriftThresholds
from flywheel_data_monitor.settings import DriftSettings
from flywheel_runtime.drift_reference import DriftReference, encode_reference, reference_key
from flywheel_runtime.messaging import publish_event
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.events import EventProbe
from flywheel_testing.wait import wait_for

from .conftest import CLASSES, World

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

VERSION = "3"
BATCH = 300


def _drift_settings(**overrides: Any) -> DriftSettings:
    return DriftSettings(
        thresholds=DriftThresholds(min_samples=100),
        check_interval_s=3600,  # only volume triggers checks here
        check_every_samples=BATCH,
        window_samples=BATCH,
        min_fresh_labels=100,
        max_label_requests=20,
        **overrides,
    )


def _reference(rng: np.random.Generator, n: int = 600) -> DriftReference:
    return DriftReference(
        embeddings=rng.normal(size=(n, 16)),
        statistics={
            "brightness": rng.normal(0.13, 0.03, size=n).clip(0, 1),
            "contrast": rng.normal(0.3, 0.02, size=n).clip(0, 1),
            "width": np.full(n, 28.0),
            "height": np.full(n, 28.0),
        },
        predicted=[CLASSES[i % 10] for i in range(n)],
    )


def _logs(
    rng: np.random.Generator, project: str, n: int, *, drifted: bool, version: str = VERSION
) -> list[InferenceLoggedV1]:
    events = []
    for i in range(n):
        embedding = rng.normal(size=16)
        brightness = float(np.clip(rng.normal(0.13, 0.03), 0, 1))
        if drifted:  # inverted digits: bright, and unlike anything the model was trained on
            embedding[:4] += 2.5
            brightness = 1 - brightness
        sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
        events.append(
            InferenceLoggedV1.model_validate(
                {
                    "payload": {
                        "request_id": uuid.uuid4(),
                        "project_id": project,
                        "model_line": f"{project}-classifier",
                        "registered_model": f"{project}-classifier",
                        "model_version": version,
                        "input_sha256": sha,
                        "predicted_class": "8" if drifted else CLASSES[i % 10],
                        "confidence": 0.55 if drifted else 0.98,
                        "latency_ms": 3.0,
                        "status": "ok",
                        "served_at": datetime.now(UTC),
                        "embedding": [round(float(v), 5) for v in embedding],
                        "image_stats": {
                            "brightness": brightness,
                            "contrast": float(np.clip(rng.normal(0.3, 0.02), 0, 1)),
                            "width": 28,
                            "height": 28,
                        },
                        "input_key": image_key(sha),
                    }
                }
            )
        )
    return events


async def _setup(world: World, storage: ObjectStorage, **overrides: Any) -> EventProbe:
    rng = np.random.default_rng(11)
    project = world.labeling.project
    await storage.put(
        world.bucket,
        reference_key("drift/reference", f"{project}-classifier", VERSION),
        encode_reference(_reference(rng)),
    )
    probe = EventProbe(
        world.rabbit_url, world.topology, DriftDetectedV1, LabelsRequestedV1, ThresholdReachedV1
    )
    await probe.start()
    world.stack.push_async_callback(probe.stop)
    await world.start(drift=_drift_settings(**overrides))
    return probe


async def _publish(world: World, events: list[InferenceLoggedV1]) -> None:
    for event in events:
        await publish_event(world.labeling.broker, world.topology, event)


async def _wait_reports(world: World, n: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        response = await world.get("/drift-reports")
        reports: list[dict[str, Any]] = response.json()["reports"]
        return reports if len(reports) >= n else None

    found = await wait_for(enough, timeout=60, message=f"{n} drift reports")
    assert found is not None
    return found


async def test_windows_like_the_training_data_raise_no_alarm_then_drift_asks_for_labels(
    world: World, storage: ObjectStorage
) -> None:
    probe = await _setup(world, storage)
    rng = np.random.default_rng(12)
    project = world.labeling.project

    for window in range(1, 4):
        await _publish(world, _logs(rng, project, BATCH, drifted=False))
        reports = await _wait_reports(world, window)
        newest = reports[0]
        assert not newest["drifted"], newest["report"]["tests"]
        assert all(t["judged"] for t in newest["report"]["tests"])
    await probe.collect()
    assert probe.of(DriftDetectedV1) == []

    drifted = _logs(rng, project, BATCH, drifted=True)
    await _publish(world, drifted)

    [detected] = await probe.wait(DriftDetectedV1, timeout=60)
    [requested] = await probe.wait(LabelsRequestedV1, timeout=30)
    payload = detected.payload
    assert payload.action is DriftAction.LABELS_REQUESTED
    assert payload.model_version == VERSION
    assert {t.feature for t in payload.tests if t.drifted} >= {"embedding", "brightness"}
    assert any(line.startswith("embedding: domain classifier AUC") for line in payload.reasons)
    assert requested.causation_id == detected.event_id
    assert requested.payload.report_id == payload.report_id
    drifted_inputs = {e.payload.input_sha256 for e in drifted}
    items = requested.payload.items
    assert len(items) == 20
    assert sum(item.input_sha256 in drifted_inputs for item in items) >= 18
    assert [i.score for i in items] == sorted((i.score for i in items), reverse=True)
    assert all(item.image_key == image_key(item.input_sha256) for item in items)
    assert probe.of(ThresholdReachedV1) == []

    report = (await world.get_path(f"/v1/drift-reports/{payload.report_id}")).json()
    assert report["drifted"]
    assert report["action"] == "labels_requested"
    assert report["event_id"] == str(detected.event_id)
    embedding = next(t for t in report["report"]["tests"] if t["feature"] == "embedding")
    assert embedding["p_value"] < 1e-6
    assert embedding["effect"] >= 0.7
    plot = await world.get_path(f"/v1/drift-reports/{payload.report_id}/plots/brightness.png")
    assert plot.status_code == 200
    assert plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(b"\x89PNG\r\n\x1a\n")
    missing = await world.get_path(f"/v1/drift-reports/{payload.report_id}/plots/nothing.png")
    assert missing.status_code == 404

    # Drift again within the cooldown: reported, nothing announced.
    await _publish(world, _logs(rng, project, BATCH, drifted=True))
    reports = await _wait_reports(world, 5)
    assert reports[0]["drifted"]
    assert reports[0]["action"] is None
    assert "cooldown" in reports[0]["note"]
    await probe.collect()
    assert len(probe.of(DriftDetectedV1)) == 1


async def test_drift_with_enough_fresh_labels_fires_a_drift_retrain(
    world: World, storage: ObjectStorage
) -> None:
    probe = await _setup(world, storage)
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000))
    await labeling.publish(*[await labeling.batch(50) for _ in range(3)])
    await world.wait_reports(3)

    await _publish(world, _logs(np.random.default_rng(13), labeling.project, BATCH, drifted=True))

    [detected] = await probe.wait(DriftDetectedV1, timeout=60)
    [fired] = await probe.wait(ThresholdReachedV1, timeout=30)
    assert detected.payload.action is DriftAction.RETRAIN
    assert fired.payload.reason is ThresholdReason.DRIFT
    assert fired.payload.labels_since_last == 150
    assert fired.payload.threshold == 100
    assert fired.causation_id == detected.event_id
    assert probe.of(LabelsRequestedV1) == []
    state = (await world.get("/state")).json()
    assert state["pending"]["labels"] == 0
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["reason"] == "drift"
    assert decision["trigger"] == "drift"


async def test_a_version_without_a_reference_is_not_judged(
    world: World, storage: ObjectStorage
) -> None:
    probe = await _setup(world, storage)
    # A version nobody computed a reference for.
    rng = np.random.default_rng(14)
    await _publish(world, _logs(rng, world.labeling.project, BATCH, drifted=True, version="99"))

    async def checked() -> bool:
        count = await world.scalar(
            "SELECT count(*) FROM drift_lines WHERE last_checked_at IS NOT NULL"
        )
        return int(count) == 1

    await wait_for(checked, timeout=60, message="the line checked")
    assert (await world.get("/drift-reports")).json()["reports"] == []
    await probe.collect()
    assert probe.of(DriftDetectedV1) == []
