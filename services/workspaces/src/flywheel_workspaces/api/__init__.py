"""The workspaces' HTTP API: an engineer's environments, and the operator's views and report."""

from flywheel_workspaces.api.routes import environments, operator

routers = [environments, operator]

__all__ = ["routers"]
