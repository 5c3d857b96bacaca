import asyncio
import base64
import json
import math
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel_contracts import InferenceLoggedV1, RolloutStepV1
from flywheel_contracts.datasets import Split
from flywheel_inference_bff.adapters.repository import SqlJobStore
from flywheel_inference_bff.ports import BatchJob, JobState
from flywheel_testing.events import EventProbe
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.wait import wait_for

from .conftest import PREDICT, PROJECT, Bff, BffFactory, Served

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def step(served: Served, percent: int, sequence: int) -> RolloutStepV1:
    return RolloutStepV1.model_validate(
        {
            "payload": {
                "rollout_id": uuid.UUID(int=42),
                "project_id": PROJECT,
                "model_line": served.name,
                "registered_model": served.name,
                "candidate_version": "2",
                "champion_version": "1",
                "step": sequence,
                "traffic_percent": percent,
                "previous_percent": 0,
                "sequence": sequence,
            }
        }
    )


async def many(bff: Bff, images: list[bytes], concurrency: int = 32) -> list[httpx.Response]:
    gate = asyncio.Semaphore(concurrency)

    async def one(image: bytes) -> httpx.Response:
        async with gate:
            return await bff.predict(image)

    return await asyncio.gather(*(one(image) for image in images))


async def weights_applied(bff: Bff, line: str, percent: int) -> None:
    async def applied() -> bool:
        route = bff.app.state.predictor.routing.route(line)
        return route is not None and route.candidate_percent == percent

    await wait_for(applied, timeout=15, message=f"candidate at {percent} %")


# --- serving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_real_triton_through_the_bff_answers_as_onnxruntime_does(
    bff: BffFactory, served: Served, protocol: str
) -> None:
    app = await bff.start(triton_protocol=protocol, triton_grpc_url=bff.triton.grpc_url)
    images = list(served.snapshot.pngs.values())[:5]

    answers = [await app.predict(image, top_k=10) for image in images]

    for image, answer in zip(images, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["registered_model"], body["model_version"]) == (served.name, "1")
        expected = served.expected("1", image)
        scores = {c["class_name"]: c["score"] for c in body["top_k"]}
        assert [scores[str(d)] for d in range(10)] == pytest.approx(list(expected), abs=1e-5)
        assert body["predicted_class"] == str(int(np.argmax(expected)))
    ready = await app.client.get("/readyz")
    assert ready.json()["checks"] == {"broker": "ok", "database": "ok", "triton": "ok"}


# 4 000 real requests through Triton's Python backend: minutes on two busy cores, not seconds.
@pytest.mark.timeout(300)
async def test_a_ninety_ten_canary_gets_its_share_and_a_new_step_moves_it_live(
    bff: BffFactory, served: Served
) -> None:
    app = await bff.start(log_enabled=False)
    images = [served.snapshot.pngs[e.image_sha256] for e in served.snapshot.entries]
    n = 2000

    await app.publish(step(served, 10, 1))
    await weights_applied(app, served.name, 10)
    at_10 = await many(app, [images[i % len(images)] for i in range(n)], concurrency=64)
    await app.publish(step(served, 50, 2))
    await weights_applied(app, served.name, 50)
    at_50 = await many(app, [images[i % len(images)] for i in range(n)], concurrency=64)

    for answers, share in ((at_10, 0.1), (at_50, 0.5)):
        assert {a.status_code for a in answers} == {200}
        versions = Counter(a.json()["model_version"] for a in answers)
        assert set(versions) == {"1", "2"}
        tolerance = 4 * math.sqrt(share * (1 - share) / n)
        assert versions["2"] / n == pytest.approx(share, abs=tolerance)
    # The two versions really differ: the answer depends on the version that served it.
    sample = images[0]
    assert not np.allclose(served.expected("1", sample), served.expected("2", sample), atol=1e-3)


async def test_every_prediction_arrives_on_the_bus_as_inference_logged(
    bff: BffFactory, served: Served, rabbit_url: str
) -> None:
    app = await bff.start()
    images = list(served.snapshot.pngs.values())[:25]
    async with EventProbe(rabbit_url, bff.topology, InferenceLoggedV1) as probe:
        answers = await many(app, images, concurrency=8)
        bad = await app.client.post(
            "/predict", json={"image_b64": base64.b64encode(b"nope").decode()}, headers=PREDICT
        )
        logged = await probe.wait(InferenceLoggedV1, n=26, timeout=30)

    ids = {a.json()["prediction_id"] for a in answers}
    assert bad.status_code == 422
    assert len(logged) == 26
    ok = [e for e in logged if e.payload.status == "ok"]
    assert {str(e.payload.request_id) for e in ok} == ids
    [error] = [e for e in logged if e.payload.status == "error"]
    assert error.payload.error_code == "invalid_image"
    assert {e.payload.project_id for e in logged} == {PROJECT}
    assert {e.payload.route for e in logged} == {"online"}
    assert app.metric("flywheel_bff_inference_logs_published_total") == 26


