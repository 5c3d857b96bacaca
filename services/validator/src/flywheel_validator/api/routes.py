"""Read-only routes: thin fronts on ``Validator``; an unknown validation answers 404."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from flywheel_validator.api.deps import Limit, ModelLine, ValidationId, ValidatorDep, get_reader
from flywheel_validator.api.schemas import ValidationsOut
from flywheel_validator.ports import Validation

router = APIRouter(
    prefix="/v1/validations", tags=["validations"], dependencies=[Depends(get_reader)]
)


@router.get("")
async def list_validations(
    validator: ValidatorDep, model_line: ModelLine = None, limit: Limit = 50
) -> ValidationsOut:
    """Validations, newest first, each with its verdict, metrics, reasons and gates."""
    return ValidationsOut(validations=list(await validator.validations(model_line, limit)))


@router.get("/{validation_id}")
async def get_validation(validation_id: ValidationId, validator: ValidatorDep) -> Validation:
    """One validation by id."""
    return await validator.validation(validation_id)
