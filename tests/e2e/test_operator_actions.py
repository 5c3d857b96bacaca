"""Operators roll a canary back and freeze its line over rollout's API, with a labeling tool's
traffic flowing: the BFF stops routing to the candidate, a version validated while the line is
frozen is refused, and every action lands on the line's timeline under the loop's correlation
id (labels → trigger → run → validation → steps → verdict)."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictV1,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
    ValidationVerdict,
)
from flywheel_rollout.policy import Margins
from flywheel_serving.triton import TritonServer
from flywheel_testing.wait import wait_for

from .conftest import LOOP_EVENTS, POLICY, LabelingTool, Loop, create_project, post_mnist, steps_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

LABELS = 400

# The canary holds at its first step (a long bake) until the operator acts.
HOLDING_POLICY = POLICY.model_copy(
    update={
        "bake_s": 3600.0,
        "threshold": 1000,
        "margins": Margins(min_agreement=0.0, latency_slack_ms=1000.0),
    }
)


async def test_an_operator_rolls_back_a_canary_and_freezes_its_line(
    loop: Loop, mlflow_tracking_uri: str, triton_server: TritonServer, tmp_path: Path
) -> None:
    champion, probe = await loop.bootstrap(mlflow_tracking_uri, triton_server, *LOOP_EVENTS)
    rollout = await loop.start_rollout(triton_server, HOLDING_POLICY)
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
    candidate = trained.payload.model_version
    await probe.wait(RolloutStepV1, timeout=120)
    await tool.served(candidate, n=3)
    line = f"/api/v1/lines/{loop.model_line}"
    operator = loop.bearer("grace", "operator")

    refused = await rollout.client.post(
        f"{line}/rollback", headers=loop.bearer("mallory", "labeler"), json={"reason": "no"}
    )
    rolled_back = await rollout.client.post(
        f"{line}/rollback", headers=operator, json={"reason": "pager fired"}
    )

    assert refused.status_code == 403, refused.text
    assert rolled_back.status_code == 200, rolled_back.text
    assert rolled_back.json()["state"] == "rolled_back"
    [verdict] = await probe.wait(CanaryVerdictV1, timeout=30)
    assert verdict.payload.verdict is CanaryOutcome.ROLLED_BACK
    assert verdict.payload.reasons == ["rolled back by grace: pager fired"]
    assert steps_of(probe.of(RolloutStepV1)) == [(10, 1), (0, 2)]
    routing = bff.app.state.predictor.routing

    async def champion_only() -> bool:
        route = routing.route(loop.model_line)
        return route is not None and not route.candidate_percent

    await wait_for(champion_only, timeout=30, message="the BFF routing the champion only")
    since = datetime.now(UTC)
    await tool.served(champion, n=20)
    assert set(tool.versions(since)) == {champion}
    assert loop.alias("champion") == champion

    frozen = await rollout.client.post(
        f"{line}/freeze", headers=operator, json={"reason": "incident review"}
    )
    assert frozen.status_code == 200, frozen.text
    assert frozen.json()["frozen"] is True
    late = loop.validated(loop.register(seed=2), champion)
    await loop.publish(late)

    async def refused_entry() -> list[dict[str, object]]:
        answer = await rollout.client.get(
            f"{line}/timeline",
            params={"correlation_id": str(late.correlation_id)},
            headers=operator,
        )
        return [e for e in answer.json()["entries"] if e["kind"] == "canary.refused"]

    [entry] = await wait_for(refused_entry, timeout=30, message="the late version refused")
    assert "frozen by grace: incident review" in str(entry["summary"])
    status = (await rollout.client.get(line, headers=operator)).json()
    assert status["control"]["frozen"] is True
    assert status["current"] is None

    correlation = fired.correlation_id
    assert trained.correlation_id == validated.correlation_id == correlation
    assert verdict.correlation_id == correlation
    chain = (
        await rollout.client.get(
            f"{line}/timeline", params={"correlation_id": str(correlation)}, headers=operator
        )
    ).json()["entries"]
    kinds = [e["kind"] for e in chain]
    ordered = [
        "threshold.reached",
        "model.trained",
        "model.validated",
        "canary.queued",
        "rollout.step",
        "operator.rollback",
        "canary.verdict",
    ]
    assert "labels.saved" in kinds, kinds
    assert [k for k in kinds if k in ordered] == ordered, kinds
    actions = (await rollout.client.get(f"{line}/timeline", headers=operator)).json()["entries"]
    [freeze] = [e for e in actions if e["kind"] == "operator.freeze"]
    assert freeze["actor"] == "grace"
