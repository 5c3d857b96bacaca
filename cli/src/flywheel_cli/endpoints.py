"""Where the stack's services answer: the state file's URLs, else the configured ports.

A stack ``up`` started is found through its state file; one started some other way (compose,
a developer's own terminals) is assumed on the configured ports.
"""

from __future__ import annotations

from flywheel_cli.settings import CliSettings
from flywheel_cli.state import StackState

LOCALHOST = "127.0.0.1"


def default_urls(settings: CliSettings) -> dict[str, str]:
    ports = settings.ports
    http = {
        "labeling": ports.labeling,
        "data-monitor": ports.data_monitor,
        "trainer-dispatch": ports.trainer_dispatch,
        "validator": ports.validator,
        "inference-bff": ports.inference_bff,
        "rollout": ports.rollout,
        "logworker": ports.logworker,
        "workspaces": ports.workspaces,
        "mlflow": ports.mlflow,
        "triton": ports.triton_http,
    }
    urls = {name: f"http://{LOCALHOST}:{port}" for name, port in http.items()}
    urls["s3"] = f"{LOCALHOST}:{ports.s3}"
    return urls


def stack_urls(settings: CliSettings, state: StackState | None) -> dict[str, str]:
    """Every component's base URL; the state file's win over the configured defaults."""
    urls = default_urls(settings)
    if state is not None:
        urls |= state.urls
    return urls
