"""``python -m flywheel_data_monitor``: serve the app with uvicorn."""

from __future__ import annotations

import uvicorn

from flywheel_data_monitor.main import create_app
from flywheel_data_monitor.settings import DataMonitorSettings


def main() -> None:
    settings = DataMonitorSettings()
    # log_config=None: the runtime already routes uvicorn's loggers through structlog.
    uvicorn.run(
        create_app(settings), host=settings.http_host, port=settings.http_port, log_config=None
    )


if __name__ == "__main__":
    main()
