import base64
from typing import Any

import httpx
import pytest

from .conftest import Service

pytestmark = pytest.mark.integration


def _field(response: httpx.Response) -> str | None:
    details: dict[str, Any] = response.json()["error"]["details"]
    if "fields" in details:
        return str(details["fields"][0]["field"])
    return details.get("field")


async def test_every_bad_input_is_a_4xx_naming_the_problem_and_stores_nothing(
    start_service: Any, image
) -> None:
    async with start_service(max_image_bytes=50_000, max_image_pixels=100_000) as service:
        project = await service.create_project()
        good = image(1)
        big = image(2, size=(400, 400))
        wide = image(3, size=(500, 400), fmt="JPEG")
        truncated = image(4, size=(100, 100))
        rows, objects = await service.rows("labels"), await service.objects()

        async def batch(items: list[dict[str, Any]]) -> httpx.Response:
            return await service.client.post(
                f"/v1/projects/{project}/labels:batch",
                json={"items": items},
                headers=service.headers,
            )

        cases = {
            "not an image": (await service.post_label(project, b"GIF89a? no", "7"), 422, "image"),
            "truncated": (
                await service.post_label(project, truncated[: len(truncated) // 2], "7"),
                422,
                "image",
            ),
            "too many bytes": (await service.post_label(project, big, "7"), 413, "image"),
            "too many pixels": (await service.post_label(project, wide, "7"), 413, "image"),
            "unknown class": (await service.post_label(project, good, "cat"), 422, "class_name"),
            "missing class": (await service.post_label(project, good, None), 422, "class_name"),
            "wrong content type": (
                await service.post_label(project, good, "7", content_type="application/pdf"),
                415,
                "image",
            ),
            "json to multipart": (
                await service.client.post(
                    f"/v1/projects/{project}/labels",
                    json={"class_name": "7"},
                    headers=service.headers,
                ),
                415,
                "content-type",
            ),
            "unknown project": (await service.post_label("no-such-project", good, "7"), 404, None),
            "bad base64": (
                await batch([{"image_base64": "%%%", "class_name": "7"}]),
                422,
                "items.0.image_base64",
            ),
        }

        for name, (response, status, field) in cases.items():
            assert response.status_code == status, f"{name}: {response.text}"
            assert _field(response) == field, f"{name}: {response.text}"
        assert await service.rows("labels") == rows
        assert await service.rows("outbox WHERE event_type = 'labels.saved'") == 0
        assert await service.objects() == objects


async def test_a_rejected_batch_item_stores_nothing_of_its_own(service: Service, image) -> None:
    project = await service.create_project()

    response = await service.client.post(
        f"/v1/projects/{project}/labels:batch",
        json={
            "items": [
                {"image_base64": base64.b64encode(image(1)).decode(), "class_name": "cat"},
                {"image_base64": base64.b64encode(b"text").decode(), "class_name": "7"},
                {"image_base64": base64.b64encode(image(2)).decode(), "class_name": "2"},
            ]
        },
        headers=service.headers,
    )

    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["status"] for i in items] == ["rejected", "rejected", "created"]
    assert [i["error"]["field"] for i in items[:2]] == [
        "items.0.class_name",
        "items.1.image_base64",
    ]
    assert await service.rows("labels", project) == 1
    assert len(await service.objects("images/")) == 1
