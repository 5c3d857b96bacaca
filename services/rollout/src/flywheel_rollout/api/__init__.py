"""The rollout's operator API: canaries, their checks, line timelines, and operator actions."""

from flywheel_rollout.api.routes import router

__all__ = ["router"]
