"""Triton stopped and started again: a ``TcpProxy`` in front of the session's Triton is the only
way the BFF and rollout reach it (their ``triton_url``); stopping the proxy closes the port and
drops every open connection, as a stopped server does to its clients, and starting it listens
on the same port again. Triton keeps its models meanwhile, so only the outage is played.

While Triton is away ``/predict`` and ``/predict/batch`` answer 503 with ``Retry-After`` and a
JSON error at once (never after a TCP or HTTP timeout), and every refused image's
``inference.logged`` says ``serving_unavailable``; once it is back the same BFF answers 200.
During a canary at 10 % the outage is no fault of the candidate's: its checks say how many
requests never reached a model, none of them counts as failed, and the canary goes on to its
verdict (promotion: the candidate is the champion's twin) once Triton is back.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from flywheel_contracts import CanaryOutcome, CanaryVerdictV1, InferenceLoggedV1, RolloutStepV1
from flywheel_serving.triton import TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.modules import load_file
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.wait import ConditionTimeoutError, wait_for
from flywheel_vision.data import load_mnist, to_png

e2e = load_file(Path(__file__).parents[1] / "e2e" / "conftest.py", "flywheel_e2e_support")
loop = e2e.loop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

REFUSAL_BOUND_S = 2.0
"""Longest a prediction may take to be refused while Triton is away. Measured with 8 in flight
on a busy 2-core machine: p50 0.08 s, max 0.2 s. A BFF waiting out a TCP or HTTP timeout (the
e2e BFF's inference timeout is 30 s) would be far beyond it."""

REFUSED = 40
"""``/predict`` requests sent while Triton is away, ``CONCURRENCY`` at a time."""

BATCH = 4
"""Images of the ``/predict/batch`` call sent while Triton is away."""

CONCURRENCY = 8

OUTAGE_POLICY = e2e.POLICY.model_copy(
    update={
        "interval_s": 2.0,
        "bake_s": 10.0,
        "margins": e2e.POLICY.margins.model_copy(update={"latency_slack_ms": 2000.0}),
    }
)
"""The e2e policy (the first failed check rolls back) with two-second checks and a step held
long enough that Triton goes away while the candidate has 10 %: it is cut as soon as the BFF
routes the candidate, well within the step's bake time. Error rates and agreement are
judged as ever; latency gets a wide margin: what this test judges is errors, and a freshly
loaded twin's first answers on a busy 2-core machine can take half a second."""


@dataclass(frozen=True)
class Endpoint:
    """Triton as the services see it: through the proxy (what ``Loop.start_bff`` and
    ``Loop.start_rollout`` read of a ``TritonServer``)."""

    http_url: str
    repository: Path


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    code: str | None
    retry_after: str | None
    content_type: str


async def _proxied(loop: Any, triton: TritonServer) -> tuple[TcpProxy, Endpoint]:
    """A running proxy to ``triton``, stopped only after every service of the test."""
    host, port = triton.http_url.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    # Pushed before any service starts, so it is closed after all of them.
    loop.stack.push_async_callback(proxy.stop)
    return proxy, Endpoint(f"127.0.0.1:{proxy.port}", triton.repository)


def _digits(n: int) -> list[bytes]:
    pixels, _ = load_mnist("test", limit=n)
    return [to_png(p) for p in pixels]


async def _timed(call: Awaitable[httpx.Response]) -> Answer:
    started = time.perf_counter()
    response = await call
    seconds = time.perf_counter() - started
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    return Answer(
        status=response.status_code,
        seconds=seconds,
        code=None if not isinstance(error, dict) else error.get("code"),
        retry_after=response.headers.get("Retry-After"),
        content_type=response.headers.get("content-type", ""),
    )


def _figures(answers: list[Answer]) -> str:
    seconds = [a.seconds for a in answers]
    return f"p50={statistics.median(seconds):.3f}s max={max(seconds):.3f}s n={len(seconds)}"


def _refused_at_once(answers: list[Answer]) -> None:
    assert [a.status for a in answers] == [503] * len(answers), answers
    assert {a.code for a in answers} == {"inference_unavailable"}, answers
    assert all(a.content_type.startswith("application/json") for a in answers), answers
    assert all(a.retry_after is not None and int(a.retry_after) > 0 for a in answers), answers
    assert max(a.seconds for a in answers) < REFUSAL_BOUND_S, _figures(answers)


async def test_predict_answers_503_at_once_while_triton_is_away_and_200_once_it_is_back(
    loop: Any, mlflow_tracking_uri: str, triton_server: TritonServer
) -> None:
    loop.with_mlflow(mlflow_tracking_uri)
    champion = loop.register(seed=1)
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(triton_server, champion)
    proxy, endpoint = await _proxied(loop, triton_server)
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, InferenceLoggedV1)
    )
    bff = await loop.start_bff(endpoint)
    client: httpx.AsyncClient = bff.client
    headers = loop.bearer("labeling-tool", "predict")
    pngs = _digits(REFUSED)
    batch = {
        "model_line": loop.model_line,
        "images": [{"image_b64": base64.b64encode(p).decode()} for p in pngs[:BATCH]],
    }

    def predict(index: int) -> Awaitable[httpx.Response]:
        return client.post(
            "/predict",
            files={"image": (f"{index}.png", pngs[index], "image/png")},
            data={"model_line": loop.model_line},
            headers=headers,
        )

    before = await _timed(predict(0))
    assert before.status == 200, before

    await proxy.stop()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def refused(index: int) -> Answer:
        async with gate:
            return await _timed(predict(index))

    singles = list(await asyncio.gather(*(refused(i) for i in range(REFUSED))))
    batched = await _timed(client.post("/predict/batch", json=batch, headers=headers))
    ready = await client.get("/readyz")
    print(
        f"/predict while Triton is away: {_figures(singles)} {Counter(a.status for a in singles)}"
    )
    print(f"/predict/batch of {BATCH} while Triton is away: {_figures([batched])}")
    _refused_at_once(singles)
    _refused_at_once([batched])
    assert ready.status_code == 503, ready.text

    def logs() -> list[InferenceLoggedV1]:
        return [e for e in probe.of(InferenceLoggedV1) if e.payload.model_line == loop.model_line]

    async def refusals_logged() -> list[InferenceLoggedV1]:
        await probe.collect()
        marked = [e for e in logs() if e.payload.serving_unavailable]
        return marked if len(marked) >= REFUSED + BATCH else []

    marked = await wait_for(refusals_logged, timeout=30, message="every refusal logged")

    await proxy.start()
    back_at = time.perf_counter()

    async def answered() -> bool:
        return (await predict(1)).status_code == 200

    await wait_for(answered, timeout=30, message="/predict answering again")
    first_200_s = time.perf_counter() - back_at
    after = [await _timed(predict(i)) for i in range(2, 6)]
    batch_after = await _timed(client.post("/predict/batch", json=batch, headers=headers))
    ready_after = await client.get("/readyz")
    print(f"after Triton is back: first 200 in {first_200_s:.3f}s, then {_figures(after)}")
    assert [a.status for a in after] == [200] * len(after), after
    assert batch_after.status == 200, batch_after
    assert ready_after.status_code == 200, ready_after.text

    await probe.collect()
    flagged = [e for e in logs() if e.payload.serving_unavailable]
    print(
        f"inference.logged marked serving_unavailable: {len(flagged)} of {len(logs())} "
        f"({Counter((e.payload.status, e.payload.error_code) for e in logs())})"
    )
    assert len(flagged) == len(marked) == REFUSED + BATCH
    assert {(e.payload.status, e.payload.error_code) for e in flagged} == {
        ("error", "inference_unavailable")
    }
    assert all(e.payload.status == "ok" for e in logs() if not e.payload.serving_unavailable)


