import base64
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from flywheel_contracts import LabelsRequestedV1
from flywheel_contracts.datasets import image_key
from flywheel_labeling.api import routers
from flywheel_labeling.main import attach
from flywheel_labeling.service import (
    LabelingService,
    LabelRequestQueue,
    Limits,
    ProjectService,
)
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import (
    AuthSettings,
    CachingTokenVerifier,
    generate_dev_key,
    issue_dev_token,
)
from flywheel_runtime.http import install_error_handlers

from ..conftest import digit_image
from ..fakes import FakeFetcher, FakeImages, FakeSnapshots, FakeStore
from ..labelstudio_payloads import annotation, created, task

KEY = generate_dev_key("EC")
SECRET = "s3cret"
DIGITS = [str(d) for d in range(10)]


def _bearer(username: str, *roles: str) -> dict[str, str]:
    token = issue_dev_token(KEY, subject=username, username=username, roles=roles)
    return {"Authorization": f"Bearer {token}"}


LABELER = _bearer("alice", "labeler")
ADMIN = _bearer("root", "admin")


class Api:
    def __init__(
        self,
        client: httpx.AsyncClient,
        store: FakeStore,
        images: FakeImages,
        queue: LabelRequestQueue,
    ) -> None:
        self.client = client
        self.store = store
        self.images = images
        self.queue = queue

    async def label(
        self,
        data: bytes,
        class_name: str | None = "7",
        *,
        content_type: str = "image/png",
        project: str = "digits",
        headers: dict[str, str] = LABELER,
        **fields: str,
    ) -> httpx.Response:
        form = fields | ({} if class_name is None else {"class_name": class_name})
        return await self.client.post(
            f"/v1/projects/{project}/labels",
            data=form,
            files={"image": ("digit.png", data, content_type)},
            headers=headers,
        )

    async def batch(self, items: list[dict[str, Any]]) -> httpx.Response:
        return await self.client.post(
            "/v1/projects/digits/labels:batch", json={"items": items}, headers=LABELER
        )

    def stored_nothing(self) -> bool:
        return not self.store.state.labels and not self.images.objects


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    settings = LabelingSettings(
        auth=AuthSettings(dev_signing_key=SecretStr(KEY)),
        webhook_secret=SecretStr(SECRET),
        max_image_bytes=20_000,
        max_image_pixels=250_000,
        max_batch_items=3,
        max_request_bytes=1_000_000,
    )
    store, images = FakeStore(), FakeImages()
    queue = LabelRequestQueue(store, images)
    labeling = LabelingService(
        store,
        images,
        FakeFetcher(),
        FakeSnapshots(),
        Limits(max_image_bytes=settings.max_image_bytes, max_image_pixels=250_000),
        group_linger_s=0,
    )
    app = FastAPI()
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    attach(
        app,
        settings,
        ProjectService(store),
        labeling,
        CachingTokenVerifier(settings.auth),
        queue,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://labeling.test") as client:
        created_project = await client.post(
            "/v1/projects",
            json={"project_id": "digits", "name": "Digits", "class_names": DIGITS},
            headers=ADMIN,
        )
        assert created_project.status_code == 201, created_project.text
        yield Api(client, store, images, queue)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def _fields(error: dict[str, Any]) -> list[str]:
    details = error["details"]
    return [f["field"] for f in details.get("fields", [])] or [details.get("field")]


# --- projects -----------------------------------------------------------------------------------


async def test_projects_are_created_by_admins_and_read_by_anyone_signed_in(api: Api) -> None:
    listed = await api.client.get("/v1/projects", headers=LABELER)
    one = await api.client.get("/v1/projects/digits", headers=LABELER)
    refused = await api.client.post(
        "/v1/projects",
        json={"project_id": "letters", "name": "L", "class_names": ["a"]},
        headers=LABELER,
    )

    assert [p["project_id"] for p in listed.json()] == ["digits"]
    assert one.json()["model_line"] == "digits-classifier"
    assert _error(refused, 403)["details"] == {"missing_roles": ["admin"]}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"project_id": "digits", "name": "again", "class_names": ["a"]}, 409, None),
        ({"project_id": "Bad Id", "name": "x", "class_names": ["a"]}, 422, "project_id"),
        ({"project_id": "empty", "name": "x", "class_names": []}, 422, "class_names"),
        ({"project_id": "dupes", "name": "x", "class_names": ["a", "a"]}, 422, "class_names"),
        (
            {"project_id": "boxes", "name": "x", "class_names": ["car"], "task_type": "detection"},
            422,
            "task_type",
        ),
    ],
)
async def test_a_bad_project_is_refused_naming_the_field(
    api: Api, body: dict[str, Any], status: int, field: str | None
) -> None:
    response = await api.client.post("/v1/projects", json=body, headers=ADMIN)

    error = _error(response, status)
    if field is not None:
        assert field in _fields(error)


