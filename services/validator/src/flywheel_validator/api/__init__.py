"""The validator's small read API: validations by model line, and one by id."""

from flywheel_validator.api.routes import router

__all__ = ["router"]
