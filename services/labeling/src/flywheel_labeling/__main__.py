"""``python -m flywheel_labeling``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.app import serve


def main() -> None:
    serve("flywheel_labeling.main:create_app", LabelingSettings())


if __name__ == "__main__":
    main()
