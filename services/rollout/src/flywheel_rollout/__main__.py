"""``python -m flywheel_rollout``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_rollout.settings import RolloutSettings
from flywheel_runtime.app import serve


def main() -> None:
    serve("flywheel_rollout.main:create_app", RolloutSettings())


if __name__ == "__main__":
    main()
