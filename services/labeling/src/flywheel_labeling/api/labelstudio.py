"""The Label Studio webhook: annotations become labels, authenticated by a shared secret."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request

from flywheel_labeling.api.deps import LabelingDep, ProjectId, SettingsDep, check_webhook_secret
from flywheel_labeling.api.schemas import SavedOut, WebhookOut
from flywheel_labeling.labelstudio import InvalidWebhookError, parse_webhook

router = APIRouter(prefix="/v1/projects/{project}/integrations/label-studio", tags=["label-studio"])


@router.post("/webhook", dependencies=[Depends(check_webhook_secret)])
async def label_studio_webhook(
    project: ProjectId, request: Request, labeling: LabelingDep, settings: SettingsDep
) -> WebhookOut:
    """Apply ANNOTATION(S)_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_DELETED; ignore the rest."""
    # Read here rather than as a body parameter: the secret is checked before the body is.
    body = await _json_object(request)
    webhook = parse_webhook(body, settings.label_studio_image_field)
    result = await labeling.apply_webhook(project, webhook)
    return WebhookOut(
        action=webhook.action, handled=webhook.handled, **SavedOut.of(result).model_dump()
    )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as error:
        raise InvalidWebhookError("the webhook body is not JSON", field="body") from error
    if not isinstance(body, dict):
        raise InvalidWebhookError("the webhook body is not a JSON object", field="body")
    return body
