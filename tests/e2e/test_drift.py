"""Drift on the real servers: a champion trained on MNIST serves digits as trained (no alarm),
then inverted digits (drift within one window, labels requested for the drifted images); the
labelers label them, the next drifted window retrains, and the new champion reads inverted
digits better than the old one."""

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from flywheel_clients.registry import ModelRegistry
from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictV1,
    DriftDetectedV1,
    LabelsRequestedV1,
    ModelTrainedV1,
    ModelValidatedV1,
    ThresholdReachedV1,
    ValidationVerdict,
)
from flywheel_contracts.events import DriftAction, ThresholdReason
from flywheel_data_monitor.drift import DriftThresholds
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DriftSettings
from flywheel_runtime.drift_reference import DEFAULT_PREFIX, reference_key
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.triton import TritonServer
from flywheel_testing.wait import wait_for
from flywheel_trainer_dispatch.main import create_app as create_trainer_dispatch
from flywheel_validator.main import create_app as create_validator
from flywheel_vision.contract import signature_or_reference
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.preprocess import INPUT_NAME, OUTPUT_NAME, preprocess

from .conftest import (
    FROZEN_TEST_END,
    PROJECT,
    PROMOTING_POLICY,
    LabelingTool,
    Loop,
    create_project,
    post_mnist,
    verdicts,
)

# In `make test-hardening`, not in CI: it passes on its own (five runs in a row here, 171-200 s)
# but adds four minutes to a CI that is at its 25-minute budget on this machine, and inside
# the whole suite the retrained candidate's 10 % step once got too few answers in time.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.hardening,
    pytest.mark.timeout(900),
]

LABELS = 400
WINDOW = 120
"""Inferences per drift check (the check runs on volume, on exactly the newest window)."""
BURST = WINDOW
INVERTED_LABELS = 600
"""Inverted training digits the labelers add to the requested ones."""
NO_COUNT_TRIGGER = 100_000
"""The project's count trigger once its champion is trained: out of the drift trigger's way."""
TOOL_PERIOD_S = 0.1
"""The labeling tool's four workers at ten pre-labels a second each: flat out (130 a second
here) every service of this one process falls behind on the inference logs, drift features
included, and rollout counts the candidate's answers long after they were given."""
CANARY = PROMOTING_POLICY.model_copy(update={"interval_s": 5.0})
"""Checks five seconds long: at 10 % of the tool's traffic (10 answers a second on a loaded
machine) still enough candidate answers each."""

DRIFT = DriftSettings(
    # The reference is the champion's held-out images (TEST and VALIDATION): a fifth of the
    # labels here, about 80. Against a reference of 40, a domain classifier's AUC on digits
    # like the training ones came out at 0.63-0.73 (p down to 1e-4) in five runs; inverted
    # digits give 0.95 and more. The configured effect threshold says so (the default 0.7
    # expects a reference of 200).
    thresholds=DriftThresholds(min_samples=100, min_reference_samples=30, min_auc=0.85),
    window_samples=WINDOW,
    check_every_samples=WINDOW,
    check_interval_s=4,
    min_fresh_labels=100,
    max_label_requests=40,
    cooldown_s=0,
)


def inverted(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return (255 - pixels).astype(np.uint8)


def digits(
    pixels: npt.NDArray[np.uint8], classes: npt.NDArray[np.int64]
) -> dict[str, tuple[bytes, str]]:
    """PNGs of the digits by content hash (as labeling and the BFF key them), with classes."""
    pngs = [to_png(p) for p in pixels]
    return {
        hashlib.sha256(png).hexdigest(): (png, str(c)) for png, c in zip(pngs, classes, strict=True)
    }


async def predict_all(loop: Loop, bff: httpx.AsyncClient, images: list[bytes]) -> None:
    """Each image through ``/predict``, eight at a time, every one answered."""
    headers = loop.bearer("app", "predict")
    gate = asyncio.Semaphore(8)

    async def one(index: int, image: bytes) -> None:
        async with gate:
            response = await bff.post(
                "/predict",
                files={"image": (f"{index}.png", image, "image/png")},
                data={"model_line": loop.model_line},
                headers=headers,
            )
        assert response.status_code == 200, response.text

    await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))


