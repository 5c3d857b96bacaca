"""FastAPI dependencies of the BFF's API, as ``Annotated`` aliases."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel_inference_bff.errors import UnsupportedContentTypeError
from flywheel_inference_bff.jobs import BatchJobs
from flywheel_inference_bff.service import Predictor
from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.auth import Principal, TokenVerifier, declares_auth
from flywheel_runtime.errors import AuthenticationError, PermissionDeniedError
from flywheel_runtime.http import answers

# Dependencies are coroutines: FastAPI runs plain functions in a worker thread, a thread hop
# per request for what is an attribute lookup.


async def get_predictor(request: Request) -> Predictor:
    """The predict core ``create_app`` put on the app's state."""
    return cast(Predictor, request.app.state.predictor)


async def get_jobs(request: Request) -> BatchJobs:
    return cast(BatchJobs, request.app.state.jobs)


async def get_settings(request: Request) -> BffSettings:
    return cast(BffSettings, request.app.state.settings)


def _verifier(request: Request) -> TokenVerifier:
    return cast(TokenVerifier, request.app.state.token_verifier)


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
JobsDep = Annotated[BatchJobs, Depends(get_jobs)]
SettingsDep = Annotated[BffSettings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def _with_predict_role(
    request: Request, credentials: Bearer, settings: BffSettings
) -> Principal:
    if credentials is None:
        if request.headers.get("Authorization"):
            raise AuthenticationError(
                "Authorization header must be 'Bearer <token>'",
                details={"reason": "invalid_scheme"},
            )
        raise AuthenticationError("missing bearer token", details={"reason": "missing_token"})
    principal = await _verifier(request).verify(credentials.credentials)
    if settings.predict_role not in principal.roles:
        raise PermissionDeniedError(
            f"missing required role '{settings.predict_role}'",
            details={"missing_roles": [settings.predict_role]},
        )
    return principal


def _predict_roles(state: Any) -> tuple[str]:
    return (cast(BffSettings, state.settings).predict_role,)


@declares_auth(roles_from=_predict_roles)
async def require_predict_role(
    request: Request, credentials: Bearer, settings: SettingsDep
) -> Principal:
    """The caller, if their bearer token holds the predict role (401 / 403 otherwise)."""
    return await _with_predict_role(request, credentials, settings)


@declares_auth(roles_from=_predict_roles, schemes=("bearer", "basic"))
async def require_label_studio(request: Request, settings: SettingsDep) -> Principal:
    """Label Studio with its basic-auth credentials, or any caller with the predict role.

    Label Studio's ML backend connection can only send HTTP basic auth, so that is checked
    against ``label_studio_username``/``label_studio_password`` (an empty password disables it).
    """
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        credentials = await _bearer(request)
        return await _with_predict_role(request, credentials, settings)
    expected = settings.label_studio_password.get_secret_value()
    if not expected:
        raise AuthenticationError(
            "basic auth is disabled: set FLYWHEEL_BFF_LABEL_STUDIO_PASSWORD",
            details={"reason": "basic_auth_disabled"},
        )
    try:
        username, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as error:
        raise AuthenticationError(
            "malformed basic credentials", details={"reason": "malformed"}
        ) from error
    user_ok = hmac.compare_digest(username.encode(), settings.label_studio_username.encode())
    password_ok = hmac.compare_digest(password.encode(), expected.encode())
    if not (user_ok and password_ok):
        raise AuthenticationError("wrong basic credentials", details={"reason": "bad_credentials"})
    return Principal(subject=username, username=username, roles=frozenset({"label-studio"}))


Predicter = Annotated[Principal, Depends(require_predict_role)]
"""A caller allowed to predict."""
LabelStudio = Annotated[Principal, Depends(require_label_studio)]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@answers(415)
async def require_json(request: Request) -> None:
    """415 unless the body is JSON."""
    if media_type(request) != "application/json":
        raise UnsupportedContentTypeError(
            "send application/json",
            field="content-type",
            details={"received": media_type(request) or None},
        )