async def test_an_update_adds_classes_but_never_removes_one(api: Api) -> None:
    added = await api.client.put(
        "/v1/projects/digits", json={"class_names": [*DIGITS, "x"]}, headers=ADMIN
    )
    removed = await api.client.put(
        "/v1/projects/digits", json={"class_names": ["0"]}, headers=ADMIN
    )

    assert added.json()["revision"] == 2
    assert added.json()["class_names"][-1] == "x"
    assert _fields(_error(removed, 422)) == ["class_names"]


# --- the multipart label ------------------------------------------------------------------------


async def test_a_label_is_created_then_unchanged_when_posted_again(api: Api) -> None:
    first = await api.label(digit_image(1))
    again = await api.label(digit_image(1))

    assert first.status_code == 201, first.text
    assert first.json()["status"] == "created"
    assert first.json()["snapshot_sequence"] == 1
    assert again.status_code == 200
    assert again.json()["status"] == "unchanged"
    assert again.json()["snapshot_id"] is None


@pytest.mark.parametrize(
    ("headers", "status"), [({}, 401), (_bearer("bob", "viewer"), 403), (ADMIN, 403)]
)
async def test_labels_need_the_labeler_role(api: Api, headers: dict[str, str], status: int) -> None:
    _error(await api.label(digit_image(1), headers=headers), status)

    assert api.stored_nothing()


async def test_bad_inputs_are_refused_naming_the_problem_and_store_nothing(api: Api) -> None:
    image = digit_image(1)
    medium = digit_image(2, size=(120, 120))
    big = digit_image(2, size=(300, 300))
    wide = digit_image(3, size=(600, 500), fmt="JPEG")

    cases = [
        (await api.label(image, "cat"), 422, "unknown_class", "class_name"),
        (await api.label(image, None), 422, "invalid_input", "class_name"),
        (await api.label(b"just text", "7"), 422, "invalid_image", "image"),
        (await api.label(medium[: len(medium) // 2], "7"), 422, "invalid_image", "image"),
        (await api.label(big, "7"), 413, "image_too_large", "image"),
        (await api.label(wide, "7"), 413, "image_too_large", "image"),
        (await api.label(image, content_type="text/plain"), 415, "unsupported_media_type", "image"),
        (await api.label(image, project="nope"), 404, "project_not_found", None),
        (await api.label(image, source="pseudo"), 422, "invalid_input", "model_version"),
        (await api.label(image, confidence="1.5"), 422, "invalid_input", "confidence"),
    ]

    for response, status, code, field in cases:
        error = _error(response, status)
        assert error["code"] == code, response.text
        if field is not None:
            assert field in _fields(error), response.text
    assert api.stored_nothing()


async def test_a_label_without_a_multipart_body_is_415(api: Api) -> None:
    response = await api.client.post(
        "/v1/projects/digits/labels", json={"class_name": "7"}, headers=LABELER
    )

    assert _error(response, 415)["details"]["field"] == "content-type"


async def test_a_missing_image_is_named(api: Api) -> None:
    response = await api.client.post(
        "/v1/projects/digits/labels",
        data={"class_name": "7"},
        files={"other": ("x.txt", b"x", "text/plain")},
        headers=LABELER,
    )

    assert _fields(_error(response, 422)) == ["image"]


async def test_an_unreachable_database_is_503_with_retry_after(api: Api) -> None:
    api.store.down = True

    response = await api.client.get("/v1/projects/digits", headers=LABELER)

    assert _error(response, 503)["code"] == "dependency_unavailable"
    assert response.headers["retry-after"] == "5"


async def test_unreachable_storage_is_503_and_commits_nothing(api: Api) -> None:
    api.images.down = True

    response = await api.label(digit_image(1))

    _error(response, 503)
    assert not api.store.state.labels


# --- the batch ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_a_batch_saves_the_valid_items_and_names_the_rejected_ones(api: Api) -> None:
    response = await api.batch(
        [
            {"image_base64": _b64(digit_image(1)), "class_name": "7"},
            {"image_base64": _b64(digit_image(2)), "class_name": "cat"},
            {"image_uri": "s3://flywheel-data/uploads/none.png", "class_name": "1"},
        ]
    )

    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["status"] for i in items] == ["created", "rejected", "rejected"]
    assert items[1]["error"]["field"] == "items.1.class_name"
    assert items[1]["error"]["code"] == "unknown_class"
    assert items[2]["error"]["field"] == "items.2.image_uri"
    assert len(api.store.state.labels) == 1


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([{"image_base64": "not base64!", "class_name": "7"}], "items.0.image_base64"),
        ([{"class_name": "7"}], "items.0"),
        (
            [{"image_base64": _b64(b"x"), "image_uri": "s3://flywheel-data/k", "class_name": "7"}],
            "items.0",
        ),
        ([{"image_base64": _b64(b"x")}], "items.0.class_name"),
        ([{"image_uri": "http://example.com/x.png", "class_name": "7"}], "items.0.image_uri"),
        ([{"image_base64": _b64(b"x"), "class_name": "7"}] * 4, "items"),
        ([], "items"),
    ],
)
async def test_a_malformed_batch_is_422_naming_the_field(
    api: Api, items: list[dict[str, Any]], field: str
) -> None:
    error = _error(await api.batch(items), 422)

    assert field in _fields(error)
    assert api.stored_nothing()


