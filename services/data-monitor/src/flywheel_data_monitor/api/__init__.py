"""The data monitor's small read API: project state, decisions, quality and drift reports."""

from flywheel_data_monitor.api.routes import drift_router, router

__all__ = ["drift_router", "router"]
