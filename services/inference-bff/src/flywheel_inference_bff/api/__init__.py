"""The BFF's HTTP API: ``/predict``, ``/predict/batch`` and the Label Studio ML backend."""

from flywheel_inference_bff.api import labelstudio, routes

routers = [routes.router, labelstudio.router]

__all__ = ["routers"]
