"""FastAPI dependencies of the read API, as ``Annotated`` aliases."""

from __future__ import annotations

import uuid
from typing import Annotated, cast

from fastapi import Depends, Path, Query, Request

from flywheel_contracts.events import SLUG
from flywheel_runtime.auth import get_reader as get_reader
from flywheel_validator.service import Validator


def get_validator(request: Request) -> Validator:
    """The validator ``create_app`` put on the app's state."""
    return cast(Validator, request.app.state.validator)


ValidatorDep = Annotated[Validator, Depends(get_validator)]


ValidationId = Annotated[uuid.UUID, Path(description="Validation id.")]
ModelLine = Annotated[
    str | None, Query(pattern=SLUG, description="Only this model line's validations.")
]
Limit = Annotated[int, Query(ge=1, le=500, description="Newest first, at most this many.")]
