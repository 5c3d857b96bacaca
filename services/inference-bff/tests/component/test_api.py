import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from flywheel_inference_bff.api import routers
from flywheel_inference_bff.jobs import BatchJobs, JobSettings
from flywheel_inference_bff.main import attach
from flywheel_inference_bff.ports import JobState
from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.auth import (
    AuthSettings,
    CachingTokenVerifier,
    generate_dev_key,
    issue_dev_token,
)
from flywheel_runtime.http import install_error_handlers

from ..conftest import digit_image
from ..fakes import MODEL, FakeJobStore, FakeResults, FakeSnapshots, World, world

KEY = generate_dev_key("EC")
DATA = "flywheel-data"
LS_PASSWORD = "ls-secret"
LABEL_CONFIG = (
    '<View><Image name="img" value="$image"/>'
    '<Choices name="digit" toName="img"><Choice value="7"/></Choices></View>'
)


def _bearer(*roles: str) -> dict[str, str]:
    token = issue_dev_token(KEY, subject="alice", username="alice", roles=roles)
    return {"Authorization": f"Bearer {token}"}


PREDICT = _bearer("predict")
LS_BASIC = {
    "Authorization": "Basic " + base64.b64encode(f"label-studio:{LS_PASSWORD}".encode()).decode()
}


@dataclass
class Api:
    client: httpx.AsyncClient
    w: World
    store: FakeJobStore
    snapshots: FakeSnapshots
    jobs: BatchJobs
    app: FastAPI

    async def predict_file(self, data: bytes, **fields: str) -> httpx.Response:
        return await self.client.post(
            "/predict",
            files={"image": ("digit.png", data, "image/png")},
            data=fields,
            headers=PREDICT,
        )

    async def predict_json(
        self, body: dict[str, Any], headers: dict[str, str] = PREDICT
    ) -> httpx.Response:
        return await self.client.post("/predict", json=body, headers=headers)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    settings = BffSettings(
        auth=AuthSettings(dev_signing_key=SecretStr(KEY)),
        label_studio_password=SecretStr(LS_PASSWORD),
        data_bucket=DATA,
        max_image_bytes=20_000,
        max_image_pixels=250_000,
        max_batch_images=4,
        max_request_bytes=1_000_000,
    )
    w = world(project_ids={MODEL: "digits"})
    w.serve("1", champion=True)
    store, snapshots = FakeJobStore(), FakeSnapshots()
    jobs = BatchJobs(
        store,
        w.predictor,
        snapshots,
        FakeResults(),
        JobSettings(data_bucket=DATA, results_bucket=DATA, chunk_size=2, retry_s=0),
        default_model_line=MODEL,
        replica="replica-a",
    )
    app = FastAPI()
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    attach(app, settings, w.predictor, jobs, CachingTokenVerifier(settings.auth), w.metrics)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bff.test") as client:
        yield Api(client, w, store, snapshots, jobs, app)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def _field(error: dict[str, Any]) -> str | None:
    details = error["details"]
    fields = details.get("fields")
    return fields[0]["field"] if fields else details.get("field")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- /predict -----------------------------------------------------------------------------------


