"""Response bodies of the read API."""

from __future__ import annotations

from pydantic import BaseModel

from flywheel_validator.ports import Validation


class ValidationsOut(BaseModel):
    validations: list[Validation]
