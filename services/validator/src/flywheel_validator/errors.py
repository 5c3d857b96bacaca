"""The validator's errors: all ``FlywheelError``s, so one middleware and one handler map them."""

from __future__ import annotations

from flywheel_runtime.errors import NotFoundError, PermanentError


class ModelUnusableError(PermanentError):
    """A model's files do not load or run on onnxruntime: the model fails, the service does not."""

    code = "model_unusable"


class ServingRefusedError(ModelUnusableError):
    """Triton would not load a version for the performance gate; ``details["role"]`` says which."""

    code = "serving_refused"


class ValidationNotFoundError(NotFoundError):
    """No validation with that id."""

    code = "validation_not_found"
