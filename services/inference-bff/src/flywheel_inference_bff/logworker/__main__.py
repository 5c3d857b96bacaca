"""``python -m flywheel_inference_bff.logworker``: serve the worker with uvicorn."""

from __future__ import annotations

from flywheel_inference_bff.logworker.settings import LogWorkerSettings
from flywheel_runtime.app import serve


def main() -> None:
    serve("flywheel_inference_bff.logworker.main:create_app", LogWorkerSettings())


if __name__ == "__main__":
    main()
