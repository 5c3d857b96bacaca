"""``python -m flywheel_validator``: serve the app with uvicorn."""

from __future__ import annotations

import uvicorn

from flywheel_validator.main import create_app
from flywheel_validator.settings import ValidatorSettings


def main() -> None:
    settings = ValidatorSettings()
    # log_config=None: the runtime already routes uvicorn's loggers through structlog.
    uvicorn.run(
        create_app(settings), host=settings.http_host, port=settings.http_port, log_config=None
    )


if __name__ == "__main__":
    main()
