"""``python -m flywheel_data_monitor``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_runtime.app import serve


def main() -> None:
    serve("flywheel_data_monitor.main:create_app", DataMonitorSettings())


if __name__ == "__main__":
    main()
