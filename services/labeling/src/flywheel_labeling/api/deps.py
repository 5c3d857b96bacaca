"""FastAPI dependencies of the labeling API, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated, cast

from fastapi import Depends, Header, Path, Query, Request

from flywheel_contracts.events import SLUG
from flywheel_labeling.errors import (
    UnsupportedContentTypeError,
    WebhookDisabledError,
    WebhookSecretError,
)
from flywheel_labeling.service import LabelingService, LabelRequestQueue, ProjectService
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import (
    CurrentPrincipal,
    Principal,
    declares_auth,
    require_roles,
)
from flywheel_runtime.http import answers

WEBHOOK_SECRET_HEADER = "X-Flywheel-Webhook-Secret"  # noqa: S105 - a header name


# Dependencies are coroutines: FastAPI runs plain functions in a worker thread, a thread hop
# per request for what is an attribute lookup.


async def get_projects(request: Request) -> ProjectService:
    """The project use cases ``create_app`` put on the app's state."""
    return cast(ProjectService, request.app.state.projects)


async def get_labeling(request: Request) -> LabelingService:
    """The label use cases ``create_app`` put on the app's state."""
    return cast(LabelingService, request.app.state.labeling)


async def get_label_requests(request: Request) -> LabelRequestQueue:
    """The needs-label queue ``create_app`` put on the app's state."""
    return cast(LabelRequestQueue, request.app.state.label_requests)


async def get_settings(request: Request) -> LabelingSettings:
    return cast(LabelingSettings, request.app.state.settings)


ProjectsDep = Annotated[ProjectService, Depends(get_projects)]
LabelingDep = Annotated[LabelingService, Depends(get_labeling)]
LabelRequestsDep = Annotated[LabelRequestQueue, Depends(get_label_requests)]
SettingsDep = Annotated[LabelingSettings, Depends(get_settings)]

Reader = CurrentPrincipal
"""Any authenticated caller may read."""
Admin = Annotated[Principal, Depends(require_roles("admin"))]
Labeler = Annotated[Principal, Depends(require_roles("labeler"))]

ProjectId = Annotated[str, Path(pattern=SLUG, description="Project id (slug).")]
Cursor = Annotated[str | None, Query(max_length=200, description="Opaque cursor of the next page.")]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
ImageSha256 = Annotated[
    str, Path(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the image's bytes (hex).")
]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@answers(415)
async def require_multipart(request: Request) -> None:
    """415 unless the body is ``multipart/form-data`` (checked before the body is parsed)."""
    if _media_type(request) != "multipart/form-data":
        raise UnsupportedContentTypeError(
            "send the image as multipart/form-data (field 'image')",
            field="content-type",
            details={"received": _media_type(request) or None},
        )


@answers(415)
async def require_json(request: Request) -> None:
    """415 unless the body is JSON."""
    if _media_type(request) != "application/json":
        raise UnsupportedContentTypeError(
            "send application/json",
            field="content-type",
            details={"received": _media_type(request) or None},
        )


@answers(403)  # the webhook is disabled: no secret is configured
@declares_auth(schemes=("webhook_secret",))
async def check_webhook_secret(
    settings: SettingsDep,
    secret: Annotated[str | None, Header(alias=WEBHOOK_SECRET_HEADER)] = None,
) -> None:
    """401 unless the request carries the shared Label Studio secret."""
    expected = settings.webhook_secret.get_secret_value()
    if not expected:
        raise WebhookDisabledError(
            "the Label Studio webhook is disabled: set FLYWHEEL_LABELING_WEBHOOK_SECRET"
        )
    if secret is None:
        raise WebhookSecretError(
            f"missing {WEBHOOK_SECRET_HEADER} header", details={"reason": "missing_secret"}
        )
    if not hmac.compare_digest(secret.encode(), expected.encode()):
        raise WebhookSecretError(
            f"wrong {WEBHOOK_SECRET_HEADER}", details={"reason": "wrong_secret"}
        )