async def reports(monitor: httpx.AsyncClient) -> list[dict[str, object]]:
    response = await monitor.get(f"/v1/projects/{PROJECT}/drift-reports")
    assert response.status_code == 200, response.text
    found: list[dict[str, object]] = response.json()["reports"]
    return found


async def report_after(monitor: httpx.AsyncClient, since: datetime) -> dict[str, object]:
    """The first report of a check made after ``since``, the start of a burst: its new
    samples make a check due (by volume or on the schedule), so one comes."""

    async def checked() -> dict[str, object] | None:
        later = [
            r
            for r in await reports(monitor)
            if datetime.fromisoformat(str(r["report"]["window_end"])) >= since  # type: ignore[index]
        ]
        return later[-1] if later else None

    report = await wait_for(checked, timeout=60, message=f"a drift check after {since}")
    assert report is not None
    summary = [
        (t["feature"], t["judged"], t["drifted"], t["effect"])
        for t in report["report"]["tests"]  # type: ignore[index]
    ]
    print(
        f"drift report: version {report['report']['model_version']} "  # type: ignore[index]
        f"samples {report['report']['samples']} drifted={report['drifted']} tests={summary}"  # type: ignore[index]
    )
    return report


async def retrain_on_drift_only(
    labeling: httpx.AsyncClient, monitor: httpx.AsyncClient, loop: Loop
) -> None:
    """Raise the project's count trigger above what the test labels, and wait until
    data-monitor applies it."""
    updated = await labeling.put(
        f"/v1/projects/{PROJECT}",
        headers=loop.bearer("ada", "admin"),
        json={"policy": {"count": NO_COUNT_TRIGGER}},
    )
    assert updated.status_code == 200, updated.text

    async def applied() -> bool:
        state = await monitor.get(f"/v1/projects/{PROJECT}/state")
        assert state.status_code == 200, state.text
        return bool(state.json()["policy"]["count"] == NO_COUNT_TRIGGER)

    await wait_for(applied, timeout=30, message="data-monitor applied the new policy")


