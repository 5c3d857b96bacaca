"""The load suite runs the same in-process stack as ``tests/e2e``: its helpers and its ``loop``
fixture, loaded from there (conftest modules are not importable by package)."""

from __future__ import annotations

from pathlib import Path

from flywheel_testing.modules import load_file

e2e = load_file(Path(__file__).parents[1] / "e2e" / "conftest.py", "flywheel_e2e_support")
loop = e2e.loop
