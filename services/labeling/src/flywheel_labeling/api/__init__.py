"""The labeling HTTP API: projects, labels, snapshots, the needs-label queue and the Label
Studio webhook."""

from flywheel_labeling.api import label_requests, labels, labelstudio, projects, snapshots

routers = [
    projects.router,
    labels.router,
    snapshots.router,
    label_requests.router,
    labelstudio.router,
]

__all__ = ["routers"]
