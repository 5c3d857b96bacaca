"""``python -m flywheel_validator``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_runtime.app import serve
from flywheel_validator.settings import ValidatorSettings


def main() -> None:
    serve("flywheel_validator.main:create_app", ValidatorSettings())


if __name__ == "__main__":
    main()