async def test_a_canary_rides_out_triton_going_away_and_says_so_in_its_checks(
    loop: Any, mlflow_tracking_uri: str, triton_server: TritonServer
) -> None:
    loop.with_mlflow(mlflow_tracking_uri)
    # The same weights: only the outage could set the candidate apart.
    champion, candidate = loop.register(seed=1), loop.register(seed=1)
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(triton_server, champion)
    proxy, endpoint = await _proxied(loop, triton_server)
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, RolloutStepV1, CanaryVerdictV1)
    )
    rollout = await loop.start_rollout(endpoint, OUTAGE_POLICY)
    bff = await loop.start_bff(endpoint)
    tool = await loop.stack.enter_async_context(
        e2e.LabelingTool(loop, bff.client, pool=8, concurrency=CONCURRENCY)
    )
    await tool.served(champion, n=5)

    await loop.publish(loop.validated(candidate, champion))
    [first] = await probe.wait(RolloutStepV1, n=1, timeout=120)
    assert first.payload.traffic_percent == OUTAGE_POLICY.steps[0]
    rollout_id = first.payload.rollout_id
    routing = bff.app.state.predictor.routing

    async def candidate_at_first_step() -> bool:
        route = routing.route(loop.model_line)
        return (
            route is not None
            and route.rollout_id == rollout_id
            and route.candidate_percent == OUTAGE_POLICY.steps[0]
        )

    await wait_for(candidate_at_first_step, timeout=30, message="the BFF routing 10 % to it")
    operator = loop.bearer("ops", "operator")

    async def checks() -> list[dict[str, Any]]:
        answer = await rollout.client.get(f"/api/v1/canaries/{rollout_id}/checks", headers=operator)
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()["checks"]
        return found

    before = Counter(tool.failures)
    cut_at = time.perf_counter()
    await proxy.stop()
    cut = len(await checks())

    async def a_whole_interval_away() -> bool:
        # A check that began after the cut and ended before Triton is back.
        return any(c["status"] == "outage" for c in (await checks())[cut + 1 :])

    try:
        await wait_for(a_whole_interval_away, timeout=60, message="a check during the outage")
    except ConditionTimeoutError as error:
        summary = [(c["status"], c["reasons"]) for c in await checks()]
        raise AssertionError(f"{error}; checks: {summary}") from error
    away = tool.failures - before
    await proxy.start()
    down_s = time.perf_counter() - cut_at

    [verdict] = await e2e.verdicts(probe, rollout.client, loop, n=1, timeout=120)
    recorded = await checks()
    for check in recorded:
        c, ch = check["candidate"], check["champion"]
        noted = [r for r in check["reasons"] if r.startswith("serving unavailable")]
        print(
            f"check {check['interval_index']} at {check['traffic_percent']}%: {check['status']}"
            f"{'' if check['counted'] else ' (not counted)'}; candidate {c['requests']} requests "
            f"{c['errors']} errors {c['unavailable_errors']} never reached Triton, error rate "
            f"{check['metrics'].get('candidate_error_rate')}; champion {ch['requests']} requests "
            f"{ch['errors']} errors {ch['unavailable_errors']} never reached Triton, error rate "
            f"{check['metrics'].get('champion_error_rate')}; {noted}"
        )
    print(f"Triton away {down_s:.1f}s; /predict refusals the labeling tool got: {dict(away)}")
    print(f"verdict: {verdict.payload.verdict.value}; {verdict.payload.reasons}")

    assert verdict.payload.rollout_id == rollout_id
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    assert loop.alias("champion") == candidate
    assert [c for c in recorded if c["status"] == "failed"] == []
    hit = [c for c in recorded if c["champion"]["unavailable_errors"]]
    assert hit, recorded
    # Triton went away at 10 %. (Rollout counts a log in the interval open when it reads it, so
    # the backlog of refusals may reach into later checks.)
    assert hit[0]["traffic_percent"] == OUTAGE_POLICY.steps[0], hit[0]
    for check in hit:
        c, ch = check["candidate"], check["champion"]
        assert (
            f"serving unavailable: {c['unavailable_errors']} candidate and "
            f"{ch['unavailable_errors']} champion requests never reached a model"
        ) in " ".join(check["reasons"]), check["reasons"]
        assert check["metrics"]["candidate_unavailable_errors"] == c["unavailable_errors"]
        assert check["metrics"]["champion_unavailable_errors"] == ch["unavailable_errors"]
    # Both versions met the outage, and no more refusals were recorded than the tool was given.
    unreachable = [
        sum(c[version]["unavailable_errors"] for c in recorded)
        for version in ("candidate", "champion")
    ]
    assert min(unreachable) > 0, unreachable
    assert sum(unreachable) <= tool.failures["inference_unavailable"], (unreachable, away)
    assert set(away) == {"inference_unavailable"}, away
