"""Naming and calling a model line's training entry point.

Two spellings: ``package.module:function``, imported and called in the runner's process with
the ``TrainingContext``; anything else is a script path, run with the runner's interpreter as
``python <script> --context <context-rank<R>.json>`` in the runner's environment (torchrun's
variables included), its output going to the run's log. A relative script path is taken from
the working directory of whoever resolves it (``EntryPoint.resolved``).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

from flywheel_runtime.errors import InvalidInputError
from flywheel_vision.contract import TrainingContext

__all__ = ["DEFAULT_ENTRY_POINT", "EntryPoint", "EntryPointError"]

DEFAULT_ENTRY_POINT: Final = "flywheel_vision.reference:train"
"""The reference MNIST training (DigitNet): what a model line runs unless it names another."""

_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class EntryPointError(InvalidInputError):
    """The entry point cannot be found, or it failed."""

    code = "entry_point_failed"


class EntryPoint(BaseModel):
    """A parsed entry point: an importable callable or a script path."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["callable", "script"]
    target: str

    @classmethod
    def parse(cls, spec: str) -> EntryPoint:
        """``package.module:function`` is a callable; any other non-empty text a script path."""
        spec = spec.strip()
        if not spec:
            raise EntryPointError("the entry point is empty")
        if _CALLABLE.match(spec):
            return cls(kind="callable", target=spec)
        if "\0" in spec or len(spec) > 1000:
            raise EntryPointError(
                "the entry point is not a usable path", details={"spec": spec[:100]}
            )
        return cls(kind="script", target=spec)

    def __str__(self) -> str:
        return self.target

    def resolved(self, cwd: Path | None = None) -> EntryPoint:
        """A script path made absolute against ``cwd`` (default: the working directory)."""
        if self.kind == "callable":
            return self
        path = Path(self.target)
        if path.is_absolute():
            return self
        return self.model_copy(update={"target": str((cwd or Path.cwd()) / path)})

    def load(self) -> Callable[[TrainingContext], object]:
        """The callable (imported now); ``EntryPointError`` when it is not there."""
        if self.kind != "callable":
            raise EntryPointError(
                "a script is run, not loaded", details={"entry_point": self.target}
            )
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise EntryPointError(
                f"entry point module {module_name!r} cannot be imported: {error}",
                details={"entry_point": self.target},
            ) from error
        function = getattr(module, attribute, None)
        if not callable(function):
            raise EntryPointError(
                f"entry point {self.target!r} is not a callable of {module_name!r}",
                details={"entry_point": self.target},
            )
        return function  # type: ignore[no-any-return]

    def run(
        self,
        context: TrainingContext,
        context_file: Path,
        *,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        """Call the entry point with ``context`` (already written to ``context_file``).

        A script that exits non-zero raises ``EntryPointError`` with its exit status; a
        callable's exceptions propagate as they are.
        """
        if self.kind == "callable":
            self.load()(context)
            return
        script = Path(self.target)
        if not script.is_file():
            raise EntryPointError(
                f"entry point script {self.target!r} does not exist",
                details={"entry_point": self.target},
            )
        # Our buffered lines first: the script writes to the same log.
        sys.stdout.flush()
        sys.stderr.flush()
        completed = subprocess.run(  # noqa: S603 - the configured script, our interpreter
            [python, str(script), "--context", str(context_file)],
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if completed.returncode != 0:
            raise EntryPointError(
                f"entry point script {script.name!r} exited with code {completed.returncode}",
                details={"entry_point": self.target, "exit_code": completed.returncode},
            )