async def test_with_rabbitmq_cut_predictions_stay_fast_and_drops_are_counted(
    bff: BffFactory, served: Served, rabbit_url: str
) -> None:
    host, port = rabbit_url.removeprefix("amqp://").split("@")[1].split("/")[0].split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    bff.stack.push_async_callback(proxy.stop)
    proxied = rabbit_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    app = await bff.start(rabbit_url=proxied, log_buffer=5, log_publish_timeout_s=0.5)
    images = list(served.snapshot.pngs.values())[:30]
    warm = await app.predict(images[0])
    assert warm.status_code == 200

    await proxy.stop()
    started = time.perf_counter()
    answers = []
    for image in images:
        begun = time.perf_counter()
        answers.append(await app.predict(image))
        assert time.perf_counter() - begun < 1.0
    elapsed = time.perf_counter() - started

    assert {a.status_code for a in answers} == {200}
    assert elapsed < 10

    async def all_accounted() -> bool:
        published = app.metric("flywheel_bff_inference_logs_published_total")
        dropped = app.metric("flywheel_bff_inference_logs_dropped_total")
        return dropped > 0 and published + dropped == len(images) + 1

    await wait_for(all_accounted, timeout=30, message="every log published or counted as dropped")
    exposed = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families((await app.client.get("/metrics")).text)
        for sample in family.samples
        if sample.name == "flywheel_bff_inference_logs_dropped_total"
    }
    assert sum(exposed.values()) == app.metric("flywheel_bff_inference_logs_dropped_total") > 0


async def test_a_version_triton_has_not_loaded_is_503_model_not_ready(
    bff: BffFactory, served: Served
) -> None:
    app = await bff.start()
    line = served.name
    await app.publish(
        step(served, 100, 1).model_copy(
            update={
                "payload": step(served, 100, 1).payload.model_copy(
                    update={"candidate_version": served.unloaded_version}
                )
            }
        )
    )
    await weights_applied(app, line, 100)

    answer = await app.predict(next(iter(served.snapshot.pngs.values())))

    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "model_not_ready"
    assert answer.headers["retry-after"]


# --- batch --------------------------------------------------------------------------------------


async def test_a_batch_job_labels_a_snapshot_as_per_image_predictions_do(
    bff: BffFactory, served: Served
) -> None:
    app = await bff.start(job_chunk=8, job_concurrency=2)

    created = await app.client.post(
        "/predict/batch",
        json={"snapshot_id": served.snapshot.snapshot_id, "project_id": PROJECT},
        headers=PREDICT,
    )
    assert created.status_code == 202, created.text
    job = created.json()
    seen: list[tuple[str, int]] = []

    async def finished() -> bool:
        status = (await app.client.get(job["status_url"], headers=PREDICT)).json()
        seen.append((status["state"], status["done"]))
        return status["state"] in ("succeeded", "failed")

    await wait_for(finished, timeout=60, interval=0.02, message="batch job finished")
    status = (await app.client.get(job["status_url"], headers=PREDICT)).json()
    results = await app.client.get(job["results_url"], headers=PREDICT)
    lines = [json.loads(line) for line in results.text.splitlines()]
    singles = {
        line["image_key"]: (
            await app.client.post(
                "/predict", json={"s3_key": line["image_key"], "top_k": 1}, headers=PREDICT
            )
        ).json()
        for line in lines
    }

    assert status["state"] == "succeeded", status
    total = len(served.snapshot.entries)
    assert (status["total"], status["done"], status["errors"]) == (total, total, 0)
    assert status["results_parts"] == math.ceil(total / 8)
    dones = [done for _, done in seen]
    assert dones == sorted(dones)  # progress only ever grows
    assert seen[-1] == ("succeeded", total)
    assert [line["image_key"] for line in lines] == [
        e.image_key for e in sorted(served.snapshot.entries, key=lambda e: str(e.label_id))
    ]
    for line in lines:
        single = singles[line["image_key"]]
        assert line["model_version"] == single["model_version"] == "1"
        assert line["predicted_class"] == single["predicted_class"]
        assert line["confidence"] == pytest.approx(single["confidence"], abs=1e-6)
        assert line["label"]["image_uri"] == f"s3://{served.bucket}/{line['image_key']}"
        assert line["label"]["source"] == "pseudo"
    assert {Split(line["split"]) for line in lines} <= set(Split)


