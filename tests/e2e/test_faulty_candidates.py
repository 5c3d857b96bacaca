"""Validated versions that turn out slow or wrong at serving time are rolled back at their first
failing interval and never get more than the first step's share of the traffic.

The faults are injected in the Triton Python backend (``FLYWHEEL_SERVING_FAULTS``), so the
versions are what the validator passed and only serving goes wrong; this test starts a Triton
of its own for that, leaving the session's one untouched.
"""

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flywheel_contracts import CanaryOutcome, CanaryVerdictV1, RolloutStepV1
from flywheel_serving.triton import TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.wait import wait_for

from .conftest import POLICY, LabelingTool, Loop, Running, steps_of, verdicts

# Flaky here (about one run in three): the first 10 % check sometimes falls in the stall of the
# candidate being loaded, the champion's p95 rises past the slow version's limit and the
# rollback comes one check later. make test-hardening runs it; make test (CI) leaves it out
# until the check is made robust to that stall.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.hardening,
    pytest.mark.timeout(240),
]

SLOW_MS = 600
"""Far beyond the champion's latency and the policy's slack on a busy machine, and well within
the BFF's inference timeout (a slow answer, not an error)."""

FAULTY_POLICY = POLICY.model_copy(
    update={
        "interval_s": 2.0,
        "bake_s": 2.0,
        "margins": POLICY.margins.model_copy(update={"latency_slack_ms": 200.0}),
    }
)
"""The e2e policy with checks of two seconds and room for a busy machine's latency noise: a
freshly loaded version's first answers must not fail the check that is meant to catch the
wrong one's answers, and the slow one's 10 % must fill an interval."""

POOL = 8
"""Distinct digits the labeling tool cycles through: few enough that the champion has answered
every input within the first interval, so the first counted check judges agreement."""

CONCURRENCY = 8
"""Requests the labeling tool keeps in flight: slow answers hold some of them, and the rest
keep both versions' traffic flowing."""


@pytest.fixture
def fault_file(tmp_path: Path) -> Path:
    return tmp_path / "faults.json"


@pytest.fixture
def faulty_triton(tmp_path: Path, fault_file: Path) -> Iterator[TritonServer]:
    """A Triton of this test's own that reads the faults in ``fault_file`` as it loads."""
    fault_file.write_text("{}")
    repository = tmp_path / "repository"
    repository.mkdir()
    with TritonServer.start(
        repository,
        log_path=tmp_path / "tritonserver.log",
        env={"FLYWHEEL_SERVING_FAULTS": str(fault_file)},
    ) as server:
        yield server


async def rolled_back_at_first_failing_interval(
    loop: Loop,
    probe: EventProbe,
    rollout: Running,
    bff: Running,
    tool: LabelingTool,
    champion: str,
    candidate: str,
    seen: int,
) -> list[str]:
    """Run the canary of ``candidate``; check its rollback and return the verdict's reasons."""
    started = datetime.now(UTC)
    await loop.publish(loop.validated(candidate, champion))
    verdict = (await verdicts(probe, rollout.client, loop, n=seen))[-1]
    assert verdict.payload.candidate_version == candidate
    assert verdict.payload.verdict is CanaryOutcome.ROLLED_BACK, verdict.payload.reasons
    rollout_id = verdict.payload.rollout_id
    steps = [e for e in probe.of(RolloutStepV1) if e.payload.rollout_id == rollout_id]
    operator = loop.bearer("ops", "operator")
    checks = (
        await rollout.client.get(f"/api/v1/canaries/{rollout_id}/checks", headers=operator)
    ).json()["checks"]
    assert steps_of(steps) == [(POLICY.steps[0], 1), (0, 2)], [
        (c["interval_index"], c["status"], c["counted"], c["reasons"], c.get("metrics"))
        for c in checks
    ]
    counted = [c for c in checks if c["counted"]]
    assert [c["status"] for c in counted] == ["failed"], checks
    assert counted[0]["traffic_percent"] == POLICY.steps[0]
    print(f"{candidate}: rolled back at 10 % on {counted[0].get('metrics')}")

    routing = bff.app.state.predictor.routing

    async def candidate_unrouted() -> bool:
        route = routing.route(loop.model_line)
        return route is not None and route.rollout_id == rollout_id and not route.candidate_percent

    await wait_for(candidate_unrouted, timeout=30, message="the BFF routing the champion only")
    unrouted = datetime.now(UTC)
    await tool.served(champion, n=20)
    during = tool.versions(started)
    assert tool.versions(unrouted)[candidate] == 0
    # Its 10 % of the requests, and some leeway for the few requests an interval holds.
    assert during[candidate] <= 0.3 * sum(during.values()), during
    return verdict.payload.reasons


async def test_slow_and_wrong_candidates_roll_back_at_their_first_failing_interval(
    loop: Loop, mlflow_tracking_uri: str, faulty_triton: TritonServer, fault_file: Path
) -> None:
    loop.with_mlflow(mlflow_tracking_uri)
    # The same weights for all three: only the injected faults tell the versions apart.
    champion, slow, wrong = (loop.register(seed=1) for _ in range(3))
    faults = {
        f"{loop.model_line}:{slow}": {"delay_ms": SLOW_MS},
        f"{loop.model_line}:{wrong}": {"shuffle": True},
    }
    # Triton reads the file as it loads a version, which rollout does when the canary starts.
    await asyncio.to_thread(fault_file.write_text, json.dumps(faults))
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(faulty_triton, champion)
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, RolloutStepV1, CanaryVerdictV1)
    )
    rollout = await loop.start_rollout(faulty_triton, FAULTY_POLICY)
    bff = await loop.start_bff(faulty_triton)
    tool = await loop.stack.enter_async_context(
        LabelingTool(loop, bff.client, pool=POOL, concurrency=CONCURRENCY)
    )
    await tool.served(champion, n=5)

    reasons = await rolled_back_at_first_failing_interval(
        loop, probe, rollout, bff, tool, champion, slow, seen=1
    )
    assert any(r.startswith("candidate latency p95") and r.endswith("fail") for r in reasons), (
        reasons
    )

    reasons = await rolled_back_at_first_failing_interval(
        loop, probe, rollout, bff, tool, champion, wrong, seen=2
    )
    assert any(r.startswith("versions agree on") and r.endswith("fail") for r in reasons), reasons
    assert loop.alias("champion") == champion
