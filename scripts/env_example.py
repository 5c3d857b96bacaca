"""Write (or, with --check, verify) .env.example from the settings classes themselves.

Every variable a service reads is a field of its settings class with an attribute docstring;
generating the file from them keeps the documented list complete and the defaults true.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from pathlib import Path

from pydantic_settings import BaseSettings

from flywheel_runtime.settings import env_reference

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".env.example"

SECTIONS: list[tuple[str, str]] = [
    ("Shared by every service", "flywheel_runtime.settings:PlatformSettings"),
    ("labeling", "flywheel_labeling.settings:LabelingSettings"),
    ("data-monitor", "flywheel_data_monitor.settings:DataMonitorSettings"),
    ("trainer-dispatch", "flywheel_trainer_dispatch.settings:TrainerDispatchSettings"),
    ("validator", "flywheel_validator.settings:ValidatorSettings"),
    ("inference-bff", "flywheel_inference_bff.settings:BffSettings"),
    ("inference log worker", "flywheel_inference_bff.logworker.settings:LogWorkerSettings"),
    ("rollout", "flywheel_rollout.settings:RolloutSettings"),
    ("workspaces", "flywheel_workspaces.settings:WorkspacesSettings"),
]

TESTS = """\
# --- Tests (flywheel_testing) -------------------------------------------------------------------
# Point the test fixtures at existing servers instead of this machine's, or containers.
# FLYWHEEL_TEST_RABBIT_URL=amqp://guest:guest@127.0.0.1:5672/
# FLYWHEEL_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres
# FLYWHEEL_TEST_S3_ENDPOINT=127.0.0.1:8333
# FLYWHEEL_TEST_S3_ACCESS_KEY=flywheel
# FLYWHEEL_TEST_S3_SECRET_KEY=flywheel-secret
# FLYWHEEL_TEST_MLFLOW_URI=http://127.0.0.1:5000
"""


def _load(path: str) -> type[BaseSettings]:
    module, _, name = path.partition(":")
    settings: type[BaseSettings] = getattr(importlib.import_module(module), name)
    return settings


def render() -> str:
    lines = [
        "# Every setting a Flywheel service reads, with its default. Generated from the settings",
        "# classes by scripts/env_example.py (make env-example); copy to .env for the local stack.",
        "",
    ]
    for title, path in SECTIONS:
        settings = _load(path)
        prefix = settings.model_config.get("env_prefix", "")
        heading = f"# --- {title} ({prefix}*) "
        lines.append(heading + "-" * max(3, 100 - len(heading)))
        for variable, default, description in env_reference(settings):
            for line in textwrap.wrap(description or variable, width=98):
                lines.append(f"# {line}")
            # Unset (None) has no env spelling: the line stays commented until given a value.
            lines.append(f"{variable}={default}" if default else f"# {variable}=")
        lines.append("")
    return "\n".join(lines) + TESTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if TARGET.read_text() != text:
            print(".env.example is stale: run `make env-example`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
