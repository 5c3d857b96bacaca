"""The trainer dispatch's operator API: list and inspect runs, read logs, trigger, cancel."""

from flywheel_trainer_dispatch.api.routes import router

__all__ = ["router"]
