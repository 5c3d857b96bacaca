"""Rollout killed mid-canary (SIGKILL, no shutdown at all) and started again: it resumes the
canary where its database says it was and reaches the verdict it would have reached."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flywheel_contracts import CanaryOutcome, CanaryVerdictV1, RolloutStepV1
from flywheel_serving.triton import TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.net import free_port
from flywheel_testing.processes import ServiceProcess
from flywheel_testing.wait import wait_for

from .conftest import POLICY, LabelingTool, Loop, steps_of, verdicts

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

# Long enough at 10 % that the kill lands before the next step. This test is about resuming,
# not judging: a candidate just loaded next to a restarting process can be slow for a while,
# so latency gets a wide margin and one noisy check does not decide.
RESTART_POLICY = POLICY.model_copy(
    update={
        "bake_s": 3.0,
        "threshold": 3,
        "margins": POLICY.margins.model_copy(update={"latency_slack_ms": 1000.0}),
    }
)


@pytest.fixture
async def rollout_process(
    loop: Loop, mlflow_tracking_uri: str, triton_server: TritonServer, tmp_path: Path
) -> AsyncIterator[ServiceProcess]:
    # The process reads its settings once, as it starts: MLflow must be in them already.
    loop.with_mlflow(mlflow_tracking_uri)
    settings = loop.rollout_settings(triton_server, RESTART_POLICY, http_port=free_port())
    running = ServiceProcess("flywheel_rollout", settings, tmp_path / "rollout.log")
    await running.start()
    try:
        yield running
    finally:
        await running.kill()


async def test_rollout_killed_mid_canary_resumes_it_to_the_same_verdict(
    loop: Loop,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    rollout_process: ServiceProcess,
) -> None:
    loop.stack.push_async_callback(loop.unserve, triton_server)
    champion, candidate = loop.register(seed=1), loop.register(seed=1)
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(triton_server, champion)
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, RolloutStepV1, CanaryVerdictV1)
    )
    bff = await loop.start_bff(triton_server)
    tool = await loop.stack.enter_async_context(LabelingTool(loop, bff.client))
    await wait_for(rollout_process.ready, timeout=120, interval=0.2, message="rollout ready")
    await tool.served(champion, n=5)
    event = loop.validated(candidate, champion)

    await loop.publish(event)
    [first] = await probe.wait(RolloutStepV1, timeout=120)
    await tool.served(candidate, n=2)
    await rollout_process.kill()
    await probe.collect()
    assert not probe.of(CanaryVerdictV1), "the canary ended before the kill"
    killed_at = steps_of(probe.of(RolloutStepV1))[-1]
    assert killed_at[0] < 100
    rollout = await loop.start_rollout(triton_server, RESTART_POLICY)

    [verdict] = await verdicts(probe, rollout.client, loop)
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    assert verdict.payload.rollout_id == first.payload.rollout_id
    assert verdict.correlation_id == event.correlation_id
    assert steps_of(probe.of(RolloutStepV1)) == [(10, 1), (50, 2), (100, 3)]
    assert loop.alias("champion") == candidate
    await tool.served(candidate, n=10)
    canaries = (
        await rollout.client.get(
            "/api/v1/canaries",
            params={"model_line": loop.model_line},
            headers=loop.bearer("ops", "operator"),
        )
    ).json()["canaries"]
    assert [(c["rollout_id"], c["state"]) for c in canaries] == [
        (str(verdict.payload.rollout_id), "promoted")
    ]
