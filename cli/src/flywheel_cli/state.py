"""The local stack's state file: what ``up`` started, so ``down``, ``status`` and ``demo`` find it.

One JSON document, written atomically (temporary file + rename), so a reader never sees half
of it and an interrupted ``up`` leaves the previous state intact. ``locked`` serialises the
commands that change the stack: two ``up`` runs never start the same server twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STATE_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class ComponentState(BaseModel):
    """One process ``up`` started."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int
    """Process id; also the process group id (each component runs in a session of its own)."""
    start_ticks: int | None = None
    """Start time of the process in clock ticks since boot (``/proc``), so a recycled pid is
    never mistaken for the component."""
    command: list[str]
    log: Path
    port: int | None = None
    url: str | None = None
    """Base URL of its API, when it serves one."""
    started_at: datetime = Field(default_factory=utcnow)


class StackState(BaseModel):
    """The stack as ``up`` left it."""

    model_config = ConfigDict(frozen=True)

    version: int = STATE_VERSION
    namespace: str = ""
    urls: dict[str, str] = Field(default_factory=dict)
    """Base URL of every server and service by component name (``s3`` is ``host:port``)."""
    components: dict[str, ComponentState] = Field(default_factory=dict)
    updated_at: datetime = Field(default_factory=utcnow)

    def with_component(self, component: ComponentState) -> StackState:
        urls = dict(self.urls)
        if component.url is not None:
            urls[component.name] = component.url
        return self.model_copy(
            update={
                "components": {**self.components, component.name: component},
                "urls": urls,
                "updated_at": utcnow(),
            }
        )

    def without(self, name: str) -> StackState:
        components = {k: v for k, v in self.components.items() if k != name}
        urls = {k: v for k, v in self.urls.items() if k != name}
        return self.model_copy(
            update={"components": components, "urls": urls, "updated_at": utcnow()}
        )


class StateFileError(RuntimeError):
    """The state file exists but cannot be read as a stack state."""


class StateFile:
    """Reads and writes one stack's state document."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> StackState | None:
        """The saved state, or None when there is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return StackState.model_validate_json(text)
        except ValidationError as error:
            raise StateFileError(
                f"{self.path} is not a Flywheel state file ({error.error_count()} errors); "
                "remove it once no process it names is running"
            ) from error

    def save(self, state: StackState) -> None:
        """Replace the document in one rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(state.model_dump_json(indent=2))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock beside the state file while the stack is changed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
