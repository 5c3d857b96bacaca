"""The data monitor's small read API: project state, decisions and quality reports."""

from flywheel_data_monitor.api.routes import router

__all__ = ["router"]
