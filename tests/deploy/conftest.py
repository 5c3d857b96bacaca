"""Shared knowledge of the deployables: which services exist, what they read, how images look."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings

from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.modules import load_file

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Deployable:
    """A process the stack runs from one of the service images."""

    name: str
    module: str
    """What ``python -m`` runs."""
    settings: str
    """``module:Class`` of its settings."""
    service_dir: str
    """Folder under services/ holding the Dockerfile of its image."""

    @property
    def dockerfile(self) -> Path:
        return ROOT / "services" / self.service_dir / "Dockerfile"

    def settings_class(self) -> type[BaseSettings]:
        module, _, name = self.settings.partition(":")
        settings: type[BaseSettings] = getattr(importlib.import_module(module), name)
        return settings

    @property
    def env_prefix(self) -> str:
        return str(self.settings_class().model_config.get("env_prefix", ""))


DEPLOYABLES = (
    Deployable(
        "labeling", "flywheel_labeling", "flywheel_labeling.settings:LabelingSettings", "labeling"
    ),
    Deployable(
        "data-monitor",
        "flywheel_data_monitor",
        "flywheel_data_monitor.settings:DataMonitorSettings",
        "data-monitor",
    ),
    Deployable(
        "trainer-dispatch",
        "flywheel_trainer_dispatch",
        "flywheel_trainer_dispatch.settings:TrainerDispatchSettings",
        "trainer-dispatch",
    ),
    Deployable(
        "validator",
        "flywheel_validator",
        "flywheel_validator.settings:ValidatorSettings",
        "validator",
    ),
    Deployable(
        "rollout", "flywheel_rollout", "flywheel_rollout.settings:RolloutSettings", "rollout"
    ),
    Deployable(
        "inference-bff",
        "flywheel_inference_bff",
        "flywheel_inference_bff.settings:BffSettings",
        "inference-bff",
    ),
    Deployable(
        "log-worker",
        "flywheel_inference_bff.logworker",
        "flywheel_inference_bff.logworker.settings:LogWorkerSettings",
        "inference-bff",
    ),
    Deployable(
        "workspaces",
        "flywheel_workspaces",
        "flywheel_workspaces.settings:WorkspacesSettings",
        "workspaces",
    ),
)
"""Every process of the stack: the seven services and the BFF's log worker (same image)."""

BY_NAME = {d.name: d for d in DEPLOYABLES}


# --- Settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingsEnv:
    """The variables a settings class reads: exact names, and prefixes of free-form nesting."""

    exact: frozenset[str]
    nested: frozenset[str]
    """``<NAME>__`` prefixes under which any key is read (dict fields, optional blocks)."""

    def reads(self, variable: str) -> bool:
        return variable in self.exact or any(variable.startswith(p) for p in self.nested)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _walk(model: type[BaseModel], prefix: str, exact: set[str], nested: set[str]) -> None:
    for name, field in model.model_fields.items():
        if field.annotation is PlatformSettings:
            continue
        variable = f"{prefix}{name.upper()}"
        exact.add(variable)
        inner = _model_in(field.annotation)
        if inner is not None:
            _walk(inner, f"{variable}__", exact, nested)
        elif typing.get_origin(field.annotation) is dict:
            nested.add(f"{variable}__")


def settings_env(settings: type[BaseSettings]) -> SettingsEnv:
    """What ``settings`` and the shared ``PlatformSettings`` read from the environment."""
    exact: set[str] = set()
    nested: set[str] = set()
    _walk(settings, str(settings.model_config.get("env_prefix", "")), exact, nested)
    _walk(PlatformSettings, "FLYWHEEL_", exact, nested)
    return SettingsEnv(frozenset(exact), frozenset(nested))


def local_defaults() -> set[str]:
    """Platform variables whose default points at this machine: a container must set them."""
    names: set[str] = set()
    for name, field in PlatformSettings.model_fields.items():
        value = field.get_default(call_default_factory=True)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and ("127.0.0.1" in value or "localhost" in value):
            names.add(f"FLYWHEEL_{name.upper()}")
    return names


def build_settings(
    deployable: Deployable, env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> BaseSettings:
    """The deployable's settings as its process would build them from exactly ``env``."""
    for variable in list(os.environ):
        if variable.startswith("FLYWHEEL_"):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return deployable.settings_class()()


def auth_problems(settings: BaseSettings) -> list[str]:
    """A required ``auth`` block that names neither a JWKS endpoint nor a dev key: the service
    refuses to start (``TokenVerifier``)."""
    field = type(settings).model_fields.get("auth")
    if field is None or _model_in(field.annotation) is None:
        return []
    auth = getattr(settings, "auth", None)
    required = field.annotation is _model_in(field.annotation)
    if auth is None:
        return ["auth is required but unset"] if required else []
    if auth.jwks_url is None and auth.dev_signing_key is None:
        return ["auth has neither jwks_url nor dev_signing_key"]
    if auth.dev_signing_key is not None and not auth.dev_signing_key.get_secret_value():
        return ["auth.dev_signing_key is empty"]
    if auth.jwks_url is not None and not auth.jwks_url:
        return ["auth.jwks_url is empty"]
    return []


# --- Dockerfiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD, else the shell words."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return shlex.split(text)
        return [str(part) for part in parsed]


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, as Docker reads them."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: a continuation line ends the file"
    return instructions


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV`` values of a Dockerfile (``KEY=value`` form), last one wins."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=value form"
                env[key] = value
    return env


def final_from(instructions: list[Instruction]) -> str:
    """The base image of the last stage, ARG defaults substituted."""
    args: dict[str, str] = {}
    base = ""
    for instruction in instructions:
        if instruction.keyword == "ARG":
            key, _, value = instruction.args.partition("=")
            args[key] = value
        if instruction.keyword == "FROM":
            image = instruction.args.split()[0]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    return base


# --- Fixtures: test modules reach the helpers above through these ---------------------------


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def catalog() -> dict[str, Deployable]:
    """Every process of the stack by name."""
    return dict(BY_NAME)


@pytest.fixture(scope="session")
def read_settings_env() -> Callable[[type[BaseSettings]], SettingsEnv]:
    return settings_env


@pytest.fixture(scope="session")
def platform_local_defaults() -> set[str]:
    return local_defaults()


@pytest.fixture
def settings_from(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[Deployable, Mapping[str, str]], BaseSettings]:
    """Build a deployable's settings from exactly the given environment."""

    def build(deployable: Deployable, env: Mapping[str, str]) -> BaseSettings:
        with monkeypatch.context() as scoped:
            return build_settings(deployable, env, scoped)

    return build


@pytest.fixture(scope="session")
def check_auth() -> Callable[[BaseSettings], list[str]]:
    return auth_problems


@pytest.fixture(scope="session")
def dockerfile() -> Callable[[Path], list[Instruction]]:
    return parse_dockerfile


@pytest.fixture(scope="session")
def image_env() -> Callable[[list[Instruction]], dict[str, str]]:
    return dockerfile_env


@pytest.fixture(scope="session")
def base_image() -> Callable[[list[Instruction]], str]:
    return final_from


provision = load_file(
    Path(__file__).parents[2] / "deploy/helm/flywheel/files/rabbitmq/provision.py",
    "flywheel_rabbit_provision",
)
"""The chart's ``files/rabbitmq/provision.py``: a standalone script, not an installed module."""
