"""Rollout killed mid-canary (SIGKILL, no shutdown at all) and started again: it resumes the
canary where its database says it was and reaches the verdict it would have reached."""

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from flywheel_contracts import CanaryOutcome, CanaryVerdictV1, RolloutStepV1
from flywheel_rollout.settings import RolloutSettings
from flywheel_serving.triton import TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.net import free_port
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


def environment(settings: RolloutSettings) -> dict[str, str]:
    """``settings`` as the environment ``python -m flywheel_rollout`` reads."""
    platform = settings.platform
    env = {
        "FLYWHEEL_RABBIT_URL": platform.rabbit_url.get_secret_value(),
        "FLYWHEEL_DATABASE_URL": platform.database_url.get_secret_value(),
        "FLYWHEEL_S3_ENDPOINT": platform.s3_endpoint,
        "FLYWHEEL_S3_ACCESS_KEY": platform.s3_access_key.get_secret_value(),
        "FLYWHEEL_S3_SECRET_KEY": platform.s3_secret_key.get_secret_value(),
        "FLYWHEEL_MLFLOW_URI": platform.mlflow_uri,
        "FLYWHEEL_TRITON_URL": platform.triton_url,
        "FLYWHEEL_DELIVERY_LIMIT": str(platform.delivery_limit),
        "FLYWHEEL_LOG_JSON": "false",
    }
    assert settings.auth is not None
    assert settings.auth.dev_signing_key is not None
    env["FLYWHEEL_ROLLOUT_AUTH"] = json.dumps(
        {"dev_signing_key": settings.auth.dev_signing_key.get_secret_value()}
    )
    fields = settings.model_dump(mode="json", exclude={"platform", "auth"})
    for name, value in fields.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"FLYWHEEL_ROLLOUT_{name.upper()}"] = text
    return env


class Process:
    """``python -m flywheel_rollout`` as deployed, on a port of its own."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    async def ready(self) -> bool:
        if self.process.returncode is not None:
            tail = await asyncio.to_thread(self.log.read_text, errors="replace")
            raise AssertionError(f"rollout exited with {self.process.returncode}:\n{tail[-3000:]}")
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

    async def kill(self) -> None:
        """SIGKILL: no shutdown hook, no outbox flush, no broker goodbye."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
async def rollout_process(
    loop: Loop, mlflow_tracking_uri: str, triton_server: TritonServer, tmp_path: Path
) -> AsyncIterator[Process]:
    # The process reads its settings once, as it starts: MLflow must be in them already.
    loop.with_mlflow(mlflow_tracking_uri)
    port = free_port()
    settings = loop.rollout_settings(triton_server, RESTART_POLICY, http_port=port)
    log = tmp_path / "rollout.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flywheel_rollout",
            env=os.environ | environment(settings),
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    running = Process(process, f"http://127.0.0.1:{port}", log)
    try:
        yield running
    finally:
        await running.kill()


async def test_rollout_killed_mid_canary_resumes_it_to_the_same_verdict(
    loop: Loop,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    rollout_process: Process,
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
