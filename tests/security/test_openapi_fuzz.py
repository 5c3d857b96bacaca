"""Property-based fuzzing of the labeling and inference-bff APIs from their own OpenAPI documents.

Schemathesis generates requests for every documented operation, valid ones and invalid ones;
each is sent in-process to the app (its lifespan running on the real PostgreSQL, RabbitMQ and
S3; the BFF's on a real MLflow and Triton serving a registered model) with a bearer token
holding every role the apps know. Every answer must be no undocumented 5xx (a 500 never) and
match the documented response schema. A few hand-written valid requests per app (a project, a
label, a prediction) run first, through the same checks, so the success paths are covered
too, not only the refusals random data mostly gets.

Schemathesis' own ASGI transport runs an app in a thread and event loop of its own and starts
its lifespan again there; here the cases go through the test's ``httpx`` client instead, sent
from a worker thread (hypothesis drives the examples synchronously) to the test's event loop,
where the app's connection pools live.

The regression tests at the end are the failing examples fuzzing found, as plain requests.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from mlflow import MlflowClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from flywheel_clients.registry import LABELS_FILE, ONNX_FILE, ModelRegistry
from flywheel_serving.repository import ServingOptions, sync_from_registry
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.serving import digit_model_files
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.export import labels_json

from .conftest import Services

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    # Schemathesis draws some values with `random` inside its strategies; not ours to fix.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

ROLES = ("admin", "labeler", "predict")
"""Every role the two apps ask for (labeling's admin and labeler, the BFF's ``predict_role``):
each request may do whatever its operation allows."""

EXAMPLES = {
    "labeling": {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 10},
    "inference-bff": {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 10},
}
"""Examples per operation and mode: about 700 requests, both apps fuzzed in some 20 s on two
cores (the servers' start-up comes on top)."""

EXCLUDED: dict[tuple[str, str, str], str] = {}
"""``(service, method, path)`` → why it is not fuzzed. None is: the one streaming operation
(``/predict/batch/{job_id}/results``) answers a made-up job id with a plain 404."""

SERVER_ERRORS_ALLOWED_IF_DOCUMENTED = frozenset({"502", "503", "504"})
"""Serving trouble an operation may answer when its document says so; a 500 never passes."""

SERVING = ServingOptions(flavour="python", max_batch_size=8, preferred_batch_sizes=(8,))
"""The Triton bundled with nvidia-pytriton has no ONNX Runtime backend: Python backend."""

FIXED = {
    "labeling": (
        "POST /v1/projects: NUL in a class name or name -> 500 (found by fuzzing)",
        "PUT /v1/projects/{project}: NUL in the name -> 500",
        "POST .../labels, .../labels:batch: NUL in a label field -> 500",
        "POST .../labels:batch: NUL in an image_uri key -> 500 (S3 refuses the key)",
    ),
    "inference-bff": (
        "POST /predict: NUL in s3_key -> 500 (S3 refuses the key)",
        "POST /predict/batch: NUL in snapshot_id or model_version -> 500",
    ),
}
"""Findings fixed in the services, each pinned by a regression test at the end of this file."""

LABEL_CONFIG = (
    '<View><Image name="img" value="$image"/><Choices name="digit" toName="img">'
    + "".join(f'<Choice value="{digit}"/>' for digit in range(10))
    + "</Choices></View>"
)
"""A Label Studio label config for the digits the served model knows."""

Send = Callable[[dict[str, Any]], httpx.Response]
Headers = Callable[[str], dict[str, str]]


@dataclass
class Tally:
    """What one app's fuzzing did, printed for ``pytest -s``."""

    service: str
    operations: int = 0
    examples: int = 0
    failures: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (
            f"{self.service}: {self.operations} operations fuzzed, {self.examples} examples run, "
            f"{len(self.failures)} failures found now, {len(FIXED[self.service])} found and fixed "
            "before (regression tests below)"
        )


@dataclass(frozen=True)
class Seed:
    """A hand-written valid request, sent before the fuzzing and checked the same way."""

    method: str
    path: str
    """The operation's templated path, as the OpenAPI document names it."""
    path_parameters: dict[str, Any] = field(default_factory=dict)
    body: Any = None
    media_type: str | None = None
    status: int = 200
    """The status it must answer."""


def to_httpx(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``httpx`` request arguments from schemathesis' ``requests`` ones: a raw body is
    ``content``, and multipart fields without a file name are sent as text."""
    names = ("method", "url", "headers", "params", "json")
    sent: dict[str, Any] = {k: kwargs[k] for k in names if k in kwargs}
    if kwargs.get("files"):
        sent["files"] = [
            (name, (filename, value if isinstance(value, bytes | str) else str(value)))
            for name, (filename, value, *_) in kwargs["files"]
        ]
    data = kwargs.get("data")
    if isinstance(data, bytes | str):
        sent["content"] = data
    elif data:
        sent["data"] = data
    if kwargs.get("cookies"):
        sent["cookies"] = kwargs["cookies"]
    return sent


def check(case: Any, send: Send, headers: Headers) -> int:
    """Send ``case`` and check its answer: schema conformance always, and no 5xx unless the
    operation documents it (a 502/503/504 only)."""
    kwargs = case.as_transport_kwargs(base_url="http://test")
    kwargs["headers"] = {**(kwargs.get("headers") or {}), **headers(case.operation.path)}
    response = send(to_httpx(kwargs))
    documented = set(case.operation.definition.raw.get("responses", {}))
    status = str(response.status_code)
    if status in documented & SERVER_ERRORS_ALLOWED_IF_DOCUMENTED:
        case.validate_response(response, checks=[response_schema_conformance])
    else:
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    return response.status_code


def fuzz(service: str, app_schema: Any, seeds: list[Seed], send: Send, headers: Headers) -> Tally:
    """The seeds, then every operation of ``app_schema`` with positive and negative examples;
    runs in a worker thread."""
    tally = Tally(service)
    for seed in seeds:
        operation = app_schema[seed.path][seed.method]
        body = {} if seed.body is None else {"body": seed.body, "media_type": seed.media_type}
        case = operation.Case(path_parameters=seed.path_parameters, **body)
        tally.examples += 1
        try:
            status = check(case, send, headers)
        except (Exception, BaseExceptionGroup) as error:
            tally.failures.append(f"seed {operation.label}: {error}")
            continue
        if status != seed.status:
            tally.failures.append(f"seed {operation.label}: answered {status}, not {seed.status}")
    for result in app_schema.get_all_operations():
        operation = result.ok()
        if (service, operation.method.upper(), operation.path) in EXCLUDED:
            continue
        tally.operations += 1
        for mode, examples in EXAMPLES[service].items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def one(case: Any) -> None:
                tally.examples += 1
                check(case, send, headers)

            try:
                one()
            except Unsatisfiable:
                pass  # nothing to make invalid: an operation without parameters or body
            except (Exception, BaseExceptionGroup) as error:
                tally.failures.append(f"{operation.label} [{mode.value}]: {error}")
    return tally


async def run_fuzz(services: Services, service: str, headers: Headers, seeds: list[Seed]) -> Tally:
    client = services.clients[service]
    app_schema = schemathesis.openapi.from_dict(services.apps[service].openapi())
    loop = asyncio.get_running_loop()

    async def request(kwargs: dict[str, Any]) -> httpx.Response:
        built = client.build_request(**kwargs)
        built.read()  # a multipart body is a stream; the checks read the request as sent
        return await client.send(built)

    def send(kwargs: dict[str, Any]) -> httpx.Response:
        return asyncio.run_coroutine_threadsafe(request(kwargs), loop).result(timeout=60)

    started = time.perf_counter()
    tally = await asyncio.to_thread(fuzz, service, app_schema, seeds, send, headers)
    print(f"\n{tally.report()} in {time.perf_counter() - started:.1f}s")
    for failure in tally.failures:
        print(f"  FAILED {failure}")
    return tally


def digit_png(index: int = 0) -> bytes:
    pixels, _ = load_mnist("test", limit=index + 1)
    return to_png(pixels[index])


async def serve_digit_model(mlflow_uri: str, triton: TritonServer, model_line: str) -> None:
    """Register one version of an (untrained) ONNX digit classifier as ``model_line``'s
    champion, logged as the trainer logs it, and load it into ``triton``."""
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model(model_line)
    run = client.create_run(client.create_experiment(model_line))
    files = digit_model_files(model_line, "0", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ONNX_FILE).write_bytes(files.onnx)
        (Path(tmp) / LABELS_FILE).write_bytes(labels_json(files.labels))
        client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        model_line, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    client.set_registered_model_alias(model_line, "champion", version)
    await sync_from_registry(
        ModelRegistry(mlflow_uri), model_line, triton.repository, SERVING, versions=[str(version)]
    )
    async with TritonControl(triton.http_url) as control:
        await control.load(model_line)
        await control.wait_model_ready(model_line, str(version), timeout=120)


def bearer_headers(services: Services, webhook_secret: str | None = None) -> Headers:
    bearer = services.bearer("fuzzer", *ROLES)
    webhook = {"X-Flywheel-Webhook-Secret": webhook_secret} if webhook_secret else {}
    return lambda path: bearer | webhook if path.endswith("/webhook") else bearer


async def test_labeling_api_survives_fuzzing(services: Services) -> None:
    await services.start("labeling")
    project = f"fuzz-{services.suffix}"
    png = digit_png()
    seeds = [
        Seed(
            "POST",
            "/v1/projects",
            body={"project_id": project, "name": "Digits", "class_names": ["0", "1", "7"]},
            media_type="application/json",
            status=201,
        ),
        Seed(
            "POST",
            "/v1/projects/{project}/labels",
            {"project": project},
            body={"image": png, "class_name": "7"},
            media_type="multipart/form-data",
            status=201,
        ),
        Seed(
            "POST",
            "/v1/projects/{project}/labels:batch",
            {"project": project},
            body={"items": [{"class_name": "1", "image_base64": base64.b64encode(png).decode()}]},
            media_type="application/json",
        ),
        Seed("GET", "/v1/projects/{project}/labels", {"project": project}),
        Seed("GET", "/v1/projects/{project}/stats", {"project": project}),
        Seed("GET", "/v1/projects/{project}/snapshots", {"project": project}),
    ]

    tally = await run_fuzz(
        services, "labeling", bearer_headers(services, services.secrets.webhook_secret), seeds
    )

    assert tally.operations > 0
    assert not tally.failures, "\n".join(tally.failures)


async def test_bff_api_survives_fuzzing(
    services: Services,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_line = f"fuzz-{services.suffix}"
    await serve_digit_model(mlflow_tracking_uri, triton_server, model_line)
    monkeypatch.setenv("FLYWHEEL_BFF_DEFAULT_MODEL_LINE", model_line)
    services.platform = services.platform.model_copy(
        update={"mlflow_uri": mlflow_tracking_uri, "triton_url": triton_server.http_url}
    )
    await services.start("inference-bff")
    image_b64 = base64.b64encode(digit_png()).decode()
    tasks = {
        "tasks": [{"id": 1, "data": {"image": f"data:image/png;base64,{image_b64}"}}],
        "label_config": LABEL_CONFIG,
    }
    seeds = [
        Seed("POST", "/predict", body={"image_b64": image_b64}, media_type="application/json"),
        Seed("POST", "/predict", body={"image": digit_png()}, media_type="multipart/form-data"),
        Seed(
            "POST",
            "/predict/batch",
            body={"images": [{"image_b64": image_b64}], "top_k": 3},
            media_type="application/json",
        ),
        Seed("GET", "/predict/batch/{job_id}", {"job_id": str(uuid.uuid4())}, status=404),
        Seed(
            "POST",
            "/label-studio/setup",
            body={"project": "1", "schema": LABEL_CONFIG},
            media_type="application/json",
        ),
        Seed("POST", "/label-studio/predict", body=tasks, media_type="application/json"),
        Seed(
            "POST",
            "/label-studio/lines/{model_line}/predict",
            {"model_line": model_line},
            body=tasks,
            media_type="application/json",
        ),
    ]

    try:
        tally = await run_fuzz(services, "inference-bff", bearer_headers(services), seeds)
    finally:
        async with TritonControl(triton_server.http_url) as control:
            await control.unload(model_line)

    assert tally.operations > 0
    assert not tally.failures, "\n".join(tally.failures)


# --- regressions: what fuzzing found, as plain requests ---------------------------------------
# PostgreSQL text cannot hold NUL ("\u0000" in JSON, a raw 0 byte in a form field); strings the
# services stored as given failed the insert with a 500. S3 refuses a key with NUL, which the
# storage layer also reports as a 500.


async def test_labeling_refuses_nul_in_stored_strings(services: Services) -> None:
    await services.start("labeling")
    client = services.clients["labeling"]
    headers = services.bearer("fuzzer", *ROLES)
    png = digit_png()

    project = await client.post(
        "/v1/projects",
        headers=headers,
        json={"project_id": "nul", "name": "Digits", "class_names": ["0", "1\u0000"]},
    )
    created = await client.post(
        "/v1/projects",
        headers=headers,
        json={"project_id": "nul", "name": "Digits", "class_names": ["0", "1"]},
    )
    renamed = await client.put("/v1/projects/nul", headers=headers, json={"name": "Di\u0000gits"})
    multipart = await client.post(
        "/v1/projects/nul/labels",
        headers=headers,
        files={"image": ("0.png", png, "image/png")},
        data={"class_name": "0", "external_id": "tool-\u0000"},
    )
    batch = await client.post(
        "/v1/projects/nul/labels:batch",
        headers=headers,
        json={
            "items": [
                {
                    "class_name": "1",
                    "image_base64": base64.b64encode(png).decode(),
                    "prediction_id": "p-\u0000",
                }
            ]
        },
    )
    stored_key = await client.post(
        "/v1/projects/nul/labels:batch",
        headers=headers,
        json={"items": [{"class_name": "1", "image_uri": f"s3://{services.bucket}/x\u0000"}]},
    )

    assert project.status_code == 422, project.text
    assert project.json()["error"]["details"]["fields"][0]["field"] == "class_names.1"
    assert created.status_code == 201, created.text
    assert renamed.status_code == 422, renamed.text
    assert multipart.status_code == 422, multipart.text
    assert multipart.json()["error"]["details"]["fields"][0]["field"] == "external_id"
    assert batch.status_code == 422, batch.text
    assert batch.json()["error"]["details"]["fields"][0]["field"] == "items.0.prediction_id"
    assert stored_key.status_code == 200, stored_key.text
    [item] = stored_key.json()["items"]
    assert (item["status"], item["error"]["code"]) == ("rejected", "image_source_refused")


async def test_bff_refuses_nul_in_keys_and_job_fields(services: Services) -> None:
    await services.start("inference-bff")
    client = services.clients["inference-bff"]
    headers = services.bearer("fuzzer", *ROLES)

    s3_key = await client.post("/predict", headers=headers, json={"s3_key": "digits/\u0000.png"})
    snapshot = await client.post(
        "/predict/batch", headers=headers, json={"snapshot_id": "snap-\u0000", "project_id": "x"}
    )
    version = await client.post(
        "/predict/batch",
        headers=headers,
        json={"snapshot_id": "snap-1", "project_id": "x", "model_version": "1\u0000"},
    )

    assert s3_key.status_code == 422, s3_key.text
    assert s3_key.json()["error"]["code"] == "image_source_refused"
    assert snapshot.status_code == 422, snapshot.text
    assert snapshot.json()["error"]["details"]["fields"][0]["field"] == "snapshot_id"
    assert version.status_code == 422, version.text
    assert version.json()["error"]["details"]["fields"][0]["field"] == "model_version"
