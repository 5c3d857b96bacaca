"""Labels from the native API: one multipart image, or a JSON batch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile, status

from flywheel_labeling.api.deps import (
    Cursor,
    Labeler,
    LabelingDep,
    Limit,
    ProjectId,
    Reader,
    SettingsDep,
    require_json,
    require_multipart,
)
from flywheel_labeling.api.schemas import (
    BatchIn,
    LabelForm,
    LabelOut,
    LabelPage,
    LabelSavedOut,
    SavedOut,
    StatsOut,
)
from flywheel_labeling.errors import FieldError, ImageTooLargeError, UnsupportedContentTypeError
from flywheel_labeling.service import LabelRequest

router = APIRouter(prefix="/v1/projects/{project}", tags=["labels"])

_IMAGE_TYPES = ("image/", "application/octet-stream")


@router.post(
    "/labels",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_multipart)],
    responses={200: {"description": "The image had a label already: updated or unchanged."}},
)
async def post_label(
    project: ProjectId,
    form: Annotated[LabelForm, Form()],
    image: Annotated[UploadFile, File(description="The image (PNG, JPEG, WebP, GIF, BMP, TIFF).")],
    labeling: LabelingDep,
    settings: SettingsDep,
    principal: Labeler,
    response: Response,
) -> LabelSavedOut:
    """Save one label; emits labels.saved (with its snapshot) unless nothing changed."""
    declared = (image.content_type or "application/octet-stream").lower()
    if not declared.startswith(_IMAGE_TYPES):
        raise UnsupportedContentTypeError(
            f"the image part is {declared}; send an image", field="image"
        )
    data = await image.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"image is more than the limit of {settings.max_image_bytes} bytes",
            field="image",
            details={"limit_bytes": settings.max_image_bytes},
        )
    request = LabelRequest(
        index=0,
        fields=form,
        image=data,
        image_field="image",
        class_field="class_name",
        labeler=principal.username,
    )
    result = await labeling.save(project, [request])
    item = result.items[0]
    if item.error is not None:
        raise item.error
    if item.status != "created":
        response.status_code = status.HTTP_200_OK
    return LabelSavedOut(
        **SavedOut.of(result).items[0].model_dump(),
        snapshot_id=result.snapshot_id,
        snapshot_sequence=result.snapshot_sequence,
        batch_id=result.batch_id,
    )


@router.post("/labels:batch", dependencies=[Depends(require_json)])
async def post_labels(
    project: ProjectId,
    batch: BatchIn,
    labeling: LabelingDep,
    settings: SettingsDep,
    principal: Labeler,
) -> SavedOut:
    """Save many labels; valid items are stored even when others are rejected."""
    if len(batch.items) > settings.max_batch_items:
        raise FieldError(
            f"a batch holds at most {settings.max_batch_items} items, not {len(batch.items)}",
            field="items",
        )
    requests = [
        LabelRequest(
            index=index,
            fields=item.fields(),
            image=item.image_base64 if item.image_base64 is not None else item.image_uri or "",
            image_field=f"items.{index}."
            + ("image_base64" if item.image_base64 is not None else "image_uri"),
            class_field=f"items.{index}.class_name",
            labeler=principal.username,
        )
        for index, item in enumerate(batch.items)
    ]
    return SavedOut.of(await labeling.save(project, requests))


@router.get("/labels")
async def list_labels(
    project: ProjectId,
    labeling: LabelingDep,
    _: Reader,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> LabelPage:
    """Live labels in a stable order; follow ``next_cursor`` for the next page."""
    labels, next_cursor = await labeling.labels(project, cursor, limit)
    return LabelPage(items=[LabelOut.of(label) for label in labels], next_cursor=next_cursor)


@router.get("/stats")
async def stats(project: ProjectId, labeling: LabelingDep, _: Reader) -> StatsOut:
    """Live labels counted by class, split, source and labeler; corrections; head snapshot."""
    return StatsOut.of(await labeling.stats(project))
