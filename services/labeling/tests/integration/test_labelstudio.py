import asyncio
import io
import uuid

import pytest

from ..labelstudio_payloads import annotation, bulk_created, created, deleted, task
from .conftest import SERVED, Service

pytestmark = pytest.mark.integration

LATER = "2026-01-01T11:00:00.000000Z"


def _serve(data: bytes) -> str:
    path = f"/tasks/{uuid.uuid4().hex}.png"
    SERVED[path] = data
    return path


async def _upload(service: Service, data: bytes) -> str:
    key = f"uploads/{uuid.uuid4().hex}.png"
    await asyncio.to_thread(
        service.s3.put_object, service.settings.data_bucket, key, io.BytesIO(data), len(data)
    )
    return f"s3://{service.settings.data_bucket}/{key}"


async def test_created_updated_and_deleted_annotations_follow_label_studio(
    service: Service, image, image_server: str
) -> None:
    project = await service.create_project()
    url = image_server + _serve(image(1))

    made = await service.webhook(project, created(annotation(17, 5, ["7"]), task(5, url)))
    updated = await service.webhook(
        project,
        created(annotation(17, 5, ["1"], updated_at=LATER), task(5, url), "ANNOTATION_UPDATED"),
    )
    removed = await service.webhook(project, deleted(17))

    assert made.status_code == 200, made.text
    assert [r.json()["items"][0]["status"] for r in (made, updated, removed)] == [
        "created",
        "updated",
        "deleted",
    ]
    created_event, updated_event, deleted_event = await service.probe.wait_labels_saved(
        project, count=3
    )
    label_id = uuid.UUID(made.json()["items"][0]["label_id"])
    assert created_event.payload.label_ids == [label_id]
    assert updated_event.payload.label_ids == [label_id]
    assert deleted_event.payload.deleted_label_ids == [label_id]
    assert await service.rows("labels", project) == 0
    before = await service.snapshot(project, updated_event.payload.snapshot_id)
    after = await service.snapshot(project, deleted_event.payload.snapshot_id)
    assert [(e["class_name"], e["labeler"]) for e in before["entries"]] == [("1", "1")]
    assert after["entries"] == []


async def test_redelivered_and_older_annotations_change_nothing(service: Service, image) -> None:
    project = await service.create_project()
    uri = await _upload(service, image(2))
    newer = created(annotation(30, 9, ["4"], updated_at=LATER), task(9, uri), "ANNOTATION_UPDATED")
    assert (await service.webhook(project, newer)).status_code == 200
    await service.probe.wait_labels_saved(project)
    before = len(service.probe.labels_saved(project))

    again = await service.webhook(project, newer)
    older = await service.webhook(project, created(annotation(30, 9, ["5"]), task(9, uri)))
    deleted_twice = [await service.webhook(project, deleted(31)) for _ in range(2)]

    assert again.json()["items"][0]["status"] == "unchanged"
    assert older.json()["items"][0]["status"] == "ignored"
    assert [r.json()["items"][0]["status"] for r in deleted_twice] == ["unchanged"] * 2
    assert await service.rows("labels", project) == 1
    assert len(await service.events_since(project, before, image(98))) == 1


async def test_bulk_annotations_are_one_snapshot_and_cancelled_ones_are_skipped(
    service: Service, image, image_server: str
) -> None:
    project = await service.create_project()
    uri = await _upload(service, image(3))
    url = image_server + _serve(image(4))

    response = await service.webhook(
        project,
        bulk_created(
            [
                (annotation(41, 1, ["3"]), task(1, uri)),
                (annotation(42, 2, ["4"], completed_by=7), task(2, url)),
                (annotation(43, 3, [], was_cancelled=True), task(3, url)),
                (annotation(44, 4, ["cat"]), task(4, uri)),
            ]
        ),
    )

    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["status"] for i in items] == ["created", "created", "ignored", "rejected"]
    assert items[3]["error"]["field"] == "annotation.3.result"
    [event] = await service.probe.wait_labels_saved(project)
    assert len(event.payload.label_ids) == 2
    manifest = await service.snapshot(project, event.payload.snapshot_id)
    assert sorted((e["class_name"], e["labeler"]) for e in manifest["entries"]) == [
        ("3", "1"),
        ("4", "7"),
    ]


async def test_images_from_hosts_not_allowed_or_missing_are_refused(
    service: Service, image, image_server: str
) -> None:
    project = await service.create_project()
    objects = await service.objects()

    elsewhere = await service.webhook(
        project, created(annotation(50, 1, ["1"]), task(1, "http://localhost:1/x.png"))
    )
    redirected = await service.webhook(
        project, created(annotation(51, 1, ["1"]), task(1, image_server + "/elsewhere/x"))
    )
    missing = await service.webhook(
        project, created(annotation(52, 1, ["1"]), task(1, image_server + "/tasks/none.png"))
    )
    other_bucket = await service.webhook(
        project, created(annotation(53, 1, ["1"]), task(1, "s3://another-bucket/x.png"))
    )
    no_secret = await service.webhook(project, created(annotation(54, 1, ["1"]), None), None)

    assert [r.status_code for r in (elsewhere, redirected, missing, other_bucket)] == [422] * 4
    assert [r.json()["error"]["code"] for r in (elsewhere, redirected, missing, other_bucket)] == [
        "image_source_refused",
        "image_source_refused",
        "image_not_found",
        "image_source_refused",
    ]
    assert no_secret.status_code == 401
    assert await service.rows("labels", project) == 0
    assert await service.objects() == objects