async def test_a_batch_must_be_json(api: Api) -> None:
    response = await api.client.post(
        "/v1/projects/digits/labels:batch", content=b"items=1", headers=LABELER
    )

    _error(response, 415)


# --- reading ------------------------------------------------------------------------------------


async def test_labels_page_through_with_an_opaque_cursor(api: Api) -> None:
    for i in range(5):
        assert (await api.label(digit_image(i), str(i))).status_code == 201

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = (
            await api.client.get("/v1/projects/digits/labels", params=params, headers=LABELER)
        ).json()
        seen += [label["class_name"] for label in page["items"]]
        cursor = page["next_cursor"]
    bad = await api.client.get(
        "/v1/projects/digits/labels", params={"cursor": "nonsense"}, headers=LABELER
    )

    assert seen == ["0", "1", "2", "3", "4"]
    assert cursor is None
    assert _fields(_error(bad, 422)) == ["cursor"]


async def test_stats_and_snapshots_describe_the_labels(api: Api) -> None:
    await api.label(digit_image(1), "7", prediction_id="p1", predicted_class="1")
    await api.label(digit_image(2), "3")

    stats = (await api.client.get("/v1/projects/digits/stats", headers=LABELER)).json()
    listed = (await api.client.get("/v1/projects/digits/snapshots", headers=LABELER)).json()
    head = listed["items"][0]
    manifest = (
        await api.client.get(
            f"/v1/projects/digits/snapshots/{head['snapshot_id']}", headers=LABELER
        )
    ).json()
    missing = await api.client.get("/v1/projects/digits/snapshots/snap-00", headers=LABELER)

    assert stats["total"] == 2
    assert stats["by_class"] == {"7": 1, "3": 1}
    assert (stats["prefilled"], stats["corrected"]) == (1, 1)
    assert stats["by_labeler"] == {"alice": 2}
    assert stats["head_snapshot_id"] == head["snapshot_id"]
    assert [s["sequence"] for s in listed["items"]] == [2, 1]
    assert manifest["class_counts"] == {"3": 1, "7": 1}
    assert sum(manifest["split_counts"].values()) == 2
    assert len(manifest["entries"]) == 2
    assert _error(missing, 404)["code"] == "snapshot_not_found"


# --- Label Studio -------------------------------------------------------------------------------