# --- Label Studio -------------------------------------------------------------------------------


async def test_label_studio_asks_in_its_shape_and_gets_its_shape(
    bff: BffFactory, served: Served
) -> None:
    app = await bff.start()
    entries = served.snapshot.entries[:3]
    config = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="digit" toName="image" choice="single">'
        + "".join(f'<Choice value="{d}"/>' for d in range(10))
        + "</Choices></View>"
    )
    request = {
        "tasks": [
            {"id": 100 + i, "data": {"image": f"s3://{served.bucket}/{e.image_key}"}}
            for i, e in enumerate(entries)
        ],
        "model_version": None,
        "project": "7.1767225600",
        "label_config": config,
        "params": {"login": None, "password": None, "context": None},
    }

    setup = await app.client.post(
        "/label-studio/setup", json={"project": "7.1767225600", "schema": config}, headers=PREDICT
    )
    response = await app.client.post("/label-studio/predict", json=request, headers=PREDICT)

    assert setup.json() == {"model_version": "1"}
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for entry, result in zip(entries, results, strict=True):
        expected = served.expected("1", served.snapshot.pngs[entry.image_sha256])
        [region] = result["result"]
        assert result["model_version"] == "1"
        assert result["score"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert region["type"] == "choices"
        assert (region["from_name"], region["to_name"]) == ("digit", "image")
        assert region["value"] == {"choices": [str(int(np.argmax(expected)))]}


async def test_a_job_left_running_by_a_replica_that_died_is_taken_over(
    bff: BffFactory, served: Served
) -> None:
    app = await bff.start(job_lease_s=1, job_chunk=16)
    now = datetime.now(UTC)
    job_id = uuid.uuid4()
    orphan = BatchJob(
        job_id=job_id,
        state=JobState.RUNNING,
        project_id=PROJECT,
        snapshot_id=served.snapshot.snapshot_id,
        splits=list(Split),
        model_line=served.name,
        registered_model=served.name,
        model_version="2",
        chunk_size=16,
        results_bucket=served.bucket,
        results_prefix=f"pseudo-labels/{job_id}/",
        requested_by="tester",
        owner="a-replica-that-died",
        attempts=1,
        heartbeat_at=now - timedelta(minutes=5),
        created_at=now,
        updated_at=now,
    )
    await SqlJobStore(app.app.state.runtime.database).create(orphan)

    async def succeeded() -> bool:
        status = await app.client.get(f"/predict/batch/{job_id}", headers=PREDICT)
        return status.json()["state"] == "succeeded"

    await wait_for(succeeded, timeout=30, message="orphaned job finished by this replica")
    stored = await SqlJobStore(app.app.state.runtime.database).get(job_id)
    results = await app.client.get(f"/predict/batch/{job_id}/results", headers=PREDICT)

    assert stored is not None
    assert (stored.owner, stored.attempts) == (app.app.state.replica, 2)
    assert len(results.text.splitlines()) == len(served.snapshot.entries)
    assert {json.loads(line)["model_version"] for line in results.text.splitlines()} == {"2"}


async def test_a_repeated_image_is_answered_from_redis_as_triton_answered_it(
    bff: BffFactory, served: Served
) -> None:
    app = await bff.start(redis_url="redis://127.0.0.1:6379/15")
    image = next(iter(served.snapshot.pngs.values()))

    first = (await app.predict(image, top_k=10)).json()
    cached = await wait_for_cached(app, image)

    assert first["cached"] is False
    assert cached["top_k"] == first["top_k"]
    assert cached["model_version"] == first["model_version"]
    assert app.metric("flywheel_bff_cache_lookups_total", result="hit") >= 1


async def wait_for_cached(app: Bff, image: bytes) -> dict[str, object]:
    answers: list[dict[str, object]] = []

    async def hit() -> bool:
        # The cache is written in the background, after the first answer went out.
        answers.append((await app.predict(image, top_k=10)).json())
        return answers[-1]["cached"] is True

    await wait_for(hit, timeout=10, message="answer served from the cache")
    return answers[-1]


async def test_every_replica_gets_every_routing_event(bff: BffFactory, served: Served) -> None:
    replicas = [await bff.start(), await bff.start()]

    await replicas[0].publish(step(served, 30, 1))

    for replica in replicas:
        await weights_applied(replica, served.name, 30)
    queues = {r.app.state.replica for r in replicas}
    assert len(queues) == 2
