"""Services run as deployed (``python -m <module>``, settings from the environment), for tests
that kill a process outright and start it again."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, SecretStr

from flywheel_runtime.settings import PlatformSettings, ServiceSettings

__all__ = ["ServiceProcess", "settings_environment"]


def settings_environment(settings: ServiceSettings) -> dict[str, str]:
    """``settings`` as the environment variables its class reads, secrets included.

    Only the fields the caller set are written: the rest keep their defaults in the process.
    An explicit ``None`` becomes an empty value, which the services read as "none".
    """
    env = {
        f"{PlatformSettings.model_config.get('env_prefix', '')}{name.upper()}": _text(value)
        for name, value in _set_fields(settings.platform).items()
    }
    prefix = str(type(settings).model_config.get("env_prefix", ""))
    for name, value in _set_fields(settings).items():
        if name != "platform":
            env[f"{prefix}{name.upper()}"] = _text(value)
    return env


def _set_fields(model: BaseModel) -> dict[str, Any]:
    return {name: getattr(model, name) for name in model.model_fields_set}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel | dict | list | tuple):
        return json.dumps(_plain(value))
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _plain(value: Any) -> Any:
    """JSON-ready, with secrets revealed (``model_dump`` would mask them)."""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class ServiceProcess:
    """One service process: started, probed, killed and started again with the same settings.

    Its output goes to ``log`` (appended across starts), so a test can read what it printed.
    """

    def __init__(
        self,
        module: str,
        settings: ServiceSettings,
        log: Path,
        *,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.module = module
        self.settings = settings
        self.log = log
        self.extra_env = dict(extra_env or {})
        self.url = f"http://{settings.http_host}:{settings.http_port}"
        self.process: asyncio.subprocess.Process | None = None
        self.exits: list[int] = []
        """Exit codes of the starts that ended, oldest first (negative: killed by a signal)."""

    async def start(self, **extra_env: str) -> None:
        """Start it (again), with ``extra_env`` on top of the environment it was made with."""
        env = os.environ | settings_environment(self.settings) | self.extra_env | extra_env
        with self.log.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                env=env,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def ready(self) -> bool:
        """True once ``/readyz`` answers 200; raises if the process ended meanwhile."""
        if self.process is None or self.process.returncode is not None:
            code = None if self.process is None else self.process.returncode
            raise AssertionError(f"{self.module} is not running (exit {code}):\n{self.tail()}")
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

    async def restart_if_ended(self) -> bool:
        """Start it again, without the start's extra environment, if it has ended (as a
        supervisor restarts a crashed pod); True when it did."""
        if self.process is None or self.process.returncode is None:
            return False
        self.exits.append(self.process.returncode)
        await self.start()
        return True

    async def kill(self) -> None:
        """SIGKILL, if still running, and wait for it."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        self.exits.append(await self.process.wait())
        self.process = None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
