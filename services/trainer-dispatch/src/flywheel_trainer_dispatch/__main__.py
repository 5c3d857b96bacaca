"""``python -m flywheel_trainer_dispatch``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_runtime.app import serve
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings


def main() -> None:
    serve("flywheel_trainer_dispatch.main:create_app", TrainerDispatchSettings())


if __name__ == "__main__":
    main()