async def _webhook(api: Api, body: Any, secret: str | None = SECRET) -> httpx.Response:
    headers = {} if secret is None else {"X-Flywheel-Webhook-Secret": secret}
    return await api.client.post(
        "/v1/projects/digits/integrations/label-studio/webhook", json=body, headers=headers
    )


@pytest.mark.parametrize(("secret", "reason"), [(None, "missing_secret"), ("nope", "wrong_secret")])
async def test_a_webhook_without_the_shared_secret_is_401(
    api: Api, secret: str | None, reason: str
) -> None:
    response = await _webhook(api, {"action": "PROJECT_UPDATED"}, secret)

    assert _error(response, 401)["details"]["reason"] == reason


async def test_other_actions_are_acknowledged(api: Api) -> None:
    response = await _webhook(api, {"action": "PROJECT_UPDATED", "project": {"id": 1}})

    assert response.status_code == 200
    assert response.json()["handled"] is False


async def test_a_webhook_body_must_be_a_json_object(api: Api) -> None:
    response = await api.client.post(
        "/v1/projects/digits/integrations/label-studio/webhook",
        content=b"[1, 2",
        headers={"X-Flywheel-Webhook-Secret": SECRET, "Content-Type": "application/json"},
    )

    assert _fields(_error(response, 422)) == ["body"]


async def test_an_annotation_with_an_unknown_class_is_422(api: Api) -> None:
    api.images.objects["uploads/1.png"] = digit_image(1)
    body = created(annotation(17, 5, ["cat"]), task(5, "s3://flywheel-data/uploads/1.png"))

    error = _error(await _webhook(api, body), 422)

    assert error["code"] == "unknown_class"
    assert error["details"]["field"] == "annotation.result"
    assert not api.store.state.labels


async def test_an_image_reference_we_do_not_follow_is_422(api: Api) -> None:
    body = created(annotation(17, 5, ["7"]), task(5, "/data/upload/3/digit.png"))

    error = _error(await _webhook(api, body), 422)

    assert error["code"] == "image_source_refused"
    assert error["details"]["field"] == "task.data.image"


async def test_unknown_routes_and_oversized_bodies_are_refused(api: Api) -> None:
    unknown = await api.client.get("/v1/nothing-here", headers=LABELER)
    oversized = await api.client.post(
        "/v1/projects/digits/labels:batch",
        content=b"{" + b" " * 2_000_000 + b"}",
        headers=LABELER | {"Content-Type": "application/json"},
    )

    assert _error(unknown, 404)["code"] == "not_found"
    assert oversized.status_code == 413


# --- the needs-label queue ----------------------------------------------------------------------


def _labels_requested(*images: tuple[bytes, float]) -> LabelsRequestedV1:
    return LabelsRequestedV1.model_validate(
        {
            "payload": {
                "project_id": "digits",
                "model_line": "digits-classifier",
                "request_id": uuid.uuid4(),
                "reason": "drift",
                "items": [
                    {
                        "input_sha256": hashlib.sha256(data).hexdigest(),
                        "image_key": image_key(hashlib.sha256(data).hexdigest()),
                        "score": score,
                        "predicted_class": "8",
                        "confidence": 0.4,
                    }
                    for data, score in images
                ],
            }
        }
    )


async def _request_labels(api: Api, *images: tuple[bytes, float]) -> list[str]:
    """Serving stored the images; data-monitor asked for their labels. Their sha256s."""
    for data, _ in images:
        api.images.objects[image_key(hashlib.sha256(data).hexdigest())] = data
    await api.queue.labels_requested(_labels_requested(*images))
    return [hashlib.sha256(data).hexdigest() for data, _ in images]


QUEUE = "/v1/projects/digits/label-requests"


async def test_the_queue_lists_requested_images_by_score_with_their_image(api: Api) -> None:
    low, high = await _request_labels(api, (digit_image(1), 0.2), (digit_image(2), 0.9))

    response = await api.client.get(QUEUE, headers=LABELER)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    image = await api.client.get(items[0]["image_url"], headers=LABELER)

    assert [i["input_sha256"] for i in items] == [high, low]
    assert items[0]["status"] == "open"
    assert items[0]["image_uri"] == f"s3://flywheel-data/{image_key(high)}"
    assert (items[0]["predicted_class"], items[0]["confidence"]) == ("8", 0.4)
    assert response.json()["next_cursor"] is None
    assert image.status_code == 200
    assert image.content == digit_image(2)
    assert image.headers["content-type"] == "image/png"
    assert image.headers["etag"] == f'"{high}"'


