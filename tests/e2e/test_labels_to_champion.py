"""The whole loop on the real servers: labels → threshold → training → validation → canary
10 → 50 → 100 % → promoted, with a labeling tool sending traffic through the BFF throughout."""

from pathlib import Path

import pytest

from flywheel_contracts import (
    CanaryOutcome,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
    ValidationVerdict,
)
from flywheel_serving.triton import TritonServer

from .conftest import (
    LOOP_EVENTS,
    PROMOTING_POLICY,
    LabelingTool,
    Loop,
    create_project,
    post_mnist,
    steps_of,
    verdicts,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

LABELS = 400
"""Enough for a test split of ~40 images and a model that beats an untrained one."""


async def test_labels_become_a_champion_through_a_canary_at_10_50_and_100_percent(
    loop: Loop, mlflow_tracking_uri: str, triton_server: TritonServer, tmp_path: Path
) -> None:
    champion, probe = await loop.bootstrap(mlflow_tracking_uri, triton_server, *LOOP_EVENTS)
    rollout = await loop.start_rollout(triton_server, PROMOTING_POLICY)
    bff = await loop.start_bff(triton_server)
    await loop.start_training(tmp_path / "runs")
    labeling = await loop.start_labeling()
    await create_project(labeling, loop, count=LABELS)
    tool = await loop.stack.enter_async_context(LabelingTool(loop, bff.client, labeling))
    await tool.served(champion, n=5)

    await post_mnist(labeling, loop, LABELS)

    [fired] = await probe.wait(ThresholdReachedV1, timeout=60)
    [trained] = await probe.wait(ModelTrainedV1, timeout=180)
    [validated] = await probe.wait(ModelValidatedV1, timeout=120)
    assert validated.payload.verdict is ValidationVerdict.PASSED, validated.payload.reasons
    assert validated.payload.champion_version == champion
    candidate = trained.payload.model_version
    [verdict] = await verdicts(probe, rollout.client, loop)
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    assert verdict.payload.candidate_version == candidate
    assert steps_of(probe.of(RolloutStepV1)) == [(10, 1), (50, 2), (100, 3)]
    assert loop.alias("champion") == candidate
    assert loop.alias("challenger") is None
    await tool.served(candidate, n=10)
    after = tool.answers[-5:]
    assert {a.model_version for a in after} == {candidate}

    assert await loop.accuracy(candidate) >= await loop.accuracy(champion)

    correlation = fired.correlation_id
    assert trained.correlation_id == validated.correlation_id == verdict.correlation_id
    assert verdict.correlation_id == correlation
    timeline = await rollout.client.get(
        f"/api/v1/lines/{loop.model_line}/timeline",
        params={"correlation_id": str(correlation)},
        headers=loop.bearer("ops", "operator"),
    )
    assert timeline.status_code == 200, timeline.text
    kinds = [e["kind"] for e in timeline.json()["entries"]]
    for kind in (
        "labels.saved",
        "threshold.reached",
        "model.trained",
        "model.validated",
        "rollout.step",
        "canary.verdict",
    ):
        assert kind in kinds, kinds
    assert kinds.index("threshold.reached") < kinds.index("model.trained")
    assert kinds.index("model.validated") < kinds.index("rollout.step")
    assert kinds[-1] in ("canary.verdict", "canary.cleaned_up"), kinds
