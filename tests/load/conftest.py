"""The load suite runs the same in-process stack as ``tests/e2e``: its helpers and its ``loop``
fixture, loaded from there (conftest modules are not importable by package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _e2e_support() -> ModuleType:
    name = "flywheel_e2e_support"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).parents[1] / "e2e" / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


e2e = _e2e_support()
loop = e2e.loop
