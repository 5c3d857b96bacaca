"""``python -m flywheel_workspaces``: serve the app with uvicorn."""

from __future__ import annotations

from flywheel_runtime.app import serve
from flywheel_workspaces.settings import WorkspacesSettings


def main() -> None:
    serve("flywheel_workspaces.main:create_app", WorkspacesSettings())


if __name__ == "__main__":
    main()