async def accuracy_on_inverted(loop: Loop, version: str, images: int = 300) -> float:
    """Accuracy of ``version`` on inverted digits of the frozen test slice."""
    files = await ModelRegistry(loop.platform.mlflow_uri).download_model_files(
        loop.model_line, version
    )
    spec = signature_or_reference(files.model_json, len(files.labels)).preprocessing
    pixels, classes = load_mnist("test", limit=FROZEN_TEST_END)
    batch = np.stack(
        [preprocess(to_png(inverted(p)), spec) for p in pixels[FROZEN_TEST_END - images :]]
    )
    session = ort.InferenceSession(files.onnx, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    predicted = [files.labels[i] for i in np.asarray(logits).argmax(axis=1)]
    truth = [str(c) for c in classes[FROZEN_TEST_END - images :]]
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / images


async def test_drift_is_detected_labels_are_requested_and_the_retrain_reads_the_new_data(
    loop: Loop,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    storage: ObjectStorage,
    tmp_path: Path,
) -> None:
    bootstrap, probe = await loop.bootstrap(
        mlflow_tracking_uri,
        triton_server,
        ThresholdReachedV1,
        ModelTrainedV1,
        ModelValidatedV1,
        DriftDetectedV1,
        LabelsRequestedV1,
        CanaryVerdictV1,
    )
    rollout = await loop.start_rollout(triton_server, CANARY)
    bff = await loop.start_bff(triton_server)
    await loop.start(create_validator(loop.validator_settings()))
    # The retrain fine-tunes the champion it replaces (the bootstrap one, an ONNX file without
    # weights to start from, is replaced by a model trained from scratch), as in production.
    await loop.start(
        create_trainer_dispatch(
            loop.trainer_settings(tmp_path / "runs", base_alias="champion", epochs=5)
        )
    )
    monitor = await loop.start(create_data_monitor(loop.data_monitor_settings(drift=DRIFT)))
    labeling = await loop.start_labeling()
    await create_project(labeling, loop, count=LABELS)

    # 1. A champion trained on MNIST, through the loop: its validation writes its reference.
    async with LabelingTool(loop, bff.client, period_s=TOOL_PERIOD_S) as tool:
        await tool.served(bootstrap, n=5)
        await post_mnist(labeling, loop, LABELS)
        [trained] = await probe.wait(ModelTrainedV1, timeout=180)
        [verdict] = await verdicts(probe, rollout.client, loop)
    champion = trained.payload.model_version
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    reference = reference_key(DEFAULT_PREFIX, loop.model_line, champion)
    assert await storage.exists(loop.bucket, reference)
    # From here on drift is what retrains: the count trigger is raised out of its way, as an
    # operator would for a line that retrains on drift.
    await retrain_on_drift_only(labeling, monitor, loop)

    # 2. Digits as the champion was trained on: several windows, no alarm. Checks run on
    # volume and every few seconds, so every burst makes at least one.
    test_pixels, test_classes = load_mnist("test", limit=3000)
    start = 1000  # past the labeling tool's pool, before the frozen slice
    sent: dict[str, tuple[bytes, str]] = {}
    """Every image served from here on, by content hash: what a labeler sees, and its class."""
    for burst in range(4):
        chunk = slice(start + burst * WINDOW, start + (burst + 1) * WINDOW)
        images = digits(test_pixels[chunk], test_classes[chunk])
        sent |= images
        started = datetime.now(UTC)
        await predict_all(loop, bff.client, [png for png, _ in images.values()])
        newest = await report_after(monitor, started)
        judged_features = {t["feature"] for t in newest["report"]["tests"] if t["judged"]}  # type: ignore[index]
        # Right after the promotion the old version's config (no embedding output) may be
        # served for a moment: go on until a window has embeddings.
        if burst >= 2 and "embedding" in judged_features:
            break
    judged = [r for r in await reports(monitor) if r["report"]["model_version"] == champion]  # type: ignore[index]
    assert len(judged) >= 3
    assert not any(r["drifted"] for r in judged), [r["report"]["tests"] for r in judged]  # type: ignore[index]
    assert "embedding" in judged_features, newest["report"]
    await probe.collect()
    assert probe.of(DriftDetectedV1) == []

    # 3. Inverted digits for a burst: drift, and labels asked for the drifted images.
    first = 2000
    shown = digits(
        inverted(test_pixels[first : first + BURST]), test_classes[first : first + BURST]
    )
    sent |= shown
    await predict_all(loop, bff.client, [png for png, _ in shown.values()])

    # The burst's first check straddles the normal digits before it; its second sees only
    # inverted ones, and every test that can see inversion calls it.
    async def fully_drifted() -> DriftDetectedV1 | None:
        await probe.collect()
        for event in probe.of(DriftDetectedV1):
            if {"embedding", "brightness"} <= {t.feature for t in event.payload.tests if t.drifted}:
                return event
        return None

    detected = await wait_for(fully_drifted, timeout=90, message="drift on every test")
    assert detected is not None
    assert detected.payload.action is DriftAction.LABELS_REQUESTED, detected.payload.reasons
    assert detected.payload.model_version == champion
    requests = await probe.wait(LabelsRequestedV1, timeout=30)
    requested = next(r for r in requests if r.causation_id == detected.event_id)
    assert {item.input_sha256 for item in requested.payload.items} <= set(shown)
    labeler = loop.bearer("lin", "labeler")

    async def queued() -> list[dict[str, str]] | None:
        response = await labeling.get(
            f"/v1/projects/{PROJECT}/label-requests", params={"status": "open"}, headers=labeler
        )
        assert response.status_code == 200, response.text
        entries: list[dict[str, str]] = response.json()["items"]
        return entries or None

    entries = await wait_for(queued, timeout=30, message="the needs-label queue filled")
    assert entries is not None
    # An earlier check that straddled the burst's start may have asked for a digit of the
    # window before it too: with few drifted images to learn from, its classifier scores some
    # digits as trained above the cut.
    assert {entry["input_sha256"] for entry in entries} <= set(sent)
    assert {item.input_sha256 for item in requested.payload.items} <= {
        entry["input_sha256"] for entry in entries
    }

    # 4. The labelers work through the queue (fetching each image from it; a later check may
    # add to it meanwhile) and label more inverted digits.
    labeled = 0
    while entries:
        for entry in entries:
            sha = entry["input_sha256"]
            image = await labeling.get(
                f"/v1/projects/{PROJECT}/label-requests/{sha}/image", headers=labeler
            )
            assert image.status_code == 200, image.text
            assert image.content == sent[sha][0]
            saved = await labeling.post(
                f"/v1/projects/{PROJECT}/labels",
                headers=labeler,
                files={"image": ("queued.png", image.content, "image/png")},
                data={"class_name": sent[sha][1]},
            )
            assert saved.status_code in (200, 201), saved.text
            labeled += 1
        entries = await queued()
    closed = await labeling.get(
        f"/v1/projects/{PROJECT}/label-requests",
        params={"status": "labeled", "limit": 500},
        headers=labeler,
    )
    assert len(closed.json()["items"]) == labeled
    assert all(item["labeled_label_id"] for item in closed.json()["items"])
    train_pixels, train_classes = load_mnist("train", limit=LABELS + INVERTED_LABELS)
    more = digits(inverted(train_pixels[LABELS:]), train_classes[LABELS:])
    gate = asyncio.Semaphore(8)

    async def label(png: bytes, class_name: str) -> None:
        async with gate:
            saved = await labeling.post(
                f"/v1/projects/{PROJECT}/labels",
                headers=labeler,
                files={"image": ("inverted.png", png, "image/png")},
                data={"class_name": class_name},
            )
        assert saved.status_code == 201, saved.text

    await asyncio.gather(*(label(png, class_name) for png, class_name in more.values()))

    # 5. The next drifted window has labels to learn from: a drift retrain, and a new champion.
    second = first + BURST
    await predict_all(
        loop, bff.client, [to_png(inverted(p)) for p in test_pixels[second : second + BURST]]
    )

    async def retrain_announced() -> DriftDetectedV1 | None:
        await probe.collect()
        found = [e for e in probe.of(DriftDetectedV1) if e.payload.action is DriftAction.RETRAIN]
        return found[0] if found else None

    retrain = await wait_for(retrain_announced, timeout=90, message="a drift retrain")
    assert retrain is not None
    fired = next(
        e
        for e in await probe.wait(ThresholdReachedV1, n=2, timeout=30)
        if e.payload.reason is ThresholdReason.DRIFT
    )
    assert fired.causation_id == retrain.event_id
    async with LabelingTool(loop, bff.client, period_s=TOOL_PERIOD_S):
        [_, trained_again] = await probe.wait(ModelTrainedV1, n=2, timeout=180)
        [_, validated] = await probe.wait(ModelValidatedV1, n=2, timeout=120)
        assert validated.payload.verdict is ValidationVerdict.PASSED, validated.payload.reasons
        [_, promoted] = await verdicts(probe, rollout.client, loop, n=2, timeout=300)
    retrained = trained_again.payload.model_version
    assert promoted.payload.verdict is CanaryOutcome.PROMOTED, promoted.payload.reasons
    assert loop.alias("champion") == retrained

    old = await accuracy_on_inverted(loop, champion)
    new = await accuracy_on_inverted(loop, retrained)
    print(f"accuracy on inverted digits: champion {champion} {old:.3f}, retrained {new:.3f}")
    assert new > old
