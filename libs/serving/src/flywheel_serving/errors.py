"""Errors of the serving side, in the platform's hierarchy so services render them uniformly."""

from __future__ import annotations

from flywheel_runtime.errors import DependencyUnavailableError, FlywheelError

__all__ = [
    "ModelLoadError",
    "ModelNotReadyError",
    "TritonError",
    "TritonNotInstalledError",
    "TritonStartError",
]


class TritonError(FlywheelError):
    """Triton answered but refused a control request; the message carries Triton's reason."""

    code = "triton_error"
    http_status = 502


class ModelLoadError(TritonError):
    """Triton could not load a model (bad ONNX, bad config, missing files)."""

    code = "model_load_failed"


class ModelNotReadyError(DependencyUnavailableError):
    """A model (version) did not become ready in time; it may still, so this is retryable."""

    code = "model_not_ready"


class TritonNotInstalledError(FlywheelError):
    """The ``nvidia-pytriton`` wheel, which carries ``tritonserver``, is not installed."""

    code = "triton_not_installed"


class TritonStartError(FlywheelError):
    """``tritonserver`` exited or did not answer in time; the message ends with its log tail."""

    code = "triton_start_failed"
