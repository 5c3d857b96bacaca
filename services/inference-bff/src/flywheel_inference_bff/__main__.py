"""``python -m flywheel_inference_bff``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.app import serve


def main() -> None:
    serve("flywheel_inference_bff.main:create_service_app", BffSettings())


if __name__ == "__main__":
    main()