async def test_one_image_is_predicted_from_a_file_base64_or_a_stored_key(api: Api) -> None:
    png = digit_image(1)
    key = api.w.images.add(png)

    by_file = await api.predict_file(png, top_k="2")
    by_b64 = await api.predict_json({"image_b64": _b64(png), "top_k": 2})
    by_key = await api.predict_json({"s3_key": key, "top_k": 2})
    by_uri = await api.predict_json({"s3_key": f"s3://{DATA}/{key}", "top_k": 2})

    bodies = [r.json() for r in (by_file, by_b64, by_key, by_uri)]
    assert [r.status_code for r in (by_file, by_b64, by_key, by_uri)] == [200] * 4
    first = bodies[0]
    assert set(first) == {
        "prediction_id",
        "model_line",
        "registered_model",
        "model_version",
        "predicted_class",
        "confidence",
        "top_k",
        "input_sha256",
        "latency_ms",
        "cached",
    }
    assert (first["model_line"], first["model_version"]) == (MODEL, "1")
    assert len(first["top_k"]) == 2
    assert first["top_k"][0] == {
        "class_name": first["predicted_class"],
        "score": first["confidence"],
    }
    assert {b["input_sha256"] for b in bodies} == {first["input_sha256"]}
    assert {b["predicted_class"] for b in bodies} == {first["predicted_class"]}
    assert len({b["prediction_id"] for b in bodies}) == 4
    assert len(api.w.log.events) == 4


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"image_b64": "!!!"}, 422, "invalid_image", "image_b64"),
        ({"image_b64": _b64(b"not an image")}, 422, "invalid_image", "image_b64"),
        ({"s3_key": "s3://elsewhere/images/a"}, 422, "image_source_refused", "s3_key"),
        ({"s3_key": "https://example.com/a.png"}, 422, "image_source_refused", "s3_key"),
        ({"s3_key": "images/00/none"}, 422, "image_not_found", "s3_key"),
        ({}, 422, "invalid_input", None),
        ({"image_b64": "AAAA", "s3_key": "k"}, 422, "invalid_input", None),
        ({"image_b64": "AAAA", "model_line": "Not A Slug"}, 422, "invalid_input", "model_line"),
        ({"image_b64": "AAAA", "top_k": 0}, 422, "invalid_input", "top_k"),
        ({"image_b64": "A" * 40_000}, 413, "image_too_large", "image_b64"),
    ],
)
async def test_client_mistakes_are_refused_naming_the_field(
    api: Api, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    error = _error(await api.predict_json(body), status)

    assert error["code"] == code
    if field is not None:
        assert _field(error) == field


async def test_multipart_mistakes_are_refused_too(api: Api) -> None:
    too_big = await api.predict_file(digit_image(2, size=(300, 300)) + b"\0" * 20_000)
    garbage = await api.predict_file(b"garbage")
    no_file = await api.client.post(
        "/predict", data={"top_k": "1"}, files={"other": ("a", b"x")}, headers=PREDICT
    )
    text = await api.client.post(
        "/predict", content=b"x", headers=PREDICT | {"content-type": "text/plain"}
    )

    assert _error(too_big, 413)["details"]["field"] == "image"
    assert _error(garbage, 422)["details"]["field"] == "image"
    assert _error(no_file, 422)["details"]["field"] == "image"
    assert _error(text, 415)["details"]["field"] == "content-type"


async def test_an_unknown_model_line_is_404(api: Api) -> None:
    error = _error(
        await api.predict_json({"image_b64": _b64(digit_image(1)), "model_line": "letters"}), 404
    )

    assert error["code"] == "model_line_not_found"


async def test_serving_trouble_is_503_or_504_with_retry_after(api: Api) -> None:
    body = {"image_b64": _b64(digit_image(1))}
    api.w.inference.loaded.clear()
    not_ready = await api.predict_json(body)
    api.w.inference.slow = True
    api.w.inference.loaded.add((MODEL, "1"))
    timed_out = await api.predict_json(body)
    api.w.inference.down = True
    down = await api.predict_json(body)

    assert _error(not_ready, 503)["code"] == "model_not_ready"
    assert _error(timed_out, 504)["code"] == "inference_timeout"
    assert _error(down, 503)["code"] == "inference_unavailable"
    assert {r.headers.get("retry-after") for r in (not_ready, timed_out, down)} <= {"1", "5"}
    assert all(r.headers.get("retry-after") for r in (not_ready, timed_out, down))


async def test_predicting_needs_a_token_with_the_predict_role(api: Api) -> None:
    body = {"image_b64": _b64(digit_image(1))}

    anonymous = await api.predict_json(body, headers={})
    labeler = await api.predict_json(body, headers=_bearer("labeler"))
    basic = await api.predict_json(body, headers=LS_BASIC)

    assert _error(anonymous, 401)["code"] == "unauthenticated"
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert _error(labeler, 403)["details"]["missing_roles"] == ["predict"]
    assert _error(basic, 401)["details"]["reason"] == "invalid_scheme"


async def test_request_latency_is_measured_by_route(api: Api) -> None:
    await api.predict_json({"image_b64": _b64(digit_image(1))})
    await api.client.get("/nowhere")

    samples = {
        (s.labels["route"], s.labels["status"]): s.value
        for family in api.w.metrics.requests.collect()
        for s in family.samples
        if s.name == "flywheel_bff_request_seconds_count"
    }
    assert samples[("/predict", "200")] == 1
    assert samples[("unmatched", "404")] == 1


# --- /predict/batch -----------------------------------------------------------------------------


async def test_an_inline_batch_answers_each_image_and_names_bad_ones(api: Api) -> None:
    images = [{"image_b64": _b64(digit_image(i))} for i in range(3)] + [{"image_b64": _b64(b"x")}]

    response = await api.client.post(
        "/predict/batch", json={"images": images, "top_k": 1}, headers=PREDICT
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["errors"] == 1
    assert [item["index"] for item in body["items"]] == [0, 1, 2, 3]
    assert all(item["prediction"]["model_version"] == "1" for item in body["items"][:3])
    assert body["items"][3]["error"] == {
        "code": "invalid_image",
        "message": "not a decodable image",
        "field": "images.3.image_b64",
    }
    assert [size for _, _, size in api.w.inference.calls] == [3]


async def test_an_inline_batch_is_bounded(api: Api) -> None:
    images = [{"image_b64": "AAAA"}] * 5

    error = _error(
        await api.client.post("/predict/batch", json={"images": images}, headers=PREDICT), 422
    )

    assert error["details"]["field"] == "images"


async def test_a_snapshot_batch_is_a_job_answered_202_and_followed_to_its_results(api: Api) -> None:
    pngs = [digit_image(i) for i in range(5)]
    for png in pngs:
        api.w.images.add(png)
    api.snapshots.add("digits", "snap-1", pngs)

    created = await api.client.post(
        "/predict/batch", json={"snapshot_id": "snap-1"}, headers=PREDICT
    )
    job = created.json()
    early = await api.client.get(job["results_url"], headers=PREDICT)
    claimed = await api.store.claim("replica-a", 60)
    assert claimed is not None
    await api.jobs.run(claimed)
    status = await api.client.get(job["status_url"], headers=PREDICT)
    results = await api.client.get(job["results_url"], headers=PREDICT)

    assert created.status_code == 202, created.text
    assert created.headers["location"] == f"/predict/batch/{job['job_id']}"
    assert (job["state"], job["model_version"], job["project_id"]) == ("queued", "1", "digits")
    assert job["results_location"] == f"s3://{DATA}/pseudo-labels/{job['job_id']}/"
    assert _error(early, 409)["code"] == "job_not_finished"
    done = status.json()
    assert (done["state"], done["done"], done["total"], done["errors"]) == ("succeeded", 5, 5, 0)
    assert done["results_parts"] == 3
    assert results.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert len(lines) == 5
    assert {line["label"]["source"] for line in lines} == {"pseudo"}
    assert api.store.jobs[claimed.job_id].state is JobState.SUCCEEDED


async def test_batch_requests_take_images_or_a_snapshot_not_both(api: Api) -> None:
    both = await api.client.post(
        "/predict/batch",
        json={"images": [{"image_b64": "AAAA"}], "snapshot_id": "s"},
        headers=PREDICT,
    )
    unknown = await api.client.get(
        "/predict/batch/00000000-0000-4000-8000-000000000000", headers=PREDICT
    )

    assert _error(both, 422)["code"] == "invalid_input"
    assert _error(unknown, 404)["code"] == "job_not_found"


# --- Label Studio -------------------------------------------------------------------------------


async def test_label_studio_gets_predictions_in_its_own_shape(api: Api) -> None:
    png = digit_image(7)
    key = api.w.images.add(png)
    request = {
        "tasks": [
            {"id": 11, "data": {"image": f"s3://{DATA}/{key}"}, "meta": {}},
            {"id": 12, "data": {"image": "data:image/png;base64," + _b64(png)}},
        ],
        "label_config": LABEL_CONFIG,
        "project": "4.1700000000",
        "params": {"login": None, "password": None, "context": None},
    }

    health = await api.client.get("/label-studio/health")
    setup = await api.client.post(
        "/label-studio/setup",
        json={"project": "4.1700000000", "schema": LABEL_CONFIG},
        headers=LS_BASIC,
    )
    response = await api.client.post("/label-studio/predict", json=request, headers=LS_BASIC)
    by_line = await api.client.post(
        f"/label-studio/lines/{MODEL}/predict", json=request, headers=PREDICT
    )

    assert health.json()["status"] == "UP"
    assert setup.json() == {"model_version": "1"}
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    for result in results:
        assert set(result) == {"model_version", "score", "result"}
        [region] = result["result"]
        assert (region["from_name"], region["to_name"], region["type"]) == (
            "digit",
            "img",
            "choices",
        )
        assert len(region["value"]["choices"]) == 1
        assert region["score"] == result["score"]
    assert results[0]["result"][0]["value"] == results[1]["result"][0]["value"]
    assert by_line.status_code == 200


async def test_label_studio_tasks_from_elsewhere_are_refused_naming_the_field(api: Api) -> None:
    request = {
        "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
        "label_config": LABEL_CONFIG,
    }

    error = _error(
        await api.client.post("/label-studio/predict", json=request, headers=LS_BASIC), 422
    )
    bad_config = _error(
        await api.client.post(
            "/label-studio/predict", json={"tasks": [], "label_config": "<View>"}, headers=LS_BASIC
        ),
        422,
    )

    assert (error["code"], error["details"]["field"]) == (
        "image_source_refused",
        "tasks.0.data.image",
    )
    assert (bad_config["code"], bad_config["details"]["field"]) == (
        "invalid_label_config",
        "label_config",
    )


async def test_label_studio_needs_its_basic_credentials_or_the_predict_role(api: Api) -> None:
    wrong = {"Authorization": "Basic " + _b64(b"label-studio:nope")}
    request = {"tasks": []}

    refused = await api.client.post("/label-studio/predict", json=request, headers=wrong)
    anonymous = await api.client.post("/label-studio/predict", json=request)
    labeler = await api.client.post(
        "/label-studio/predict", json=request, headers=_bearer("labeler")
    )

    assert _error(refused, 401)["details"]["reason"] == "bad_credentials"
    assert _error(anonymous, 401)["details"]["reason"] == "missing_token"
    assert labeler.status_code == 403


async def test_a_body_that_cannot_be_parsed_is_a_client_error_not_a_500(api: Api) -> None:
    broken_multipart = await api.client.post(
        "/predict",
        content=b"--nope\r\nnot a part",
        headers=PREDICT | {"content-type": "multipart/form-data; boundary=x"},
    )
    two_files = await api.client.post(
        "/predict",
        files=[
            ("image", ("a.png", digit_image(1), "image/png")),
            ("image", ("b.png", b"x", "image/png")),
        ],
        headers=PREDICT,
    )
    broken_json = await api.client.post(
        "/predict", content=b"{not json", headers=PREDICT | {"content-type": "application/json"}
    )
    text_part = await api.client.post(
        "/predict", files={"image": ("a.txt", b"hello", "text/plain")}, headers=PREDICT
    )

    assert broken_multipart.status_code in (400, 422), broken_multipart.text
    assert two_files.status_code in (400, 422), two_files.text
    assert _error(broken_json, 422)["code"] == "invalid_input"
    assert _error(text_part, 415)["details"]["field"] == "image"
    for response in (broken_multipart, two_files):
        assert set(response.json()["error"]) == {"code", "message", "details"}
