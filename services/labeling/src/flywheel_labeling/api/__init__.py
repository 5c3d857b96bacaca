"""The labeling HTTP API: projects, labels, snapshots and the Label Studio webhook."""

from flywheel_labeling.api import labels, labelstudio, projects, snapshots

routers = [projects.router, labels.router, snapshots.router, labelstudio.router]

__all__ = ["routers"]