async def test_the_queue_pages_with_a_cursor(api: Api) -> None:
    shas = await _request_labels(api, *((digit_image(n), n / 10) for n in range(5)))

    first = (await api.client.get(QUEUE, params={"limit": 3}, headers=LABELER)).json()
    second = (
        await api.client.get(
            QUEUE, params={"limit": 3, "cursor": first["next_cursor"]}, headers=LABELER
        )
    ).json()

    listed = [i["input_sha256"] for i in first["items"] + second["items"]]
    assert listed == list(reversed(shas))
    assert second["next_cursor"] is None


async def test_a_label_of_the_same_image_moves_it_to_the_labeled_list(api: Api) -> None:
    wanted, _ = await _request_labels(api, (digit_image(1), 0.9), (digit_image(2), 0.1))

    saved = await api.batch(
        [{"image_uri": f"s3://flywheel-data/{image_key(wanted)}", "class_name": "3"}]
    )
    labeled = await api.client.get(QUEUE, params={"status": "labeled"}, headers=LABELER)

    assert saved.status_code == 200, saved.text
    [item] = saved.json()["items"]
    [entry] = labeled.json()["items"]
    assert entry["input_sha256"] == wanted == item["image_sha256"]
    assert entry["labeled_label_id"] == item["label_id"]
    open_queue = (await api.client.get(QUEUE, headers=LABELER)).json()["items"]
    assert wanted not in [i["input_sha256"] for i in open_queue]


async def test_a_labeler_dismisses_a_request_and_an_answered_one_is_409(api: Api) -> None:
    dismissed, answered = await _request_labels(api, (digit_image(1), 0.9), (digit_image(2), 0.5))
    await api.label(digit_image(2), "2")

    response = await api.client.post(f"{QUEUE}/{dismissed}:dismiss", headers=LABELER)
    again = await api.client.post(f"{QUEUE}/{dismissed}:dismiss", headers=LABELER)
    closed = await api.client.post(f"{QUEUE}/{answered}:dismiss", headers=LABELER)
    unknown = await api.client.post(f"{QUEUE}/{'0' * 64}:dismiss", headers=LABELER)
    reader = await api.client.post(f"{QUEUE}/{dismissed}:dismiss", headers=_bearer("eve"))

    assert response.status_code == 200, response.text
    assert response.json()["status"] == again.json()["status"] == "dismissed"
    assert _error(closed, 409)["code"] == "label_request_closed"
    assert _error(unknown, 404)["code"] == "label_request_not_found"
    assert _error(reader, 403)["code"] == "forbidden"
    assert (await api.client.get(QUEUE, headers=LABELER)).json()["items"] == []


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        (QUEUE, {"status": "closed"}, "status"),
        (QUEUE, {"limit": 0}, "limit"),
        (QUEUE, {"cursor": "bogus"}, "cursor"),
        (f"{QUEUE}/not-a-sha/image", {}, "input_sha256"),
        ("/v1/projects/Not_A_Slug/label-requests", {}, "project"),
    ],
)
async def test_bad_queue_input_is_422_naming_the_field(
    api: Api, path: str, params: dict[str, Any], field: str
) -> None:
    response = await api.client.get(path, params=params, headers=LABELER)

    assert _fields(_error(response, 422)) == [field]


async def test_the_queue_of_an_unknown_project_or_image_is_404(api: Api) -> None:
    unknown_project = await api.client.get("/v1/projects/nope/label-requests", headers=LABELER)
    unknown_image = await api.client.get(f"{QUEUE}/{'0' * 64}/image", headers=LABELER)
    [gone] = await _request_labels(api, (digit_image(1), 0.9))
    api.images.objects.clear()
    missing = await api.client.get(f"{QUEUE}/{gone}/image", headers=LABELER)
    anonymous = await api.client.get(QUEUE)

    assert _error(unknown_project, 404)["code"] == "project_not_found"
    assert _error(unknown_image, 404)["code"] == "label_request_not_found"
    assert _error(missing, 404)["code"] == "image_not_found"
    assert anonymous.status_code == 401
