"""``python -m flywheel_labeling``: serve the app with uvicorn."""

from __future__ import annotations

import uvicorn

from flywheel_labeling.main import create_app
from flywheel_labeling.settings import LabelingSettings


def main() -> None:
    settings = LabelingSettings()
    # log_config=None: the runtime already routes uvicorn's loggers through structlog.
    uvicorn.run(
        create_app(settings), host=settings.http_host, port=settings.http_port, log_config=None
    )


if __name__ == "__main__":
    main()
