"""The needs-label queue: images labels.requested asks labelers to label, the most drifted
first.

A labeling tool lists the open entries, shows each image (``image_url``, or ``image_uri`` in a
``labels:batch`` item) with its pre-label, and saves the label the usual way: the label of the
same image closes the entry. ``:dismiss`` takes an image off the queue for good.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from flywheel_labeling.api.deps import (
    Cursor,
    ImageSha256,
    Labeler,
    LabelRequestsDep,
    Limit,
    ProjectId,
    Reader,
    SettingsDep,
)
from flywheel_labeling.api.schemas import LabelRequestOut, LabelRequestPage
from flywheel_labeling.ports import RequestStatus
from flywheel_runtime.http import error_responses

router = APIRouter(prefix="/v1/projects/{project}/label-requests", tags=["label-requests"])

StatusFilter = Annotated[
    RequestStatus,
    Query(alias="status", description="Entries of this status (default: the open queue)."),
]

IMMUTABLE = "private, max-age=86400, immutable"
"""An image is named by the hash of its bytes: what the URL returns never changes."""


@router.get("")
async def list_label_requests(
    project: ProjectId,
    queue: LabelRequestsDep,
    settings: SettingsDep,
    _: Reader,
    state: StatusFilter = "open",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> LabelRequestPage:
    """The queue: highest score first, then oldest; follow ``next_cursor`` for the next page."""
    entries, next_cursor = await queue.page(project, state, cursor, limit)
    return LabelRequestPage(
        items=[LabelRequestOut.of(entry, settings.data_bucket) for entry in entries],
        next_cursor=next_cursor,
    )


@router.get(
    "/{input_sha256}/image",
    response_class=Response,
    responses={
        200: {
            "description": "The image's bytes, as serving stored them.",
            "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def label_request_image(
    project: ProjectId, input_sha256: ImageSha256, queue: LabelRequestsDep, _: Reader
) -> Response:
    """The requested image (the open entry's, else the latest entry's)."""
    image = await queue.image(project, input_sha256)
    return Response(
        image.data,
        media_type=image.content_type,
        headers={
            "Cache-Control": IMMUTABLE,
            "ETag": f'"{input_sha256}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.post("/{input_sha256}:dismiss", responses=error_responses(409))
async def dismiss_label_request(
    project: ProjectId,
    input_sha256: ImageSha256,
    queue: LabelRequestsDep,
    settings: SettingsDep,
    principal: Labeler,
) -> LabelRequestOut:
    """Take the image off the queue for good; 409 when a label answered it already."""
    entry = await queue.dismiss(project, input_sha256, by=principal.username)
    return LabelRequestOut.of(entry, settings.data_bucket)
